"""Pallas (Triton-style) block-sparse flash attention kernels: forward, dq, dk/dv.

All arrays here are already padded: T is a multiple of block_q and block_k, padded tokens have
segment -1. Shapes: q/do/o [B, T, N, H], k/v [B, T, K, H], positions/segments [B, T]
int32, lse/delta [B, N, T] float32, sched [B, nq, 4] int32 (see schedule.py), tsched [B, nk, 2] int32.
"""
from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# Lower through Triton explicitly: some jax versions otherwise pick Mosaic GPU for CUDA, which rejects these block
# shapes.
_TRITON = pltriton.CompilerParams()  # Pallas' Triton defaults

_F32 = jnp.float32


def _mask(qp, qs, kp, ks, window, num_global):
  """Exact visibility mask [bq, bk] from positions and segments of one query and one key block."""
  mask = (qs[:, None] == ks[None, :]) & (ks[None, :] != -1) & (kp[None, :] <= qp[:, None])
  if window is not None:
    local = (qp[:, None] - kp[None, :]) < window
    if num_global > 0:
      local = local | (kp[None, :] < num_global)
    mask = mask & local
  return mask


def _dot(a, b):
  return jnp.dot(a, b, preferred_element_type=_F32)


def _dot_t(a, b):
  """a @ b.T"""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=_F32)


def online_softmax_block(q, qp, qs, k_ref, v_ref, kpos_ref, kseg_ref, j, carry, *, scale, block_k, window,
                         num_global):
  """One flash-attention step over key block `j`: carry (acc [rows, H], max [rows], sum [rows]) in float32.

  Shared by the prefill forward kernel and the decode kernel (as a `fori_loop` body).
  """
  acc, m, l = carry
  sl = pl.ds(j * block_k, block_k)
  k = k_ref[sl, :]
  v = v_ref[sl, :]
  mask = _mask(qp, qs, kpos_ref[sl], kseg_ref[sl], window, num_global)
  s = jnp.where(mask, _dot_t(q, k) * scale, -jnp.inf)
  m_new = jnp.maximum(m, jnp.max(s, axis=-1))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  p = jnp.exp(s - m_safe[:, None])  # masked -> exp(-inf) = 0
  corr = jnp.exp(m - m_safe)  # m == -inf -> 0
  l = corr * l + jnp.sum(p, axis=-1)
  acc = corr[:, None] * acc + _dot(p.astype(v.dtype), v)
  return acc, m_new, l


