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
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.attention import inputs, timed_row, visible_pairs, write_results  # pylint: disable=g-import-not-at-top
from pallas_kernels.sparse_attention import gpu, sparse_attention

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
  write_results(args.out, rows, best=best, shape=args.shape, head_dim=args.head_dim)


if __name__ == '__main__':
  main()
