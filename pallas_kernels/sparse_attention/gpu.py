"""Pallas (Triton-style) block-sparse flash attention kernels: forward, dq, dk/dv.

All arrays here are already padded: T is a multiple of block_q and block_k, padded tokens have
segment -1. Shapes: q/do/o [B, T, N, H], k/v [B, T, K, H], key positions/segments [B, T] int32,
lse/delta [B, N, T] float32.

Query metadata comes in two forms. Shared: q_pos/q_seg [B, T], sched [B, nq, 4] and tsched [B, nk, 2]
(see schedule.py). Per query head: q_pos/q_seg [B, N, T], sched [B, N, nq, 4], tsched [B, N, nk, 2]; row c
of head n is then any token (routed attention compacts each head's selected tokens into the first rows),
while the keys are always all T tokens.
"""
from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_F32 = jnp.float32


def triton_params(num_warps: int | None = None, num_stages: int | None = None) -> pltriton.CompilerParams:
  """Triton compiler parameters (None: Pallas' defaults). Lowering through Triton explicitly: some jax versions
  otherwise pick Mosaic GPU for CUDA, which rejects these block shapes."""
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _mask(qp, qs, kp, ks, window, num_global):
  """Exact visibility mask [bq, bk] from positions and segments of one query and one key block."""
  mask = (qs[:, None] == ks[None, :]) & (ks[None, :] != -1) & (kp[None, :] <= qp[:, None])
  if window is not None:
    local = (qp[:, None] - kp[None, :]) < window
    if num_global > 0:
      local = local | (kp[None, :] < num_global)
    mask = mask & local
  return mask


def _logits(q, k, scale, softcap):
  """Scaled scores q @ k.T [rows, bk] float32, soft-capped to (-softcap, softcap) when softcap is set."""
  s = _dot_t(q, k) * scale
  return s if softcap is None else softcap * jnp.tanh(s / softcap)


def _softcap_grad(ds, s, softcap):
  """Chains ds (w.r.t. the capped scores s) through the cap: d/dx c*tanh(x/c) = 1 - (s/c)^2."""
  return ds if softcap is None else ds * (1.0 - jnp.square(s / softcap))


def _dot(a, b):
  return jnp.dot(a, b, preferred_element_type=_F32)


def _dot_t(a, b):
  """a @ b.T"""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=_F32)


def online_softmax_step(q, qp, qs, k, v, kp, ks, carry, *, scale, window, num_global, softcap=None):
  """One flash-attention step over a loaded key block (k, v [bk, H], positions/segments kp, ks [bk]): carry
  (acc [rows, H], max [rows], sum [rows]) in float32. Shared by the prefill forward kernel and the decode kernel."""
  acc, m, l = carry
  mask = _mask(qp, qs, kp, ks, window, num_global)
  s = jnp.where(mask, _logits(q, k, scale, softcap), -jnp.inf)
  m_new = jnp.maximum(m, jnp.max(s, axis=-1))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  p = jnp.exp(s - m_safe[:, None])  # masked -> exp(-inf) = 0
  corr = jnp.exp(m - m_safe)  # m == -inf -> 0
  l = corr * l + jnp.sum(p, axis=-1)
  acc = corr[:, None] * acc + _dot(p.astype(v.dtype), v)
  return acc, m_new, l


def online_softmax_block(q, qp, qs, k_ref, v_ref, kpos_ref, kseg_ref, j, carry, *, scale, block_k, window,
                         num_global, softcap=None):
  """`online_softmax_step` over key block `j` of whole-row refs (a `fori_loop` body)."""
  sl = pl.ds(j * block_k, block_k)
  return online_softmax_step(q, qp, qs, k_ref[sl, :], v_ref[sl, :], kpos_ref[sl], kseg_ref[sl], carry, scale=scale,
                             window=window, num_global=num_global, softcap=softcap)