def _fwd_kernel(sched_ref, q_ref, k_ref, v_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref,
                o_ref, lse_ref, *, scale, block_k, window, num_global):
  q = q_ref[...]
  qp = qpos_ref[...]
  qs = qseg_ref[...]
  bq, h = q.shape

  body = functools.partial(online_softmax_block, q, qp, qs, k_ref, v_ref, kpos_ref, kseg_ref, scale=scale,
                           block_k=block_k, window=window, num_global=num_global)
  carry = (jnp.zeros((bq, h), _F32), jnp.full((bq,), -jnp.inf, _F32), jnp.zeros((bq,), _F32))
  carry = lax.fori_loop(sched_ref[0], sched_ref[1], body, carry)  # global key blocks
  acc, m, l = lax.fori_loop(sched_ref[2], sched_ref[3], body, carry)  # local key blocks
  nonempty = l > 0
  l_safe = jnp.where(nonempty, l, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  # Rows with no visible key: any finite lse works (backward masks them out); use 0.
  lse_ref[...] = jnp.where(nonempty, m + jnp.log(l_safe), 0.0)


def _dq_kernel(sched_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, qseg_ref,
               kpos_ref, kseg_ref, dq_ref, *, scale, block_k, window, num_global):
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  qp = qpos_ref[...]
  qs = qseg_ref[...]

  def body(j, dq):
    sl = pl.ds(j * block_k, block_k)
    k = k_ref[sl, :]
    v = v_ref[sl, :]
    mask = _mask(qp, qs, kpos_ref[sl], kseg_ref[sl], window, num_global)
    s = _dot_t(q, k) * scale
    p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
    dp = _dot_t(do, v)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  dq = jnp.zeros(q.shape, _F32)
  dq = lax.fori_loop(sched_ref[0], sched_ref[1], body, dq)
  dq = lax.fori_loop(sched_ref[2], sched_ref[3], body, dq)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(tsched_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, qseg_ref,
                kpos_ref, kseg_ref, dk_ref, dv_ref, *, scale, block_q, window, num_global):
  k = k_ref[...]
  v = v_ref[...]
  kp = kpos_ref[...]
  ks = kseg_ref[...]

  def body(i, carry):
    dk, dv = carry
    sl = pl.ds(i * block_q, block_q)
    q = q_ref[sl, :]
    do = do_ref[sl, :]
    lse = lse_ref[sl]
    delta = delta_ref[sl]
    mask = _mask(qpos_ref[sl], qseg_ref[sl], kp, ks, window, num_global)
    s = _dot_t(q, k) * scale
    p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)  # [bq, bk]
    dv = dv + _dot(p.astype(do.dtype).T, do)
    dp = _dot_t(do, v)
    ds = p * (dp - delta[:, None])
    dk = dk + _dot(ds.astype(q.dtype).T, q)
    return dk, dv

  zeros = jnp.zeros(k.shape, _F32)
  dk, dv = lax.fori_loop(tsched_ref[0], tsched_ref[1], body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _row_spec(block, index_map):
  return pl.BlockSpec((None, block), index_map)


def _query_grid_specs(block_q, T, H, group):
  """BlockSpecs shared by the kernels whose grid is (batch, query block, query head): the forward and dq."""
  heads = pl.BlockSpec((None, block_q, None, H), lambda b, i, n: (b, i, n, 0))  # q, o, do, dq blocks
  return types.SimpleNamespace(
      sched=pl.BlockSpec((None, None, 4), lambda b, i, n: (b, i, 0)),
      heads=heads,
      kv=pl.BlockSpec((None, T, None, H), lambda b, i, n: (b, 0, n // group, 0)),  # the whole K or V row
      stats=pl.BlockSpec((None, None, block_q), lambda b, i, n: (b, n, i)),  # lse, delta
      q_rows=_row_spec(block_q, lambda b, i, n: (b, i)),  # query positions / segments
      k_rows=_row_spec(T, lambda b, i, n: (b, 0)))  # key positions / segments


def flash_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, sched, *, scale, block_q, block_k, window,
                  num_global, interpret):
  """Returns (out [B,T,N,H] q.dtype, lse [B,N,T] float32)."""
  B, T, N, H = q.shape
  K = k.shape[2]
  group = N // K
  nq = T // block_q
  kernel = functools.partial(_fwd_kernel, scale=scale, block_k=block_k, window=window,
                             num_global=num_global)
  spec = _query_grid_specs(block_q, T, H, group)
  return pl.pallas_call(
      kernel,
      compiler_params=_TRITON,
      grid=(B, nq, N),
      in_specs=[spec.sched, spec.heads, spec.kv, spec.kv, spec.q_rows, spec.q_rows, spec.k_rows, spec.k_rows],
      out_specs=[spec.heads, spec.stats],
      out_shape=[
          jax.ShapeDtypeStruct(q.shape, q.dtype),
          jax.ShapeDtypeStruct((B, N, T), _F32),
      ],
      interpret=interpret,
      name='sparse_attention_fwd',
  )(sched, q, k, v, q_pos, q_seg, k_pos, k_seg)


def flash_backward(q, k, v, q_pos, k_pos, q_seg, k_seg, sched, tsched, o, lse, do, *, scale,
                   block_q, block_k, window, num_global, interpret):
  """Returns (dq [B,T,N,H], dk [B,T,K,H], dv [B,T,K,H]) in the input dtypes."""
  B, T, N, H = q.shape
  K = k.shape[2]
  group = N // K
  nq, nk = T // block_q, T // block_k
  delta = jnp.einsum('btnh,btnh->bnt', o.astype(_F32), do.astype(_F32))  # rowsum(dO * O)
  do = do.astype(q.dtype)

  spec = _query_grid_specs(block_q, T, H, group)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, block_k=block_k, window=window,
                        num_global=num_global),
      compiler_params=_TRITON,
      grid=(B, nq, N),
      in_specs=[spec.sched, spec.heads, spec.kv, spec.kv, spec.heads, spec.stats, spec.stats, spec.q_rows,
                spec.q_rows, spec.k_rows, spec.k_rows],
      out_specs=spec.heads,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      interpret=interpret,
      name='sparse_attention_dq',
  )(sched, q, k, v, do, lse, delta, q_pos, q_seg, k_pos, k_seg)

  # dk/dv per query head (grid over query heads), summed over each GQA group below.
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, block_q=block_q, window=window,
                        num_global=num_global),
      compiler_params=_TRITON,
      grid=(B, nk, N),
      in_specs=[
          pl.BlockSpec((None, None, 2), lambda b, j, n: (b, j, 0)),
          pl.BlockSpec((None, T, None, H), lambda b, j, n: (b, 0, n, 0)),
          pl.BlockSpec((None, block_k, None, H), lambda b, j, n: (b, j, n // group, 0)),
          pl.BlockSpec((None, block_k, None, H), lambda b, j, n: (b, j, n // group, 0)),
          pl.BlockSpec((None, T, None, H), lambda b, j, n: (b, 0, n, 0)),
          pl.BlockSpec((None, None, T), lambda b, j, n: (b, n, 0)),
          pl.BlockSpec((None, None, T), lambda b, j, n: (b, n, 0)),
          _row_spec(T, lambda b, j, n: (b, 0)),
          _row_spec(T, lambda b, j, n: (b, 0)),
          _row_spec(block_k, lambda b, j, n: (b, j)),
          _row_spec(block_k, lambda b, j, n: (b, j)),
      ],
      out_specs=[
          pl.BlockSpec((None, block_k, None, H), lambda b, j, n: (b, j, n, 0)),
          pl.BlockSpec((None, block_k, None, H), lambda b, j, n: (b, j, n, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((B, T, N, H), _F32),
          jax.ShapeDtypeStruct((B, T, N, H), _F32),
      ],
      interpret=interpret,
      name='sparse_attention_dkv',
  )(tsched, q, k, v, do, lse, delta, q_pos, q_seg, k_pos, k_seg)
  dk = dk.reshape(B, T, K, group, H).sum(axis=3).astype(k.dtype)
  dv = dv.reshape(B, T, K, group, H).sum(axis=3).astype(v.dtype)
  return dq, dk, dv
