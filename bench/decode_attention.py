"""Decode attention benchmark: the Pallas split-K decode kernel vs the pure-jnp reference, side by side.

  python bench/decode_attention.py [--out=bench/results/decode_attention.json]

bf16, one new token per row against a KV cache: a long full cache (causal) and the bounded num_global + window
cache of sparse attention. Prints a table and writes JSON with the device name and date.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.attention import time_fn, write_results  # pylint: disable=g-import-not-at-top
from pallas_kernels.sparse_attention import sparse_attention_reference, sparse_decode_attention

CASES = [  # (name, batch, query heads, kv heads, cache length, window, num_global)
    ('full 4k', 8, 32, 8, 4096, None, 0),
    ('full 32k', 8, 32, 8, 32768, None, 0),
    ('window 256 + 4', 8, 32, 8, 260, 256, 4),
]


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--head_dim', type=int, default=128)
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results', 'decode_attention.json'))
  args = parser.parse_args()
  rows = []
  for name, b, n, kv, s, window, num_global in CASES:
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, 1, n, args.head_dim), jnp.bfloat16)
    k, v = (jax.random.normal(key, (b, s, kv, args.head_dim), jnp.bfloat16) for key in keys[1:])
    k_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    q_pos = jnp.full((b, 1), s - 1, jnp.int32)
    seg_q, seg_k = jnp.ones((b, 1), jnp.int32), jnp.ones((b, s), jnp.int32)
    kw = dict(window=window, num_global=num_global)
    row = {'case': name, 'cache_len': s}
    for impl, fn in (('pallas', sparse_decode_attention), ('reference', sparse_attention_reference)):
      f = jax.jit(lambda *a, fn=fn: fn(*a, **kw))
      row[f'{impl}_us'] = 1e6 * time_fn(f, q, k, v, q_pos, k_pos, seg_q, seg_k, repeats=50)
    # Bytes that must be read at least once: the K and V caches.
    row['pallas_cache_GBps'] = 2 * k.size * k.dtype.itemsize / (row['pallas_us'] * 1e-6) / 1e9
    rows.append(row)
    print(json.dumps(row), flush=True)
  print(f'\n{"case":>16} {"pallas us":>10} {"reference us":>13} {"cache GB/s":>11}')
  for r in rows:
    print(f'{r["case"]:>16} {r["pallas_us"]:10.1f} {r["reference_us"]:13.1f} {r["pallas_cache_GBps"]:11.0f}')
  write_results(args.out, rows, head_dim=args.head_dim)


if __name__ == '__main__':
  main()