def _fwd_kernel(sched_ref, q_ref, k_ref, v_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref,
                o_ref, lse_ref, *, scale, block_k, window, num_global, softcap):
  q = q_ref[...]
  qp = qpos_ref[...]
  qs = qseg_ref[...]
  bq, h = q.shape

  body = functools.partial(online_softmax_block, q, qp, qs, k_ref, v_ref, kpos_ref, kseg_ref, scale=scale,
                           block_k=block_k, window=window, num_global=num_global, softcap=softcap)
  carry = (jnp.zeros((bq, h), _F32), jnp.full((bq,), -jnp.inf, _F32), jnp.zeros((bq,), _F32))
  carry = lax.fori_loop(sched_ref[0], sched_ref[1], body, carry)  # global key blocks
  acc, m, l = lax.fori_loop(sched_ref[2], sched_ref[3], body, carry)  # local key blocks
  nonempty = l > 0
  l_safe = jnp.where(nonempty, l, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  # Rows with no visible key: any finite lse works (backward masks them out); use 0.
  lse_ref[...] = jnp.where(nonempty, m + jnp.log(l_safe), 0.0)


def _dq_kernel(sched_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, qseg_ref,
               kpos_ref, kseg_ref, dq_ref, *, scale, block_k, window, num_global, softcap):
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
    s = _logits(q, k, scale, softcap)
    p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
    dp = _dot_t(do, v)
    ds = _softcap_grad(p * (dp - delta[:, None]), s, softcap)
    return dq + _dot(ds.astype(k.dtype), k)

  dq = jnp.zeros(q.shape, _F32)
  dq = lax.fori_loop(sched_ref[0], sched_ref[1], body, dq)
  dq = lax.fori_loop(sched_ref[2], sched_ref[3], body, dq)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(tsched_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, qseg_ref,
                kpos_ref, kseg_ref, dk_ref, dv_ref, *, scale, block_q, window, num_global, softcap):
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
    s = _logits(q, k, scale, softcap)
    p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)  # [bq, bk]
    dv = dv + _dot(p.astype(do.dtype).T, do)
    dp = _dot_t(do, v)
    ds = _softcap_grad(p * (dp - delta[:, None]), s, softcap)
    dk = dk + _dot(ds.astype(q.dtype).T, q)
    return dk, dv

  zeros = jnp.zeros(k.shape, _F32)
  dk, dv = lax.fori_loop(tsched_ref[0], tsched_ref[1], body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _specs(per_head, block_q, block_k, T, H, group):
  """BlockSpecs for the three kernels. Forward and dq run on the grid (batch, query block i, query head n);
  dk/dv on (batch, key block j, query head n)."""
  if per_head:  # query metadata [B, N, T], schedules [B, N, nq|nk, w]
    sched = lambda w: pl.BlockSpec((None, None, None, w), lambda b, i, n: (b, n, i, 0))
    q_rows = pl.BlockSpec((None, None, block_q), lambda b, i, n: (b, n, i))
    q_all_rows = pl.BlockSpec((None, None, T), lambda b, j, n: (b, n, 0))
  else:  # query metadata [B, T], schedules [B, nq|nk, w]
    sched = lambda w: pl.BlockSpec((None, None, w), lambda b, i, n: (b, i, 0))
    q_rows = pl.BlockSpec((None, block_q), lambda b, i, n: (b, i))
    q_all_rows = pl.BlockSpec((None, T), lambda b, j, n: (b, 0))
  key_block = pl.BlockSpec((None, block_k, None, H), lambda b, j, n: (b, j, n // group, 0))
  query_grid = types.SimpleNamespace(
      sched=sched(4),
      heads=pl.BlockSpec((None, block_q, None, H), lambda b, i, n: (b, i, n, 0)),  # q, o, do, dq blocks
      kv=pl.BlockSpec((None, T, None, H), lambda b, i, n: (b, 0, n // group, 0)),  # the whole K or V row
      stats=pl.BlockSpec((None, None, block_q), lambda b, i, n: (b, n, i)),  # lse, delta
      q_rows=q_rows,
      k_rows=pl.BlockSpec((None, T), lambda b, i, n: (b, 0)))
  key_grid = types.SimpleNamespace(
      sched=sched(2),
      heads=pl.BlockSpec((None, T, None, H), lambda b, j, n: (b, 0, n, 0)),  # all of q / do for head n
      kv=key_block,
      stats=pl.BlockSpec((None, None, T), lambda b, j, n: (b, n, 0)),
      q_rows=q_all_rows,
      k_rows=pl.BlockSpec((None, block_k), lambda b, j, n: (b, j)),
      dkv=pl.BlockSpec((None, block_k, None, H), lambda b, j, n: (b, j, n, 0)))
  return query_grid, key_grid


def flash_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, sched, *, scale, block_q, block_k, window,
                  num_global, softcap, interpret, num_warps=None, num_stages=None):
  """Returns (out [B,T,N,H] q.dtype, lse [B,N,T] float32; lse is 0 on rows with no visible key)."""
  B, T, N, H = q.shape
  group = N // k.shape[2]
  kernel = functools.partial(_fwd_kernel, scale=scale, block_k=block_k, window=window,
                             num_global=num_global, softcap=softcap)
  spec, _ = _specs(q_pos.ndim == 3, block_q, block_k, T, H, group)
  return pl.pallas_call(
      kernel,
      compiler_params=triton_params(num_warps, num_stages),
      grid=(B, T // block_q, N),
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
                   block_q, block_k, window, num_global, softcap, interpret, num_warps=None, num_stages=None):
  """Returns (dq [B,T,N,H], dk [B,T,K,H], dv [B,T,K,H]) in the input dtypes."""
  B, T, N, H = q.shape
  K = k.shape[2]
  group = N // K
  delta = jnp.einsum('btnh,btnh->bnt', o.astype(_F32), do.astype(_F32))  # rowsum(dO * O)
  do = do.astype(q.dtype)
  mask_kw = dict(scale=scale, window=window, num_global=num_global, softcap=softcap)
  qs, ks = _specs(q_pos.ndim == 3, block_q, block_k, T, H, group)

  dq = pl.pallas_call(
      functools.partial(_dq_kernel, block_k=block_k, **mask_kw),
      compiler_params=triton_params(num_warps, num_stages),
      grid=(B, T // block_q, N),
      in_specs=[qs.sched, qs.heads, qs.kv, qs.kv, qs.heads, qs.stats, qs.stats, qs.q_rows, qs.q_rows, qs.k_rows,
                qs.k_rows],
      out_specs=qs.heads,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      interpret=interpret,
      name='sparse_attention_dq',
  )(sched, q, k, v, do, lse, delta, q_pos, q_seg, k_pos, k_seg)

  # dk/dv per query head (grid over query heads), summed over each GQA group below.
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, block_q=block_q, **mask_kw),
      compiler_params=triton_params(num_warps, num_stages),
      grid=(B, T // block_k, N),
      in_specs=[ks.sched, ks.heads, ks.kv, ks.kv, ks.heads, ks.stats, ks.stats, ks.q_rows, ks.q_rows, ks.k_rows,
                ks.k_rows],
      out_specs=[ks.dkv, ks.dkv],
      out_shape=[jax.ShapeDtypeStruct((B, T, N, H), _F32)] * 2,
      interpret=interpret,
      name='sparse_attention_dkv',
  )(tsched, q, k, v, do, lse, delta, q_pos, q_seg, k_pos, k_seg)
  dk = dk.reshape(B, T, K, group, H).sum(axis=3).astype(k.dtype)
  dv = dv.reshape(B, T, K, group, H).sum(axis=3).astype(v.dtype)
  return dq, dk, dv
