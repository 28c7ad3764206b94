"""Pallas (Triton-style) block-sparse flash attention kernels: forward, dq, dk/dv.

All arrays here are already padded: T is a multiple of block_q and block_k, padded tokens have
segment -1. Shapes: q/do/o [B, T, N, H], k/v [B, T, K, H], key positions/segments [B, T] int32,
lse/delta [B, N, T] float32 (natural log).

Scores are kept in base-2 units inside the kernels: q.k is multiplied once by scale * log2(e) (the soft-cap
multiplier absorbs log2(e) instead when a cap is set) and the online softmax uses exp2, which is what the GPU's
MUFU unit computes (exp is exp2 of a product); the log-sum-exp the forward returns and the backward reads is converted
at the row level (one multiply per row), so it stays a natural log for `merge_attention` and the other backends.

Key ranges: the schedule the GPU kernels take is sched [..., nq, 6] (g_lo, g_hi, l_lo, l_hi, f_lo, f_hi); a 4-column
schedule gets its full range (f_lo, f_hi) from edge_blocks.py here. Key blocks in [f_lo, f_hi) are visible to every
valid row of the query block at every key, so the kernels skip the element mask there; the global range and the rest
of the local range are edge blocks, masked. The dk/dv kernel does the same over query blocks (tsched [..., nk, 4]).

Backward: the dk/dv kernel runs one program per (batch, key block, kv head), loops the G = N / K query heads of its
group inside, and writes dk/dv once in the input dtype as [B, T, K, H]; it computes the transposed scores
S^T = K Q^T directly (see `flash_backward` for the matmul count).

Query metadata comes in two forms. Shared: q_pos/q_seg [B, T], sched [B, nq, 4|6] and tsched [B, nk, 2|4]
(see schedule.py). Per query head: q_pos/q_seg [B, N, T], sched [B, N, nq, 4|6], tsched [B, N, nk, 2|4]; row c
of head n is then any token (routed attention compacts each head's selected tokens into the first rows),
while the keys are always all T tokens.
"""
from __future__ import annotations

import functools
import math
import types

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.sparse_attention import edge_blocks

_F32 = jnp.float32
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


# Default launch settings per (head_dim, dtype, mask kind): (block_q, block_k, num_warps, num_stages). Mask kind is
# 'causal' (window None) or 'window'. Seeded from JAX's Triton flash kernel (jax.experimental.pallas.ops.gpu.
# attention: 128-row query tiles, 4 warps up to head_dim 64 and 8 above, 2 stages) with 64-key blocks, which keep
# the [block_q, block_k] float32 scores and the [block_q, H] accumulator in registers at head_dim 128 and waste
# less on the masked diagonal and window edges. NOT MEASURED: no GPU was lent when this table was written; refresh
# it from `bench/attention_sweep.py` (the `sweep` step of bench/device_check.py) on the target GPU. Shapes not in
# the table keep the previous defaults, FALLBACK_TILES (64 x 64, Pallas' default warps and stages).
TILES = {
    (64, 'bfloat16', 'causal'): (128, 64, 4, 2),
    (64, 'bfloat16', 'window'): (128, 64, 4, 2),
    (64, 'float16', 'causal'): (128, 64, 4, 2),
    (64, 'float16', 'window'): (128, 64, 4, 2),
    (128, 'bfloat16', 'causal'): (128, 64, 8, 2),
    (128, 'bfloat16', 'window'): (128, 64, 8, 2),
    (128, 'float16', 'causal'): (128, 64, 8, 2),
    (128, 'float16', 'window'): (128, 64, 8, 2),
}
FALLBACK_TILES = (64, 64, None, None)


def default_tiles(head_dim: int, dtype, window: int | None) -> tuple[int, int, int | None, int | None]:
  """(block_q, block_k, num_warps, num_stages) from TILES for this head_dim, dtype and mask kind, else
  FALLBACK_TILES."""
  key = (int(head_dim), jnp.dtype(dtype).name, 'causal' if window is None else 'window')
  return TILES.get(key, FALLBACK_TILES)


