"""The training loop: data, model, optimizer, jitted steps, progress bar, eval, end-of-run samples.

Single-device for now; the state is a pure pytree and the step a pure function, so sharding, checkpointing and
multi-host add around this loop rather than rewriting it.
"""
from __future__ import annotations

import itertools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from dsjax import config as config_lib
from dsjax.data import pipeline
from dsjax.data import tokenizer as tokenizer_lib
from dsjax.model import Transformer
from dsjax.sample import sampler
from dsjax.train import checkpoint
from dsjax.train import metrics as metrics_lib
from dsjax.train import optimizer as optimizer_lib
from dsjax.train import state as state_lib
from dsjax.train import step as step_lib


def load_eval_batches(cfg: ml_collections.ConfigDict, tokenizer) -> list[dict[str, np.ndarray]]:
  """The first `data.eval_batches` batches of the held-out split: the same fixed set at every evaluation."""
  dataset = pipeline.make_dataset(cfg.data, tokenizer, split='validation', batch_size=cfg.train.batch_size,
                                  seed=cfg.data.shuffle_seed, repeat=False)
  batches = list(itertools.islice(iter(dataset), cfg.data.eval_batches))
  if not batches:
    raise config_lib.ConfigError('the validation split produced no batch: lower train.batch_size or data.seq_len, '
                     'or raise data.validation_fraction')
  return batches


