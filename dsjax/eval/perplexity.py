"""Held-out loss and bits per byte of a model over the validation split (the same fixed batches training evaluates).

  from dsjax.eval import perplexity
  result = perplexity.evaluate(cfg, params)   # {'loss', 'bits_per_byte', 'nll_sum', 'tokens', 'bytes', 'batches'}
"""
from __future__ import annotations

from typing import Any

from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dsjax.data import pipeline
from dsjax.data import tokenizer as tokenizer_lib
from dsjax.model import Transformer
from dsjax.train import metrics as metrics_lib
from dsjax.train import objective as objective_lib


def evaluate(cfg: ml_collections.ConfigDict, params: Any, *, model: nn.Module | None = None, tokenizer=None,
             batches: list[dict[str, np.ndarray]] | None = None) -> dict[str, float]:
  """Held-out nll (nats per target token) and bits per UTF-8 byte of `params` on `batches` (default: the first
  `cfg.data.eval_batches` validation batches of `cfg.train.batch_size` x `cfg.data.seq_len`, as in training).

  Padding (segment 0) is excluded; bits per byte = nll_sum / ln 2 / bytes, where bytes counts the UTF-8 bytes the
  target tokens stand for (so byte-level and BPE models compare).
  """
  tokenizer = tokenizer or tokenizer_lib.from_config(cfg.data)
  model = model or Transformer(cfg.model)
  if batches is None:
    batches = pipeline.eval_batches(cfg.data, tokenizer, cfg.train.batch_size)
  table = tokenizer_lib.token_bytes_table(tokenizer, cfg.model.vocab_size)
  eval_step = jax.jit(objective_lib.make_eval_step(model, jnp.asarray(table)))
  nll = tokens = num_bytes = 0.0
  for batch in batches:
    sums = jax.device_get(eval_step(params, {k: jnp.asarray(v) for k, v in batch.items()}))
    nll += float(sums['nll_sum'])
    tokens += float(sums['tokens'])
    num_bytes += float(sums['bytes'])
  return {'loss': nll / max(tokens, 1.0), 'bits_per_byte': metrics_lib.bits_per_byte(nll, num_bytes),
          'nll_sum': nll, 'tokens': int(tokens), 'bytes': int(num_bytes), 'batches': len(batches)}