def triton_params(num_warps: int | None = None, num_stages: int | None = None) -> pltriton.CompilerParams:
  """Triton compiler parameters (None: Pallas' defaults). Lowering through Triton explicitly: some jax versions
  otherwise pick Mosaic GPU for CUDA, which rejects these block shapes."""
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _visible(qp, qs, kp, ks, window, num_global):
  """Visibility of broadcastable query (qp, qs) and key (kp, ks) positions/segments: True where the key is seen."""
  mask = (qs == ks) & (ks != -1) & (kp <= qp)
  if window is not None:
    local = (qp - kp) < window
    if num_global > 0:
      local = local | (kp < num_global)
    mask = mask & local
  return mask


def _mask(qp, qs, kp, ks, window, num_global):
  """Exact visibility mask [bq, bk] from positions and segments of one query and one key block."""
  return _visible(qp[:, None], qs[:, None], kp[None, :], ks[None, :], window, num_global)


def _mask_t(qp, qs, kp, ks, window, num_global):
  """The transposed mask [bk, bq] (keys on rows), built in that layout."""
  return _visible(qp[None, :], qs[None, :], kp[:, None], ks[:, None], window, num_global)


def _logits(q, k, scale, softcap):
  """Scores in base-2 units, log2(e) * s [rows, bk] float32, where s = scale * q @ k.T soft-capped to
  softcap * tanh(s / softcap) when softcap is set. The constants fold at trace time: one multiply per score."""
  qk = _dot_t(q, k)
  if softcap is None:
    return qk * (scale * LOG2E)
  return (softcap * LOG2E) * jnp.tanh(qk * (scale / softcap))


def _softcap_grad(ds, s2, softcap):
  """Chains ds (w.r.t. the capped scores s) through the cap: d/dx c*tanh(x/c) = 1 - (s/c)^2, with s2 = log2(e) * s
  the base-2 scores of `_logits`."""
  return ds if softcap is None else ds * (1.0 - jnp.square(s2 * (1.0 / (softcap * LOG2E))))


def _dot(a, b):
  return jnp.dot(a, b, preferred_element_type=_F32)


def _dot_t(a, b):
  """a @ b.T"""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=_F32)


def online_softmax_step(q, qp, qs, k, v, kp, ks, carry, *, scale, window, num_global, softcap=None, masked=True):
  """One flash-attention step over a loaded key block (k, v [bk, H], positions/segments kp, ks [bk]): carry
  (acc [rows, H], max [rows], sum [rows]) in float32, max in base-2 units (the row's natural-log max times log2(e);
  sum = sum of exp2(s2 - max)). Shared by the prefill forward kernel and the decode kernel.

  masked=False: a full block (every key visible to every row that matters), the element mask is not evaluated."""
  acc, m, l = carry
  s = _logits(q, k, scale, softcap)
  if masked:
    s = jnp.where(_mask(qp, qs, kp, ks, window, num_global), s, -jnp.inf)
  m_new = jnp.maximum(m, jnp.max(s, axis=-1))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  p = jnp.exp2(s - m_safe[:, None])  # masked -> exp2(-inf) = 0
  corr = jnp.exp2(m - m_safe)  # m == -inf -> 0
  l = corr * l + jnp.sum(p, axis=-1)
  acc = corr[:, None] * acc + _dot(p.astype(v.dtype), v)
  return acc, m_new, l


def online_softmax_block(q, qp, qs, k_ref, v_ref, kpos_ref, kseg_ref, j, carry, *, scale, block_k, window,
                         num_global, softcap=None, masked=True):
  """`online_softmax_step` over key block `j` of whole-row refs (a `fori_loop` body)."""
  sl = pl.ds(j * block_k, block_k)
  return online_softmax_step(q, qp, qs, k_ref[sl, :], v_ref[sl, :], kpos_ref[sl], kseg_ref[sl], carry, scale=scale,
                             window=window, num_global=num_global, softcap=softcap, masked=masked)


def _split_loops(lo, hi, f_lo, f_hi, masked_body, full_body, carry):
  """Runs [lo, f_lo) and [f_hi, hi) with the masked body and [f_lo, f_hi) with the unmasked one."""
  carry = lax.fori_loop(lo, f_lo, masked_body, carry)
  carry = lax.fori_loop(f_lo, f_hi, full_body, carry)
  return lax.fori_loop(f_hi, hi, masked_body, carry)


