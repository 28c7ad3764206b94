"""Attention kernel benchmark: our Pallas kernels side by side with cuDNN, JAX's shipped Pallas GPU attention,
XLA and the pure-jnp reference, all in one run on one machine.

  python bench/attention.py [--shapes=8x16x2048,2x16x8192,1x16x32768] [--windows=none,1024]
                            [--routed=true] [--out=bench/results/attention.json]

bf16, head_dim 128, MHA, one document per row. For each batch x heads x seq and window ('none' = causal):
  pallas          pallas_kernels.sparse_attention (window, no global tokens: like for like with cuDNN)
  pallas+globals  the same with `--num_global` sink tokens (windowed rows only)
  routed k=N      pallas_kernels.routed_attention with every head active
  routed k=N/2    ... with half the heads active per token (uniform random routing)
  cudnn           jax.nn.dot_product_attention(implementation='cudnn'), local_window_size for windows (GPU)
  jax_pallas      jax.experimental.pallas.ops.gpu.attention.mha, causal only (GPU)
  xla             jax.nn.dot_product_attention(implementation='xla') (T x T memory; up to --max_dense_seq)
  reference       the dense jnp reference (up to --max_dense_seq)
Timing (`time_calls`): after a warm-up call, `--calls` calls are dispatched back to back and the device is waited
on once, so the fixed per-call cost of the host (dispatch, a block per call) overlaps the kernels instead of adding
to each; the per-call time is the median over `--repeats` such bursts. Each row also prints the floor: the same
measurement of an empty jitted call on the same arguments, the least any row could read. Forward and
forward+backward (gradients of q, k, v). TFLOP/s count only unmasked work: 4 * B * N * H * (visible query-key
pairs) for the forward (times k/N for routed), and 3.5x that for forward+backward (the backward's five matmuls
against the forward's two, FlashAttention's convention). The summary lists each implementation's time as a ratio to
cuDNN's, and routed k=N/2 to k=N. Prints a table and writes JSON (device name and date included).
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
from pallas_kernels.routed_attention import routed_attention  # pylint: disable=g-import-not-at-top
from pallas_kernels.sparse_attention import sparse_attention, sparse_attention_reference

BWD_FLOP_FACTOR = 3.5  # forward+backward FLOPs / forward FLOPs


def time_calls(fn, *args, calls: int = 20, repeats: int = 5) -> float:
  """Seconds per call of `fn(*args)`: the median over `repeats` bursts of `calls` calls dispatched back to back and
  waited on once (after a warm-up call that compiles)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = None
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / calls)
  return statistics.median(times)


def empty_call_floor(*args, calls: int = 20, repeats: int = 5) -> float:
  """`time_calls` of a jitted call that reads one element of its first argument: the per-call floor."""
  return time_calls(jax.jit(lambda x, *rest: x.reshape(-1)[:1] + 1), *args, calls=calls, repeats=repeats)


