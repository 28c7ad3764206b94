"""Pallas (Triton-style) split-K decode attention over an unordered (ring-buffer) KV cache.

A few new query tokens (Tq, typically 1..8) attend to a cache of S slots. The cache may be in any
order (e.g. a ring buffer holding the `num_global + window` tokens a sparse model keeps) and empty
slots carry segment -1, so no block schedule is used: every key block is visited and masked exactly
with the same rule as the prefill kernels (`gpu._mask`).

Flash decoding: the grid is (batch, kv head, split). Each split covers a contiguous range of key
blocks of the (padded) cache and writes a partial (out, max, sum) in float32; `_combine` merges the
splits with the log-sum-exp rule. The G = N/K query heads of one kv head times Tq form the rows of
the query tile, so each K/V block is loaded once per kv head group. Forward only.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.sparse_attention.api import _validate
from pallas_kernels.sparse_attention.gpu import online_softmax_block

_F32 = jnp.float32
MIN_ROWS = 16  # Triton's tl.dot needs at least 16 rows on GPU.
MAX_SPLITS = 16


def default_num_splits(s, block_k=64):
  """Splits for a cache of `s` slots: ceil(s / (4 * block_k)) clipped to [1, MAX_SPLITS]."""
  return int(min(max(-(-s // (block_k * 4)), 1), MAX_SPLITS))


def _decode_kernel(q_ref, k_ref, v_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref, o_ref, m_ref, l_ref,
                   *, scale, block_k, window, num_global, softcap):
  q = q_ref[...]  # [R, H]: rows = (query head in group, token), padded rows have segment -1
  qp = qpos_ref[...]
  qs = qseg_ref[...]
  rows, h = q.shape
  num_blocks = k_ref.shape[0] // block_k

  body = functools.partial(online_softmax_block, q, qp, qs, k_ref, v_ref, kpos_ref, kseg_ref, scale=scale,
                           block_k=block_k, window=window, num_global=num_global, softcap=softcap)

  carry = (jnp.zeros((rows, h), _F32), jnp.full((rows,), -jnp.inf, _F32),
           jnp.zeros((rows,), _F32))
  acc, m, l = lax.fori_loop(0, num_blocks, body, carry)
  l_safe = jnp.where(l > 0, l, 1.0)
  o_ref[...] = acc / l_safe[:, None]  # normalised within the split; 0 for rows with nothing visible
  m_ref[...] = m  # -inf where this split has no visible key
  l_ref[...] = l


def decode_partials(q, k, v, q_pos, k_pos, q_seg, k_seg, *, num_splits, scale, block_k, window,
                    num_global, interpret, softcap=None):
  """Split-K kernel on padded, grouped inputs.

  q [B, K, R, H] (R rows per kv head), k/v [B, S, K, H] with S a multiple of block_k * num_splits,
  q_pos/q_seg [B, R], k_pos/k_seg [B, S]. Returns (out [B,K,P,R,H], max [B,K,P,R], sum [B,K,P,R])
  float32, P = num_splits; out is each split's softmax-normalised output.
  """
  B, K, R, H = q.shape
  S = k.shape[1]
  L = S // num_splits
  kernel = functools.partial(_decode_kernel, scale=scale, block_k=block_k, window=window,
                             num_global=num_global, softcap=softcap)
  row = pl.BlockSpec((None, R), lambda b, g, s: (b, 0))
  key = pl.BlockSpec((None, L), lambda b, g, s: (b, s))
  kv = pl.BlockSpec((None, L, None, H), lambda b, g, s: (b, s, g, 0))
  stat = pl.BlockSpec((None, None, None, R), lambda b, g, s: (b, g, s, 0))
  return pl.pallas_call(
      kernel,
      grid=(B, K, num_splits),
      in_specs=[
          pl.BlockSpec((None, None, R, H), lambda b, g, s: (b, g, 0, 0)),
          kv, kv, row, row, key, key,
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, R, H), lambda b, g, s: (b, g, s, 0, 0)),
          stat, stat,
      ],
      out_shape=[
          jax.ShapeDtypeStruct((B, K, num_splits, R, H), _F32),
          jax.ShapeDtypeStruct((B, K, num_splits, R), _F32),
          jax.ShapeDtypeStruct((B, K, num_splits, R), _F32),
      ],
      # Explicitly Triton: jax's default GPU lowering for pallas_call may be Mosaic GPU, which
      # rejects these small (per-row statistics) blocks.
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name='sparse_decode_attention',
  )(q, k, v, q_pos, q_seg, k_pos, k_seg)


def combine_splits(out, m, l):
  """Log-sum-exp merge over the split axis (-2 of m/l, -3 of out). Rows with nothing visible -> 0."""
  m_max = jnp.max(m, axis=-2, keepdims=True)
  m_max = jnp.where(m_max == -jnp.inf, 0.0, m_max)
  w = jnp.exp(m - m_max) * l  # [..., P, R]; 0 for empty splits
  total = jnp.sum(w, axis=-2)
  num = jnp.sum(w[..., None] * out, axis=-3)
  return num / jnp.where(total > 0, total, 1.0)[..., None]


def sparse_decode_attention(q, k_cache, v_cache, q_pos, k_pos, q_seg, k_seg, *, window=None,
                            num_global=0, scale=None, softcap=None, block_k=64, num_splits=None,
                            interpret=None):
  """Decode attention of a few new tokens against a (possibly unordered) KV cache.

  q [B, Tq, N, H]; k_cache/v_cache [B, S, K, H] (K | N); q_pos/q_seg [B, Tq], k_pos/k_seg [B, S]
  int32. Cache slots may be in any order; empty slots have segment -1. Key j is visible to query i
  iff q_seg == k_seg, k_seg != -1, k_pos <= q_pos and (window is None or q_pos - k_pos < window or
  k_pos < num_global) -- exactly `sparse_attention_reference` (including `softcap`). Softmax in float32, rows with no
  visible key give 0, output [B, Tq, N, H] in q.dtype. Forward only.

  num_splits: key splits (flash decoding); None -> `default_num_splits(S, block_k)`.
  interpret: None -> True unless the default backend is a GPU.
  """
  _validate(q, k_cache, v_cache, q_pos, k_pos, q_seg, k_seg, window, num_global, softcap)
  B, Tq, N, H = q.shape
  S, K = k_cache.shape[1], k_cache.shape[2]
  if S < 1 or Tq < 1:
    raise ValueError(f'need at least one query token and one cache slot; got Tq={Tq}, S={S}')
  if int(block_k) != block_k or block_k < 1:
    raise ValueError(f'block_k must be a positive int; got {block_k!r}')
  block_k = int(block_k)
  if num_splits is None:
    num_splits = default_num_splits(S, block_k)
  if int(num_splits) != num_splits or num_splits < 1:
    raise ValueError(f'num_splits must be None or a positive int; got {num_splits!r}')
  num_splits = int(num_splits)
  if scale is None:
    scale = 1.0 / math.sqrt(H)
  window = None if window is None else int(window)
  num_global = int(num_global)
  if interpret is None:
    interpret = jax.default_backend() != 'gpu'
  G = N // K

  # Query tile per kv head: rows r = g * Tq + t, padded to a power of two >= MIN_ROWS (segment -1).
  rows = G * Tq
  R = max(MIN_ROWS, 1 << (rows - 1).bit_length())
  qg = q.reshape(B, Tq, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, rows, H)
  qg = jnp.pad(qg, [(0, 0), (0, 0), (0, R - rows), (0, 0)])
  qp = jnp.pad(jnp.tile(q_pos.astype(jnp.int32), (1, G)), [(0, 0), (0, R - rows)])
  qs = jnp.pad(jnp.tile(q_seg.astype(jnp.int32), (1, G)), [(0, 0), (0, R - rows)],
               constant_values=-1)

  # Cache padded to a multiple of block_k * num_splits; padded slots have segment -1.
  chunk = block_k * num_splits
  Sp = -(-S // chunk) * chunk
  pad_s = [(0, 0), (0, Sp - S)]
  kc = jnp.pad(k_cache, pad_s + [(0, 0), (0, 0)])
  vc = jnp.pad(v_cache, pad_s + [(0, 0), (0, 0)])
  kp = jnp.pad(k_pos.astype(jnp.int32), pad_s)
  ks = jnp.pad(k_seg.astype(jnp.int32), pad_s, constant_values=-1)

  out, m, l = decode_partials(qg, kc, vc, qp, kp, qs, ks, num_splits=num_splits, scale=float(scale),
                              block_k=block_k, window=window, num_global=num_global,
                              interpret=bool(interpret), softcap=None if softcap is None else float(softcap))
  o = combine_splits(out, m, l)[:, :, :rows]  # [B, K, G*Tq, H]
  o = o.reshape(B, K, G, Tq, H).transpose(0, 3, 1, 2, 4).reshape(B, Tq, N, H)
  return o.astype(q.dtype)