def _fwd_kernel(sched_ref, q_ref, k_ref, v_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref,
                o_ref, lse_ref, *, scale, block_k, window, num_global, softcap, masked_block_callback):
  q = q_ref[...]
  qp = qpos_ref[...]
  qs = qseg_ref[...]
  bq, h = q.shape

  step = functools.partial(online_softmax_block, q, qp, qs, k_ref, v_ref, kpos_ref, kseg_ref, scale=scale,
                           block_k=block_k, window=window, num_global=num_global, softcap=softcap)
  masked = step
  if masked_block_callback is not None:  # tests: report every (b, i, n, j) whose mask is evaluated
    ids = (pl.program_id(0), pl.program_id(1), pl.program_id(2))

    def masked(j, carry):
      jax.debug.callback(masked_block_callback, *ids, j)
      return step(j, carry)

  carry = (jnp.zeros((bq, h), _F32), jnp.full((bq,), -jnp.inf, _F32), jnp.zeros((bq,), _F32))
  carry = lax.fori_loop(sched_ref[0], sched_ref[1], masked, carry)  # global key blocks
  acc, m, l = _split_loops(sched_ref[2], sched_ref[3], sched_ref[4], sched_ref[5], masked,
                           functools.partial(step, masked=False), carry)  # local key blocks
  # Rows with segment -1 may have summed full blocks unmasked: they see nothing.
  nonempty = (l > 0) & (qs != -1)
  l_safe = jnp.where(nonempty, l, 1.0)
  o_ref[...] = jnp.where(nonempty[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
  # Natural log. Rows with no visible key: any finite lse works (backward masks them out); use 0.
  lse_ref[...] = jnp.where(nonempty, (m + jnp.log2(l_safe)) * LN2, 0.0)


def _dq_kernel(sched_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, qseg_ref,
               kpos_ref, kseg_ref, dq_ref, *, scale, block_k, window, num_global, softcap):
  q = q_ref[...]
  do = do_ref[...]
  lse2 = lse_ref[...] * LOG2E  # base 2, like the scores; +inf on rows with segment -1 (their p is 0)
  delta = delta_ref[...]
  qp = qpos_ref[...]
  qs = qseg_ref[...]

  def body(j, dq, masked=True):
    sl = pl.ds(j * block_k, block_k)
    k = k_ref[sl, :]
    v = v_ref[sl, :]
    s = _logits(q, k, scale, softcap)
    p = jnp.exp2(s - lse2[:, None])
    if masked:
      p = jnp.where(_mask(qp, qs, kpos_ref[sl], kseg_ref[sl], window, num_global), p, 0.0)
    dp = _dot_t(do, v)
    ds = _softcap_grad(p * (dp - delta[:, None]), s, softcap)
    return dq + _dot(ds.astype(k.dtype), k)

  dq = jnp.zeros(q.shape, _F32)
  dq = lax.fori_loop(sched_ref[0], sched_ref[1], body, dq)
  dq = _split_loops(sched_ref[2], sched_ref[3], sched_ref[4], sched_ref[5], body,
                    functools.partial(body, masked=False), dq)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(tsched_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, qseg_ref,
                kpos_ref, kseg_ref, dk_ref, dv_ref, *, scale, block_q, group, per_head, window, num_global, softcap):
  """dk, dv of one key block j [block_k, H] of kv head c, summed over the `group` query heads c * G .. c * G + G - 1
  in float32 registers and written once in the input dtype.

  Refs: k/v/dk/dv [block_k, H], key positions/segments [block_k]; q/do [T, G, H] (the group's query heads),
  lse/delta [G, T]; query positions/segments [T] (shared) or [G, T] (per head); tsched [4] (shared) or [G, 4]
  (per head: each head's own query-block ranges).

  Transposed scores: S^T = K Q^T [block_k, block_q] is computed directly, so P^T and dS^T come out in the layout
  that dv += P^T dO and dk += dS^T Q take as left operands, with no transpose of a [block_q, block_k] register tile.
  Matmuls per (query block, key block, head): 4, S^T = K Q^T, dP^T = V dO^T, dv += P^T dO, dk += dS^T Q."""
  k = k_ref[...]
  v = v_ref[...]
  kp = kpos_ref[...]
  ks = kseg_ref[...]

  def head(g, carry):
    def body(i, carry, masked=True):
      dk, dv = carry
      sl = pl.ds(i * block_q, block_q)
      q = q_ref[sl, g, :]
      do = do_ref[sl, g, :]
      lse2 = lse_ref[g, sl] * LOG2E  # +inf on rows with segment -1: p = 0 there, masked or not
      delta = delta_ref[g, sl]
      st = _logits(k, q, scale, softcap)  # S^T [bk, bq], base 2
      pt = jnp.exp2(st - lse2[None, :])
      if masked:
        qp, qs = (qpos_ref[g, sl], qseg_ref[g, sl]) if per_head else (qpos_ref[sl], qseg_ref[sl])
        pt = jnp.where(_mask_t(qp, qs, kp, ks, window, num_global), pt, 0.0)
      dv = dv + _dot(pt.astype(do.dtype), do)  # P^T dO [bk, H]
      dpt = _dot_t(v, do)  # dP^T = V dO^T [bk, bq]
      dst = _softcap_grad(pt * (dpt - delta[None, :]), st, softcap)
      dk = dk + _dot(dst.astype(q.dtype), q)  # dS^T Q [bk, H]
      return dk, dv

    r = (lambda c: tsched_ref[g, c]) if per_head else (lambda c: tsched_ref[c])
    return _split_loops(r(0), r(1), r(2), r(3), body, functools.partial(body, masked=False), carry)

  zeros = jnp.zeros(k.shape, _F32)
  dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _specs(per_head, block_q, block_k, T, H, group):
  """BlockSpecs for the three kernels. Forward and dq run on the grid (batch, query block i, query head n);
  dk/dv on (batch, key block j, kv head c), each program reading the group's G query heads c * G .. c * G + G - 1."""
  G = group
  if per_head:  # query metadata [B, N, T], schedules [B, N, nq|nk, w]
    sched = pl.BlockSpec((None, None, None, 6), lambda b, i, n: (b, n, i, 0))
    tsched = pl.BlockSpec((None, G, None, 4), lambda b, j, c: (b, c, j, 0))
    q_rows = pl.BlockSpec((None, None, block_q), lambda b, i, n: (b, n, i))
    q_all_rows = pl.BlockSpec((None, G, T), lambda b, j, c: (b, c, 0))
  else:  # query metadata [B, T], schedules [B, nq|nk, w]
    sched = pl.BlockSpec((None, None, 6), lambda b, i, n: (b, i, 0))
    tsched = pl.BlockSpec((None, None, 4), lambda b, j, c: (b, j, 0))
    q_rows = pl.BlockSpec((None, block_q), lambda b, i, n: (b, i))
    q_all_rows = pl.BlockSpec((None, T), lambda b, j, c: (b, 0))
  key_block = pl.BlockSpec((None, block_k, None, H), lambda b, j, c: (b, j, c, 0))
  query_grid = types.SimpleNamespace(
      sched=sched,
      heads=pl.BlockSpec((None, block_q, None, H), lambda b, i, n: (b, i, n, 0)),  # q, o, do, dq blocks
      kv=pl.BlockSpec((None, T, None, H), lambda b, i, n: (b, 0, n // group, 0)),  # the whole K or V row
      stats=pl.BlockSpec((None, None, block_q), lambda b, i, n: (b, n, i)),  # lse, delta
      q_rows=q_rows,
      k_rows=pl.BlockSpec((None, T), lambda b, i, n: (b, 0)))
  key_grid = types.SimpleNamespace(
      sched=tsched,
      heads=pl.BlockSpec((None, T, G, H), lambda b, j, c: (b, 0, c, 0)),  # all of q / do for the group's heads
      kv=key_block,  # k, v, dk, dv blocks
      stats=pl.BlockSpec((None, G, T), lambda b, j, c: (b, c, 0)),
      q_rows=q_all_rows,
      k_rows=pl.BlockSpec((None, block_k), lambda b, j, c: (b, j)))
  return query_grid, key_grid


def with_full_ranges(sched, q_pos, q_seg, k_pos, k_seg, *, block_q, block_k, window, num_global):
  """Appends the full-block range (f_lo, f_hi) of edge_blocks.py to a 4-column schedule: [..., nq, 4] ->
  [..., nq, 6]. A 6-column schedule is returned as is."""
  if sched.shape[-1] == 6:
    return sched
  full = edge_blocks.full_key_ranges(q_pos, q_seg, k_pos, k_seg, sched, block_q=block_q, block_k=block_k,
                                     window=window, num_global=num_global)
  return jnp.concatenate([sched, full], axis=-1).astype(jnp.int32)


def flash_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, sched, *, scale, block_q, block_k, window,
                  num_global, softcap, interpret, num_warps=None, num_stages=None, masked_block_callback=None):
  """Returns (out [B,T,N,H] q.dtype, lse [B,N,T] float32 natural log; lse is 0 on rows with no visible key).

  sched: [..., nq, 4] (schedule.py; the full ranges are added here) or [..., nq, 6] (`with_full_ranges`).
  masked_block_callback: for tests, a host function called as f(b, i, n, j) for every key block j whose element
  mask the program (batch b, query block i, head n) evaluates (interpret mode; adds a host callback per block).
  """
  B, T, N, H = q.shape
  group = N // k.shape[2]
  sched = with_full_ranges(sched, q_pos, q_seg, k_pos, k_seg, block_q=block_q, block_k=block_k, window=window,
                           num_global=num_global)
  kernel = functools.partial(_fwd_kernel, scale=scale, block_k=block_k, window=window,
                             num_global=num_global, softcap=softcap, masked_block_callback=masked_block_callback)
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
  """Returns (dq [B,T,N,H], dk [B,T,K,H], dv [B,T,K,H]) in the input dtypes.

  Two kernels. dq on the grid (batch, query block, query head): 3 matmuls per visited (query block, key block)
  pair, S = Q K^T, dP = dO V^T, dq += dS K. dk/dv on the grid (batch, key block, kv head), looping the G query
  heads of the kv head inside the program and accumulating in float32 registers: 4 matmuls per pair and head,
  S^T = K Q^T, dP^T = V dO^T, dv += P^T dO, dk += dS^T Q (the transposed products are computed directly, so no
  [block_q, block_k] tile is transposed in registers). So 7 matmuls per pair, against FlashAttention-2's 5
  distinct products (S, dP, dv, dk, dq): S and dP are computed twice because dq has its own kernel. Fusing dq into
  the dk/dv loop (FlashAttention-2) needs float32 atomic adds into a [B, T, N, H] dq buffer from every key-block
  program (non-deterministic summation order, an extra float32 buffer and a cast); the separate kernel keeps the
  backward deterministic and every output written once, for 2/7 more tensor-core work.

  sched as in `flash_forward`; tsched [..., nk, 2] (q_lo, q_hi) from `transpose_schedule`, or [..., nk, 4] with the
  full query-block run (fq_lo, fq_hi) of `edge_blocks.transpose_full_ranges` appended (added here when absent)."""
  B, T, N, H = q.shape
  K = k.shape[2]
  group = N // K
  sched = with_full_ranges(sched, q_pos, q_seg, k_pos, k_seg, block_q=block_q, block_k=block_k, window=window,
                           num_global=num_global)
  if tsched.shape[-1] == 2:
    tsched = jnp.concatenate([tsched, edge_blocks.transpose_full_ranges(sched, tsched, T // block_k)], axis=-1)
  # Rows with segment -1 get lse +inf: their probabilities are exp2(s - inf) = 0 in the unmasked loops too.
  lse = jnp.where((q_seg if q_pos.ndim == 3 else q_seg[:, None, :]) == -1, jnp.inf, lse)
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

  # dk/dv per kv head (grid over kv heads), summed over the GQA group inside the kernel.
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, block_q=block_q, group=group, per_head=q_pos.ndim == 3, **mask_kw),
      compiler_params=triton_params(num_warps, num_stages),
      grid=(B, T // block_k, K),
      in_specs=[ks.sched, ks.heads, ks.kv, ks.kv, ks.heads, ks.stats, ks.stats, ks.q_rows, ks.q_rows, ks.k_rows,
                ks.k_rows],
      out_specs=[ks.kv, ks.kv],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      interpret=interpret,
      name='sparse_attention_dkv',
  )(tsched, q, k, v, do, lse, delta, q_pos, q_seg, k_pos, k_seg)
  return dq, dk, dv