def write_results(path: str, rows: list[dict], **meta) -> None:
  """The JSON every bench script writes: device name, date, settings and the table's rows."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump({'device': jax.devices()[0].device_kind, 'date': datetime.date.today().isoformat(), **meta,
               'rows': rows}, f, indent=2)


def visible_pairs(t: int, window: int | None, num_global: int) -> int:
  """Query-key pairs the causal (window, num_global) mask keeps in one document of t tokens."""
  total = 0
  for i in range(t):
    local = i + 1 if window is None else min(i + 1, window)
    extra = 0 if window is None else max(0, min(num_global, i + 1 - window))
    total += local + extra
  return total


def inputs(b, n, t, h, dtype=jnp.bfloat16):
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(key, (b, t, n, h), dtype) for key in keys[:3])
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  seg = jnp.ones((b, t), jnp.int32)
  scores = jax.random.uniform(keys[3], (b, t, n))
  return q, k, v, pos, seg, scores


def half_heads_gates(scores):
  """Gates of uniform random top-(N/2) routing: 1 on the chosen heads, 0 elsewhere."""
  n = scores.shape[-1]
  kth = jnp.sort(scores, axis=-1)[..., n // 2][..., None]
  return (scores >= kth).astype(jnp.float32)


def implementations(window, num_global, head_dim, on_gpu, routed):
  """name -> (fn(q, k, v, pos, seg, scores), fraction of heads computed)."""
  kw = dict(window=window, num_global=0)
  impls = {'pallas': (lambda q, k, v, p, s, r: sparse_attention(q, k, v, p, p, s, s, **kw), 1.0)}
  if window is not None and num_global:
    impls['pallas+globals'] = (lambda q, k, v, p, s, r: sparse_attention(q, k, v, p, p, s, s, window=window,
                                                                         num_global=num_global), 1.0)
  if routed:
    impls['routed k=N'] = (lambda q, k, v, p, s, r: routed_attention(q, k, v, p, p, s, s, jnp.ones_like(r), **kw),
                           1.0)
    impls['routed k=N/2'] = (
        lambda q, k, v, p, s, r: routed_attention(q, k, v, p, p, s, s, half_heads_gates(r), **kw), 0.5)
  local = None if window is None else (window - 1, 0)
  if on_gpu:
    impls['cudnn'] = (lambda q, k, v, p, s, r: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, local_window_size=local, implementation='cudnn'), 1.0)
    if window is None:
      from jax.experimental.pallas.ops.gpu import attention as jax_pallas  # pylint: disable=g-import-not-at-top
      impls['jax_pallas'] = (lambda q, k, v, p, s, r: jax_pallas.mha(
          q, k, v, segment_ids=None, sm_scale=head_dim ** -0.5, causal=True), 1.0)
  impls['xla'] = (lambda q, k, v, p, s, r: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, local_window_size=local, implementation='xla'), 1.0)
  impls['reference'] = (lambda q, k, v, p, s, r: sparse_attention_reference(q, k, v, p, p, s, s, **kw), 1.0)
  return impls


def measure(fn, x, calls, repeats):
  """(forward ms, forward+backward ms) per call."""
  fwd = jax.jit(fn)
  loss = lambda q, k, v, *rest: fn(q, k, v, *rest).astype(jnp.float32).sum()
  fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  kw = dict(calls=calls, repeats=repeats)
  return 1e3 * time_calls(fwd, *x, **kw), 1e3 * time_calls(fwd_bwd, *x, **kw)


def timed_row(fn, x, flops: float, calls: int, repeats: int, **row) -> dict:
  """`row` with fn's forward and forward+backward ms and TFLOP/s on `flops` of forward work, or the error that
  stopped it (out of memory, a configuration the backend rejects), so a sweep reports it and goes on."""
  try:
    fwd_ms, fwd_bwd_ms = measure(fn, x, calls, repeats)
    row.update(fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms, fwd_tflops=flops / fwd_ms / 1e9,
               fwd_bwd_tflops=BWD_FLOP_FACTOR * flops / fwd_bwd_ms / 1e9)
  except Exception as e:  # pylint: disable=broad-except
    row['error'] = f'{type(e).__name__}: {str(e)[:160]}'
  print(json.dumps(row), flush=True)
  return row


def summary(rows):
  """Ratios within each (shape, window): time / cuDNN's, and routed k=N/2 / routed k=N."""
  out = []
  for key in sorted({(r['shape'], r['window']) for r in rows}, key=str):
    group = {r['impl']: r for r in rows if (r['shape'], r['window']) == key and 'error' not in r}
    for base, names in (('cudnn', [n for n in group if n != 'cudnn']), ('routed k=N', ['routed k=N/2'])):
      if base not in group:
        continue
      for name in names:
        if name in group:
          out.append(dict(shape=key[0], window=key[1], impl=name, vs=base,
                          fwd_ratio=group[name]['fwd_ms'] / group[base]['fwd_ms'],
                          fwd_bwd_ratio=group[name]['fwd_bwd_ms'] / group[base]['fwd_bwd_ms']))
  return out


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--shapes', default='8x16x2048,2x16x8192,1x16x32768', help='batch x heads x seq, comma list')
  parser.add_argument('--windows', default='none,1024', help="'none' (causal) or a window size, comma list")
  parser.add_argument('--num_global', type=int, default=4)
  parser.add_argument('--head_dim', type=int, default=128)
  parser.add_argument('--routed', default='true', choices=('true', 'false'), help='time routed attention too')
  parser.add_argument('--calls', type=int, default=20, help='calls per timed burst (one wait per burst)')
  parser.add_argument('--repeats', type=int, default=5, help='bursts; the median is reported')
  parser.add_argument('--max_dense_seq', type=int, default=8192, help='skip the T x T-memory xla/reference above')
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results', 'attention.json'))
  args = parser.parse_args()
  on_gpu = jax.default_backend() == 'gpu'
  rows = []
  for shape in args.shapes.split(','):
    b, n, t = (int(x) for x in shape.split('x'))
    x = inputs(b, n, t, args.head_dim)
    floor_ms = 1e3 * empty_call_floor(*x, calls=args.calls, repeats=args.repeats)
    for window_text in args.windows.split(','):
      window = None if window_text == 'none' else int(window_text)
      impls = implementations(window, args.num_global, args.head_dim, on_gpu, args.routed == 'true')
      for name, (fn, head_fraction) in impls.items():
        if name in ('xla', 'reference') and t > args.max_dense_seq:
          continue
        globals_ = args.num_global if name == 'pallas+globals' else 0
        flops = 4 * b * n * args.head_dim * visible_pairs(t, window, globals_) * head_fraction
        rows.append(timed_row(fn, x, flops, args.calls, args.repeats, shape=shape, window=window_text, impl=name,
                              floor_ms=floor_ms))
  print(f'\ndevice: {jax.devices()[0].device_kind}')
  print(f'{"shape":>12} {"window":>6} {"impl":>15} {"fwd ms":>9} {"TFLOP/s":>8} {"fwd+bwd ms":>11} {"TFLOP/s":>8} '
        f'{"floor ms":>9}')
  for r in rows:
    head = f'{r["shape"]:>12} {r["window"]:>6} {r["impl"]:>15}'
    if 'error' in r:
      print(f'{head} {r["error"]}')
    else:
      print(f'{head} {r["fwd_ms"]:9.3f} {r["fwd_tflops"]:8.1f} {r["fwd_bwd_ms"]:11.3f} {r["fwd_bwd_tflops"]:8.1f} '
            f'{r["floor_ms"]:9.3f}')
  ratios = summary(rows)
  if ratios:
    print(f'\n{"shape":>12} {"window":>6} {"impl":>15} {"vs":>11} {"fwd":>6} {"fwd+bwd":>8}  (time ratio)')
    for r in ratios:
      print(f'{r["shape"]:>12} {r["window"]:>6} {r["impl"]:>15} {r["vs"]:>11} {r["fwd_ratio"]:6.2f} '
            f'{r["fwd_bwd_ratio"]:8.2f}')
  write_results(args.out, rows, ratios=ratios, head_dim=args.head_dim, num_global=args.num_global, calls=args.calls,
                repeats=args.repeats)


if __name__ == '__main__':
  main()
