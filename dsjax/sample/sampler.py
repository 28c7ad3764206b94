"""A minimal jitted sampler for end-of-training samples: greedy / temperature / top-k.

Each step recomputes the full forward pass over a fixed-size token buffer (static shapes, one `lax.fori_loop`),
which is simple and exact for every attention kind. The KV-cached fast sampler is dsjax.sample's next step.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def sample_logits(logits_BV: jax.Array, rng: jax.Array, *, temperature: float, top_k: int = 0,
                  vocab_limit: int | None = None) -> jax.Array:
  """Draws one token per row from float logits [B, V]; temperature 0 is greedy.

  `vocab_limit` masks ids >= limit (the model's vocabulary is padded beyond the tokenizer's).
  """
  logits_BV = logits_BV.astype(jnp.float32)
  if vocab_limit is not None and vocab_limit < logits_BV.shape[-1]:
    logits_BV = jnp.where(jnp.arange(logits_BV.shape[-1]) < vocab_limit, logits_BV, -jnp.inf)
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / temperature
  if top_k:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


def generate(model: nn.Module, params: Any, prompts: Sequence[Sequence[int]], rng: jax.Array, *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, eos_id: int | None = None,
             pad_id: int = 0, vocab_limit: int | None = None) -> list[list[int]]:
  """Continues each prompt (a list of token ids) by up to `max_new_tokens`; returns only the new tokens.

  Rows stop after emitting `eos_id` (which is dropped from the result). Prompts may differ in length.
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError('generate needs at least one prompt and every prompt needs at least one token')
  lengths = np.array([len(p) for p in prompts], np.int32)
  buffer_len = int(lengths.max()) + max_new_tokens
  tokens = np.full((len(prompts), buffer_len), pad_id, np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, :len(prompt)] = prompt
  # Compiled per call (the model is closed over): fine for occasional samples, not for serving.
  decode = jax.jit(functools.partial(
      _decode_loop, model, max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
      eos_id=-1 if eos_id is None else int(eos_id), pad_id=int(pad_id), vocab_limit=vocab_limit))
  out = decode(params, jnp.asarray(tokens), jnp.asarray(lengths), rng)
  out = np.asarray(out)
  results = []
  for row, length in enumerate(lengths):
    new = out[row, length:length + max_new_tokens].tolist()
    if eos_id is not None and eos_id in new:
      new = new[:new.index(eos_id)]
    results.append(new)
  return results


def _decode_loop(model, params, tokens_BL, lengths_B, rng, *, max_new_tokens, temperature, top_k, eos_id, pad_id,
                 vocab_limit):
  batch, buffer_len = tokens_BL.shape
  positions_BL = jnp.broadcast_to(jnp.arange(buffer_len, dtype=jnp.int32), (batch, buffer_len))

  def step(i, carry):
    tokens_BL, done_B = carry
    write_B = lengths_B + i
    # Causal attention: the garbage after each row's write position never reaches the logits we read.
    logits_BLV, _ = model.apply({'params': params}, tokens_BL, positions_BL)
    last_BV = jnp.take_along_axis(logits_BLV, (write_B - 1)[:, None, None], axis=1)[:, 0]
    next_B = sample_logits(last_BV, jax.random.fold_in(rng, i), temperature=temperature, top_k=top_k,
                           vocab_limit=vocab_limit)
    next_B = jnp.where(done_B, pad_id, next_B)
    tokens_BL = tokens_BL.at[jnp.arange(batch), write_B].set(next_B)
    return tokens_BL, done_B | (next_B == eos_id)

  tokens_BL, _ = jax.lax.fori_loop(0, max_new_tokens, step, (tokens_BL, jnp.zeros((batch,), bool)))
  return tokens_BL
