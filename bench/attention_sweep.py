"""Launch-settings sweep of the Triton sparse-attention kernels: block sizes, warps and pipeline stages.

  python bench/attention_sweep.py [--shape=4x16x4096] [--windows=none,1024] [--blocks=64x64,128x64,64x128,128x128]
                                  [--warps=4,8] [--stages=1,2,3] [--out=bench/results/attention_sweep.json]

bf16, head_dim 128 (`--head_dim`), one document per row. For every (window, block_q x block_k, num_warps,
num_stages) the forward and forward+backward are timed as in bench/attention.py (`time_calls`: bursts of calls
waited on once); a setting that does not compile or run (shared memory, registers) is recorded with its error.
The table lists TFLOP/s on unmasked work; the summary names the fastest setting per window and pass, with its
ratio to the current default (the `gpu.TILES` entry for this head_dim, bf16 and mask kind, or 64 x 64 tiles with
Pallas' default warps and stages where the table has none), and prints the `gpu.TILES` entries the fastest
forward+backward settings suggest: that table is unmeasured until this sweep runs on the target GPU. Writes JSON.
`--decode=BxNxKxS` (e.g. 8x32x8x4096) also times the Triton decode kernel (one new token, forward only) over
`--decode_blocks` x warps x stages and prints the `decode.DECODE_TILES` entry of the fastest.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.attention import (  # pylint: disable=g-import-not-at-top
    inputs, time_calls, timed_row, visible_pairs, write_results)
from pallas_kernels.sparse_attention import decode, gpu, sparse_attention, sparse_decode_attention

KEYS = ('block_q', 'block_k', 'num_warps', 'num_stages')


def default_setting(head_dim: int, window: int | None) -> dict:
  """The launch settings `sparse_attention` picks when given none (gpu.default_tiles)."""
  return dict(zip(KEYS, gpu.default_tiles(head_dim, jnp.bfloat16, window)))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--shape', default='4x16x4096', help='batch x heads x seq')
  parser.add_argument('--windows', default='none,1024')
  parser.add_argument('--head_dim', type=int, default=128)
  parser.add_argument('--blocks', default='64x64,128x64,64x128,128x128', help='block_q x block_k, comma list')
  parser.add_argument('--warps', default='4,8')
  parser.add_argument('--stages', default='1,2,3')
  parser.add_argument('--decode', default='', help='B x N x K x S of a decode sweep (empty: none)')
  parser.add_argument('--decode_blocks', default='32,64,128,256')
  parser.add_argument('--calls', type=int, default=10)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results', 'attention_sweep.json'))
  args = parser.parse_args()
  b, n, t = (int(x) for x in args.shape.split('x'))
  x = inputs(b, n, t, args.head_dim)
  grid = [dict(block_q=int(bq), block_k=int(bk), num_warps=int(w), num_stages=int(s))
          for (bq, bk), w, s in itertools.product([blocks.split('x') for blocks in args.blocks.split(',')],
                                                  args.warps.split(','), args.stages.split(','))]
  rows = []
  for window_text in args.windows.split(','):
    window = None if window_text == 'none' else int(window_text)
    flops = 4 * b * n * args.head_dim * visible_pairs(t, window, 0)
    default = default_setting(args.head_dim, window)
    for setting in [default] + grid:
      fn = lambda q, k, v, p, s, r, setting=setting: sparse_attention(q, k, v, p, p, s, s, window=window, **setting)
      rows.append(timed_row(fn, x, flops, args.calls, args.repeats, window=window_text, default=setting is default,
                            **setting))

  best = []
  print(f'\ndevice: {jax.devices()[0].device_kind}; shape {args.shape} head_dim {args.head_dim}')
  print(f'{"window":>6} {"pass":>8} {"best tiles":>10} {"warps":>5} {"stages":>6} {"TFLOP/s":>8} {"vs default":>10}')
  for window_text, (pass_name, key) in itertools.product(args.windows.split(','),
                                                          (('fwd', 'fwd_ms'), ('fwd+bwd', 'fwd_bwd_ms'))):
    ok = [r for r in rows if r['window'] == window_text and 'error' not in r]
    default = [r for r in ok if r['default']]
    if not ok:
      continue
    top = min(ok, key=lambda r: r[key])
    ratio = default[0][key] / top[key] if default else float('nan')
    tflops = top['fwd_tflops' if pass_name == 'fwd' else 'fwd_bwd_tflops']
    best.append(dict(window=window_text, pass_=pass_name, speedup_vs_default=ratio, tflops=tflops,
                     **{k: top[k] for k in KEYS}))
    print(f'{window_text:>6} {pass_name:>8} {top["block_q"]:>4}x{top["block_k"]:<5} {str(top["num_warps"]):>5} '
          f'{str(top["num_stages"]):>6} {tflops:8.1f} {ratio:9.2f}x')
  print('\nsuggested gpu.TILES entries (fastest forward+backward):')
  for b_ in best:
    if b_['pass_'] == 'fwd+bwd':
      kind = 'causal' if b_['window'] == 'none' else 'window'
      print(f"    ({args.head_dim}, 'bfloat16', '{kind}'): {tuple(b_[k] for k in KEYS)},")
  if args.decode:
    rows += decode_sweep(args)
  write_results(args.out, rows, best=best, shape=args.shape, head_dim=args.head_dim)


def decode_sweep(args) -> list[dict]:
  """ms per decode step (bf16, one token, full cache) per (block_k, num_warps, num_stages); prints the best."""
  b, n, k, s = (int(x) for x in args.decode.split('x'))
  keys = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(keys[0], (b, 1, n, args.head_dim), jnp.bfloat16)
  kc, vc = (jax.random.normal(key, (b, s, k, args.head_dim), jnp.bfloat16) for key in keys[1:])
  kp, ks = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)), jnp.ones((b, s), jnp.int32)
  qp, qs = jnp.full((b, 1), s, jnp.int32), jnp.ones((b, 1), jnp.int32)
  rows = []
  for bk, w, st in [(None, None, None)] + list(itertools.product(
      [int(x) for x in args.decode_blocks.split(',')], [int(x) for x in args.warps.split(',')],
      [int(x) for x in args.stages.split(',')])):
    row = dict(decode=args.decode, block_k=bk, num_warps=w, num_stages=st, default=bk is None)
    fn = jax.jit(lambda q, kc, vc, bk=bk, w=w, st=st: sparse_decode_attention(
        q, kc, vc, qp, kp, qs, ks, block_k=bk, num_warps=w, num_stages=st))
    try:
      row['ms'] = 1e3 * time_calls(fn, q, kc, vc, calls=args.calls, repeats=args.repeats)
    except Exception as e:  # pylint: disable=broad-except
      row['error'] = f'{type(e).__name__}: {str(e)[:160]}'
    print(json.dumps(row), flush=True)
    rows.append(row)
  ok = [r for r in rows if 'ms' in r and not r['default']]
  if ok:
    top = min(ok, key=lambda r: r['ms'])
    ratio = next((r['ms'] for r in rows if r['default'] and 'ms' in r), float('nan')) / top['ms']
    print(f"\ndecode {args.decode}: fastest {top['ms']:.3f} ms ({ratio:.2f}x the default); suggested entry:\n"
          f"    ({args.head_dim}, 'bfloat16'): {(top['block_k'], top['num_warps'], top['num_stages'])},")
  return rows


if __name__ == '__main__':
  main()