def evaluate(eval_step, params: Any, batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
  """Held-out loss (nats per token) and bits per byte over the fixed eval batches."""
  sums = [eval_step(params, batch) for batch in batches]
  nll, tokens, num_bytes = (float(sum(s[k] for s in sums)) for k in ('nll_sum', 'tokens', 'bytes'))
  return {'loss': nll / max(tokens, 1.0), 'bits_per_byte': metrics_lib.bits_per_byte(nll, num_bytes)}


def train(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """Trains `cfg.model` on `cfg.data` for `cfg.train.steps` steps; returns a summary of the run.

  The summary holds `params`, `num_params`, `history` (logged train metrics), `evals`, `final_eval`,
  `unigram` (baseline on the same eval batches), `samples`, `checkpoint` (where the final model was saved, when
  `train.workdir` is set) and timings.
  """
  start_time = time.time()
  tokenizer = tokenizer_lib.from_config(cfg.data)
  if cfg.model.vocab_size < tokenizer.vocab_size:
    raise config_lib.ConfigError(f'config.model.vocab_size={cfg.model.vocab_size}: smaller than the '
                                 f"tokenizer's {tokenizer.vocab_size} ids")
  token_bytes = np.zeros((cfg.model.vocab_size,), np.int32)
  token_bytes[:tokenizer.vocab_size] = tokenizer.token_byte_lengths()

  try:
    train_iter = iter(pipeline.make_dataset(
        cfg.data, tokenizer, split='train', batch_size=cfg.train.batch_size, seed=cfg.data.shuffle_seed,
        shard_index=jax.process_index(), shard_count=jax.process_count(), repeat=True))
    eval_batches = load_eval_batches(cfg, tokenizer)
  except ValueError as e:  # an empty source or split: name the config field that points at it
    raise config_lib.ConfigError(f'config.data.source={cfg.data.source!r}: {e}') from e

  model = Transformer(cfg.model)
  optimizer = optimizer_lib.make_optimizer(cfg.optim, cfg.train.steps)
  init_rng, dropout_rng, sample_rng = jax.random.split(jax.random.key(cfg.seed), 3)
  if cfg.train.init_from:
    state = state_lib.train_state_from_params(initial_params(cfg), optimizer)
  else:
    state = state_lib.init_train_state(model, optimizer, init_rng, cfg.data.seq_len)
  num_params = state_lib.param_count(state.params)

  train_step = jax.jit(step_lib.make_train_step(model, optimizer, cfg), donate_argnums=0)
  eval_step = jax.jit(step_lib.make_eval_step(model, jnp.asarray(token_bytes)))
  unigram = metrics_lib.UnigramBaseline(cfg.model.vocab_size)
  writer = metrics_lib.JsonlWriter(cfg.train.workdir)
  tokens_per_step = cfg.train.batch_size * cfg.data.seq_len

  bar = tqdm.tqdm(total=cfg.train.steps, disable=not cfg.train.progress_bar, desc='train', unit='step',
                  dynamic_ncols=True)
  bar.write(f'model: {num_params:,} parameters; attention={cfg.model.attention.kind}, '
            f'positions={cfg.model.positions.kind}; {tokens_per_step:,} tokens per step')
  history, evals = [], []
  # Metrics of a logged step are read after the next step is dispatched, so the host never stalls the device.
  pending = None
  clock = {'time': time.time(), 'step': 0}
  for step in range(1, cfg.train.steps + 1):
    batch = next(train_iter)
    unigram.update(batch['targets'], batch['segment_ids'])
    state, step_metrics = train_step(state, batch, dropout_rng)
    if pending is not None:
      _log(*pending, clock, tokens_per_step, bar, history, writer)
      pending = None
    if step % cfg.train.log_every == 0 or step == cfg.train.steps:
      pending = (step, step_metrics)
    bar.update(1)
    if step % cfg.train.eval_every == 0 and step != cfg.train.steps:
      result = {'step': step, **evaluate(eval_step, state.params, eval_batches)}
      evals.append(result)
      writer.write({'split': 'validation', **result})
      bar.write(f'step {step}: held-out loss {result["loss"]:.4f}, {result["bits_per_byte"]:.3f} bits/byte')
  if pending is not None:
    _log(*pending, clock, tokens_per_step, bar, history, writer)
  bar.close()
  train_time = time.time() - start_time

  final = {'step': cfg.train.steps, **evaluate(eval_step, state.params, eval_batches)}
  evals.append(final)
  writer.write({'split': 'validation', **final})
  baseline = unigram.evaluate(eval_batches, token_bytes)
  saved_to = None
  if cfg.train.workdir:
    saved_to = os.path.join(os.path.abspath(cfg.train.workdir), 'checkpoint')
    checkpoint.save_model(saved_to, cfg, state.params, _tokenizer_files(cfg.data.tokenizer))
    print(f'saved the final model to {saved_to}')
  print(f'final held-out loss {final["loss"]:.4f} nats/token = {final["bits_per_byte"]:.3f} bits/byte '
        f'(unigram baseline {baseline["bits_per_byte"]:.3f} bits/byte); {num_params:,} parameters; '
        f'{train_time:.0f} s')

  samples = []
  if cfg.train.num_samples:
    prompts = [cfg.train.sample_prompts[i % len(cfg.train.sample_prompts)] for i in range(cfg.train.num_samples)]
    samples = complete(model, state.params, tokenizer, prompts, sample_rng, cfg.sample)
    for prompt, text in zip(prompts, samples):
      print(f'--- sample ---\n{prompt}{text}')
  return {
      'params': state.params, 'num_params': num_params, 'history': history, 'evals': evals,
      'final_eval': final, 'unigram': baseline, 'samples': samples, 'train_seconds': train_time,
      'checkpoint': saved_to,
      'total_seconds': time.time() - start_time,
  }


def initial_params(cfg: ml_collections.ConfigDict) -> Any:
  """The params of the checkpoint `train.init_from`, checked against `cfg.model` (any mismatch names the field)."""
  saved = checkpoint.load_config(cfg.train.init_from).model
  for field in ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim', 'mlp_dim',
                'tie_embeddings'):
    if saved[field] != cfg.model[field]:
      raise config_lib.ConfigError(f'config.model.{field}={cfg.model[field]!r}: the checkpoint in '
                                   f'train.init_from={cfg.train.init_from!r} has {saved[field]!r}')
  return checkpoint.load_params(cfg.train.init_from, cfg.model)


def complete(model, params: Any, tokenizer, prompts: list[str], rng: jax.Array,
             sample_cfg: ml_collections.ConfigDict) -> list[str]:
  """Text completions of `prompts` (each starts a new document, so it is prefixed with BOS)."""
  encoded = [[tokenizer.bos_id] + list(tokenizer.encode(p)) for p in prompts]
  new_tokens = sampler.generate(
      model, params, encoded, rng, max_new_tokens=sample_cfg.max_new_tokens, temperature=sample_cfg.temperature,
      top_k=sample_cfg.top_k, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, vocab_limit=tokenizer.vocab_size)
  return [tokenizer.decode(t) for t in new_tokens]


def _tokenizer_files(spec: str) -> list[str]:
  """tokenizer.json and its sibling config files, for a HF tokenizer; nothing for the byte tokenizer."""
  if spec == 'byte':
    return []
  folder = spec if os.path.isdir(spec) else os.path.dirname(spec)
  return [os.path.join(folder, name) for name in checkpoint.TOKENIZER_FILES
          if os.path.isfile(os.path.join(folder, name))]


def _log(step: int, device_metrics, clock: dict, tokens_per_step: int, bar, history: list,
         writer: metrics_lib.JsonlWriter) -> None:
  """Reads one step's metrics (waiting for that step only) and logs them with the throughput since last log."""
  record = {'step': step, **{k: float(v) for k, v in jax.device_get(device_metrics).items()}}
  now = time.time()
  record['tokens_per_sec'] = (step - clock['step']) * tokens_per_step / max(now - clock['time'], 1e-9)
  clock.update(time=now, step=step)
  history.append(record)
  writer.write({'split': 'train', **record})
  bar.set_postfix(loss=f'{record["loss"]:.3f}', tok_s=f'{record["tokens_per_sec"]:,.0f}')
