"""Training throughput benchmark: tokens/s and MFU of `train.py`'s loop for one config and several attention kinds,
side by side in one run.

  python bench/train.py [--config=configs/tiny.py] [--kinds=full,sparse] [--steps=30] [--set=train.batch_size=16]
                        [--out=bench/results/train.json]

Each kind trains `--steps` steps (no eval, no samples, no checkpoints); the rate is the median of the logged
tokens/s after the first `--warmup_logs` records (the first covers compilation). `--synthetic` measures the train
step alone instead (random tokens, no data pipeline, so a model of any size runs at once on a bare machine): the
state and step are built on the config's mesh as train.py builds them, traced under its placement, and `--steps`
steps run back to back after a warm-up step, waited on once. MFU uses FLOPs per token from
dsjax.train.flops (6N plus attention counted on the unmasked work) over the device's dense bf16 peak from the table
there; for a device the table does not know (a CPU) `--peak_flops=auto` measures a large matmul in the model's
compute dtype and uses that as the peak, so CPU MFU reads "fraction of what this machine's matmuls reach".
Prints a table and writes JSON (device name and date included).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.attention import write_results  # pylint: disable=g-import-not-at-top
from dsjax import config as config_lib
from dsjax import sharding as sharding_lib
from dsjax.model import Transformer
from dsjax.train import flops as flops_lib
from dsjax.train import loop
from dsjax.train import optimizer as optimizer_lib
from dsjax.train import state as state_lib
from dsjax.train import step as step_lib


def measured_matmul_flops(dtype: str, size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a size^3 matmul on the default device: a practical peak for devices without a datasheet entry."""
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    matmul(a).block_until_ready()
  return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def synthetic_tokens_per_sec(cfg, steps: int) -> float:
  """Tokens/s of the jitted train step on random batches: `steps` steps dispatched back to back, waited on once."""
  mesh = sharding_lib.make_mesh(cfg.mesh)
  model = Transformer(cfg.model)
  optimizer = optimizer_lib.make_optimizer(cfg.optim, cfg.train.steps, bias_update_rate=cfg.model.moe.bias_update_rate)
  seq = cfg.data.seq_len
  shardings = state_lib.state_shardings(model, optimizer, seq, mesh, cfg.mesh)
  batch_sharding = sharding_lib.batch_sharding(mesh, cfg.mesh)
  rows = cfg.train.batch_size
  tokens = jax.random.randint(jax.random.key(1), (rows, seq + 1), 0, cfg.model.vocab_size, jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (rows, seq))
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'positions': positions,
           'segment_ids': jnp.ones((rows, seq), jnp.int32)}
  batch = jax.device_put(batch, batch_sharding)
  step = jax.jit(step_lib.make_train_step(model, optimizer, cfg), in_shardings=(shardings, batch_sharding, None),
                 out_shardings=(shardings, None), donate_argnums=0)
  with sharding_lib.Placement.of(mesh, cfg.mesh).activate():
    state = state_lib.init_train_state(model, optimizer, jax.random.key(0), seq, shardings)
    state, metrics = step(state, batch, jax.random.key(2))  # compiles
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(steps):
      state, metrics = step(state, batch, jax.random.key(3 + i))
    jax.block_until_ready(metrics)
  return rows * seq * steps / (time.perf_counter() - start)


def apply_overrides(cfg, overrides: list[str]) -> None:
  for item in overrides:
    key, _, text = item.partition('=')
    node, *path = key.split('.')
    target = cfg[node]
    for part in path[:-1]:
      target = target[part]
    current = target[path[-1]]
    target[path[-1]] = type(current)(text) if not isinstance(current, bool) else text.lower() == 'true'


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--config', default='configs/tiny.py')
  parser.add_argument('--kinds', default='full,sparse', help='model.attention.kind values, comma list')
  parser.add_argument('--impl', default='auto', help='model.attention.impl')
  parser.add_argument('--synthetic', action='store_true', help='time the train step on random batches only')
  parser.add_argument('--steps', type=int, default=30)
  parser.add_argument('--log_every', type=int, default=5)
  parser.add_argument('--warmup_logs', type=int, default=1)
  parser.add_argument('--peak_flops', default='auto', help="per-device peak FLOP/s, or 'auto'")
  parser.add_argument('--set', action='append', default=[], help='config override section.field=value')
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results', 'train.json'))
  args = parser.parse_args()

  base = config_lib.load_config(args.config)
  apply_overrides(base, args.set)
  peak = flops_lib.peak_flops_per_device(jax.devices()[0].device_kind)
  if args.peak_flops != 'auto':
    peak = float(args.peak_flops)
  elif peak is None:  # measured once, before any training, so every kind is divided by the same peak
    peak = measured_matmul_flops(base.model.dtype)
  rows = []
  for kind in args.kinds.split(','):
    cfg = config_lib.load_config(args.config)
    apply_overrides(cfg, args.set)
    cfg.model.attention.kind = kind
    cfg.model.attention.impl = args.impl
    t = cfg.train
    t.steps, t.log_every, t.eval_every = args.steps, args.log_every, args.steps + 1
    t.num_samples, t.progress_bar, t.workdir = 0, False, ''
    cfg.data.eval_batches = 1
    t.peak_flops_per_device = peak
    config_lib.validate(cfg)
    if args.synthetic:
      tokens_per_sec = synthetic_tokens_per_sec(cfg, args.steps)
    else:
      history = loop.train(cfg)['history'][args.warmup_logs:]
      tokens_per_sec = statistics.median(r['tokens_per_sec'] for r in history)
    flops_per_token = flops_lib.training_flops_per_token(cfg.model, cfg.data.seq_len)
    rows.append(dict(kind=kind, impl=args.impl, batch=cfg.train.batch_size, seq_len=cfg.data.seq_len,
                     devices=jax.device_count(), tokens_per_sec=tokens_per_sec, flops_per_token=flops_per_token,
                     peak_flops_per_device=peak,
                     mfu=flops_lib.mfu(tokens_per_sec, flops_per_token, jax.device_count(), peak)))
  print(f'\ndevice: {jax.devices()[0].device_kind} x {jax.device_count()}; config {args.config} {args.set}')
  print(f'{"kind":>8} {"batch x seq":>12} {"tokens/s":>10} {"GFLOP/token":>12} {"peak TFLOP/s":>13} {"MFU":>7}')
  for r in rows:
    print(f'{r["kind"]:>8} {r["batch"]:>5} x {r["seq_len"]:<5} {r["tokens_per_sec"]:10,.0f} '
          f'{r["flops_per_token"] / 1e9:12.3f} {r["peak_flops_per_device"] / 1e12:13.3f} {r["mfu"]:7.1%}')
  write_results(args.out, rows, config=args.config, overrides=args.set, steps=args.steps, synthetic=args.synthetic)


if __name__ == '__main__':
  main()
