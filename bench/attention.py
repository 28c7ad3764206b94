"""Attention kernel benchmark: the Pallas block-sparse kernel vs the pure-jnp reference and XLA's fused attention.

  python bench/attention.py [--shapes=8x16x2048,2x16x8192] [--windows=none,256] [--out=bench/results/attention.json]

bf16, head_dim 128, GQA off, one packed document per row. Times are medians over repeats after warm-up, for the
forward pass and forward+backward; each row compares implementations on the same machine in the same run.
Prints a table and writes JSON (device name and date included).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pallas_kernels.sparse_attention import api  # pylint: disable=g-import-not-at-top
from pallas_kernels.sparse_attention import reference


def time_fn(fn, *args, repeats: int = 10) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def write_results(path: str, rows: list[dict], **meta) -> None:
  """The JSON every bench script writes: device name, date, settings and the table's rows."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump({'device': jax.devices()[0].device_kind, 'date': datetime.date.today().isoformat(), **meta,
               'rows': rows}, f, indent=2)


def inputs(b, n, t, h, dtype=jnp.bfloat16):
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (b, t, n, h), dtype) for key in keys)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  seg = jnp.ones((b, t), jnp.int32)
  return q, k, v, pos, seg


def implementations(window, num_global):
  kw = dict(window=window, num_global=num_global)
  impls = {
      'pallas': lambda q, k, v, p, s: api.sparse_attention(q, k, v, p, p, s, s, **kw),
      'reference': lambda q, k, v, p, s: reference.sparse_attention_reference(q, k, v, p, p, s, s, **kw),
  }
  if window is None:
    impls['xla_fused'] = lambda q, k, v, p, s: jax.nn.dot_product_attention(q, k, v, is_causal=True)
  return impls


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--shapes', default='8x16x2048,2x16x8192,1x16x32768', help='batch x heads x seq, comma list')
  parser.add_argument('--windows', default='none,256', help="'none' (causal) or a window size, comma list")
  parser.add_argument('--num_global', type=int, default=4)
  parser.add_argument('--head_dim', type=int, default=128)
  parser.add_argument('--max_reference_seq', type=int, default=8192, help='skip the O(T^2)-memory reference above')
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results', 'attention.json'))
  args = parser.parse_args()
  rows = []
  for shape in args.shapes.split(','):
    b, n, t = (int(x) for x in shape.split('x'))
    x = inputs(b, n, t, args.head_dim)
    for window_text in args.windows.split(','):
      window = None if window_text == 'none' else int(window_text)
      num_global = 0 if window is None else args.num_global
      for name, fn in implementations(window, num_global).items():
        if name == 'reference' and t > args.max_reference_seq:
          continue
        fwd = jax.jit(fn)
        loss = lambda q, k, v, p, s, fn=fn: fn(q, k, v, p, s).astype(jnp.float32).sum()
        fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        try:
          row = dict(shape=shape, window=window_text, impl=name, fwd_ms=1e3 * time_fn(fwd, *x),
                     fwd_bwd_ms=1e3 * time_fn(fwd_bwd, *x))
        except Exception as e:  # e.g. out of memory: report it in the table instead of stopping the sweep
          row = dict(shape=shape, window=window_text, impl=name, error=f'{type(e).__name__}: {str(e)[:120]}')
        rows.append(row)
        print(json.dumps(row), flush=True)
  print(f'\n{"shape":>14} {"window":>7} {"impl":>10} {"fwd ms":>9} {"fwd+bwd ms":>11}')
  for r in rows:
    if 'error' in r:
      print(f'{r["shape"]:>14} {r["window"]:>7} {r["impl"]:>10} {r["error"]}')
    else:
      print(f'{r["shape"]:>14} {r["window"]:>7} {r["impl"]:>10} {r["fwd_ms"]:9.2f} {r["fwd_bwd_ms"]:11.2f}')
  write_results(args.out, rows, head_dim=args.head_dim)


if __name__ == '__main__':
  main()
