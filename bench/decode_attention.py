"""Decode attention benchmark: the Pallas decode kernel vs the pure-jnp reference, side by side, against the
device's measured memory-copy rate.

  python bench/decode_attention.py [--steps=64] [--out=bench/results/decode_attention.json]

bf16, one new token per row against one layer of a stacked [L, B, S, K, H] KV cache (the decoder's layout: the
kernel reads the layer in place), a long full cache and the bounded num_global + window ring of sparse attention.
Timing: `--steps` calls inside one jitted `lax.fori_loop` (each step's query depends on the previous step's output,
so nothing is hoisted), waited on once, median of `--repeats`; per-call host costs do not enter. A decode step must
read K and V of its layer once, so GB/s = 2 * B * S * K * H * 2 bytes / time, printed next to the device's copy
rate (a jitted x + 1 over 1 GiB, counting the bytes read and written) and as a fraction of it. Each row also prints
the floor: the same loop with a step that does nothing.
Prints a table and writes JSON with the device name and date.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.attention import write_results  # pylint: disable=g-import-not-at-top
from pallas_kernels.sparse_attention import sparse_attention_reference, sparse_decode_attention

CASES = [  # (name, batch, query heads, kv heads, cache length, window, num_global)
    ('full 4k', 8, 32, 8, 4096, None, 0),
    ('full 32k', 8, 32, 8, 32768, None, 0),
    ('window 256 + 4', 8, 32, 8, 260, 256, 4),
]
LAYERS = 4


def seconds_per_step(step, q, *args, steps: int, repeats: int) -> float:
  """Seconds per call of step(q, *args) -> out, `steps` of them chained in one jitted fori_loop."""
  @jax.jit
  def loop(q, *args):
    def body(_, q):
      out = step(q, *args)
      # The next query depends on this output (0 * a float is not folded by XLA), so the steps run in sequence.
      return q + (out[:1, :1, :1, :1] * 0).astype(q.dtype)
    return jax.lax.fori_loop(0, steps, body, q)

  jax.block_until_ready(loop(q, *args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(loop(q, *args))
    times.append((time.perf_counter() - start) / steps)
  return statistics.median(times)


def copy_rate(gib: float = 1.0, repeats: int = 5) -> float:
  """Bytes per second of a jitted x + 1 over `gib` GiB of bf16 (bytes read plus bytes written)."""
  x = jnp.zeros((int(gib * 2 ** 30) // 2,), jnp.bfloat16)
  add = jax.jit(lambda x: x + 1)
  jax.block_until_ready(add(x))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(add(x))
    times.append(time.perf_counter() - start)
  return 2 * x.size * x.dtype.itemsize / statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--head_dim', type=int, default=128)
  parser.add_argument('--steps', type=int, default=64, help='decode calls chained in one jitted loop')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--copy_gib', type=float, default=1.0, help='size of the copy-rate measurement')
  parser.add_argument('--cases', default='', help='comma list of case names (default: all)')
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results', 'decode_attention.json'))
  args = parser.parse_args()
  peak = copy_rate(args.copy_gib)
  wanted = set(args.cases.split(',')) if args.cases else None
  rows = []
  for name, b, n, kv, s, window, num_global in CASES:
    if wanted and name not in wanted:
      continue
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, 1, n, args.head_dim), jnp.bfloat16)
    k, v = (jax.random.normal(key, (LAYERS, b, s, kv, args.head_dim), jnp.bfloat16) for key in keys[1:])
    k_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    q_pos = jnp.full((b, 1), s - 1, jnp.int32)
    seg_q, seg_k = jnp.ones((b, 1), jnp.int32), jnp.ones((b, s), jnp.int32)
    layer = jnp.int32(LAYERS - 2)
    kw = dict(window=window, num_global=num_global)
    steps = {
        'pallas': lambda q, k, v, layer: sparse_decode_attention(q, k, v, q_pos, k_pos, seg_q, seg_k, layer=layer,
                                                                 **kw),
        'reference': lambda q, k, v, layer: sparse_attention_reference(q, k[layer], v[layer], q_pos, k_pos, seg_q,
                                                                       seg_k, **kw),
    }
    steps['floor'] = lambda q, k, v, layer: q  # the loop alone: the least any step can read
    row = {'case': name, 'cache_len': s, 'batch': b, 'heads': n, 'kv_heads': kv}
    for impl, step in steps.items():
      row[f'{impl}_us'] = 1e6 * seconds_per_step(step, q, k, v, layer, steps=args.steps, repeats=args.repeats)
    kv_bytes = 2 * b * s * kv * args.head_dim * 2  # one layer's K and V, bf16
    row['pallas_GBps'] = kv_bytes / (row['pallas_us'] * 1e-6) / 1e9
    row['copy_GBps'] = peak / 1e9
    row['fraction_of_copy'] = row['pallas_GBps'] / row['copy_GBps']
    rows.append(row)
    print(json.dumps(row), flush=True)
  print(f'\ndevice: {jax.devices()[0].device_kind}; copy rate {peak / 1e9:.0f} GB/s (read + write)')
  print(f'{"case":>16} {"pallas us":>10} {"reference us":>13} {"K+V GB/s":>9} {"of copy":>8} {"floor us":>9}')
  for r in rows:
    print(f'{r["case"]:>16} {r["pallas_us"]:10.1f} {r["reference_us"]:13.1f} {r["pallas_GBps"]:9.0f} '
          f'{r["fraction_of_copy"]:8.1%} {r["floor_us"]:9.1f}')
  write_results(args.out, rows, head_dim=args.head_dim, steps=args.steps, copy_GBps=peak / 1e9, layers=LAYERS)


if __name__ == '__main__':
  main()
