"""Public entry point: `sparse_attention` with a custom VJP over the Pallas kernels."""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.sparse_attention import gpu
from pallas_kernels.sparse_attention.reference import sparse_attention_reference
from pallas_kernels.sparse_attention.schedule import make_schedule, transpose_schedule


class _Config(NamedTuple):
  window: int | None
  num_global: int
  scale: float
  block_q: int
  block_k: int
  interpret: bool


def _pad_len(t, block_q, block_k):
  m = block_q * block_k // math.gcd(block_q, block_k)
  return -(-t // m) * m


def _prepare(q, k, v, q_pos, k_pos, q_seg, k_seg, cfg):
  """Pad the sequence to a block multiple (padded tokens: segment -1, position 0); build schedules."""
  T = q.shape[1]
  Tp = _pad_len(T, cfg.block_q, cfg.block_k)
  pad = Tp - T

  def pad_seq(x, value=0):
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)

  arrays = (pad_seq(q), pad_seq(k), pad_seq(v), pad_seq(q_pos.astype(jnp.int32)),
            pad_seq(k_pos.astype(jnp.int32)), pad_seq(q_seg.astype(jnp.int32), -1),
            pad_seq(k_seg.astype(jnp.int32), -1))
  sched = make_schedule(arrays[3], arrays[5], block_q=cfg.block_q, block_k=cfg.block_k,
                        window=cfg.window, num_global=cfg.num_global)
  return arrays, sched


def _kw(cfg):
  return dict(scale=cfg.scale, block_q=cfg.block_q, block_k=cfg.block_k, window=cfg.window,
              num_global=cfg.num_global, interpret=cfg.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _sparse_attention_kernel(q, k, v, q_pos, k_pos, q_seg, k_seg, cfg):
  return _fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, cfg)[0]


def _fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, cfg):
  T = q.shape[1]
  arrays, sched = _prepare(q, k, v, q_pos, k_pos, q_seg, k_seg, cfg)
  out_p, lse = gpu.flash_forward(*arrays, sched, **_kw(cfg))
  res = (q, k, v, q_pos, k_pos, q_seg, k_seg, out_p, lse)
  return out_p[:, :T], res


def _bwd(cfg, res, do):
  q, k, v, q_pos, k_pos, q_seg, k_seg, out_p, lse = res
  T = q.shape[1]
  arrays, sched = _prepare(q, k, v, q_pos, k_pos, q_seg, k_seg, cfg)
  Tp = arrays[0].shape[1]
  tsched = transpose_schedule(sched, Tp // cfg.block_k)
  do_p = jnp.pad(do, [(0, 0), (0, Tp - T), (0, 0), (0, 0)])
  dq, dk, dv = gpu.flash_backward(*arrays, sched, tsched, out_p, lse, do_p, **_kw(cfg))
  return dq[:, :T], dk[:, :T], dv[:, :T], None, None, None, None


_sparse_attention_kernel.defvjp(_fwd, _bwd)


def _validate(q, k, v, q_pos, k_pos, q_seg, k_seg, window, num_global):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f'q, k, v must be 4-D [B, T, N, H] / [B, S, K, H]; got {q.shape}, {k.shape}, '
                     f'{v.shape}')
  B, T, N, H = q.shape
  if k.shape != v.shape:
    raise ValueError(f'k and v must have the same shape; got {k.shape} and {v.shape}')
  Bk, S, K, Hk = k.shape
  if Bk != B:
    raise ValueError(f'batch mismatch: q has {B}, k/v have {Bk}')
  if Hk != H:
    raise ValueError(f'head_dim mismatch: q has {H}, k/v have {Hk}')
  if K == 0 or N % K:
    raise ValueError(f'num kv heads K={K} must divide num query heads N={N}')
  for name, x, L in (('q_pos', q_pos, T), ('q_seg', q_seg, T), ('k_pos', k_pos, S),
                     ('k_seg', k_seg, S)):
    if tuple(x.shape) != (B, L):
      raise ValueError(f'{name} must have shape {(B, L)}; got {tuple(x.shape)}')
  if window is not None and (int(window) != window or window < 1):
    raise ValueError(f'window must be None or a positive int; got {window!r}')
  if int(num_global) != num_global or num_global < 0:
    raise ValueError(f'num_global must be a non-negative int; got {num_global!r}')


def sparse_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, *, window=None, num_global=0, scale=None,
                     block_q=64, block_k=64, backend=None, interpret=None):
  """Block-sparse attention. q [B,T,N,H], k/v [B,S,K,H] (K | N), positions/segments int32 [B,T]/[B,S].

  Key j is visible to query i iff q_seg == k_seg (segment -1 never matches), k_pos <= q_pos and
  (window is None or q_pos - k_pos < window or k_pos < num_global). Softmax in float32, rows with no
  visible key give 0, output in q.dtype.

  backend: 'gpu' (Pallas kernels; the default) or 'reference' (dense jnp). The kernel path is
  self-attention over packed rows: it needs S == T, and its block schedule assumes documents are
  contiguous runs with positions increasing by 1 (see schedule.py); the element mask itself is exact.
  interpret: None -> True unless the default backend is a GPU.
  """
  _validate(q, k, v, q_pos, k_pos, q_seg, k_seg, window, num_global)
  if scale is None:
    scale = 1.0 / math.sqrt(q.shape[-1])
  window = None if window is None else int(window)
  num_global = int(num_global)
  if backend is None:
    backend = 'gpu'
  if backend == 'reference':
    return sparse_attention_reference(q, k, v, q_pos, k_pos, q_seg, k_seg, window=window,
                                      num_global=num_global, scale=scale)
  if backend != 'gpu':
    raise ValueError(f"backend must be None, 'gpu' or 'reference'; got {backend!r}")
  if k.shape[1] != q.shape[1]:
    raise ValueError(f'the gpu kernel path is self-attention and needs S == T; got S={k.shape[1]}, '
                     f'T={q.shape[1]}')
  if block_q < 1 or block_k < 1:
    raise ValueError(f'block sizes must be positive; got block_q={block_q}, block_k={block_k}')
  if interpret is None:
    interpret = jax.default_backend() != 'gpu'
  cfg = _Config(window, num_global, float(scale), int(block_q), int(block_k), bool(interpret))
  return _sparse_attention_kernel(q, k, v, q_pos, k_pos, q_seg, k_seg, cfg)
