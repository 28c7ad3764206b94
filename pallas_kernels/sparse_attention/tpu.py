"""Mosaic TPU Pallas block-sparse flash attention kernels: forward, dq, dk/dv.

Same mathematics and calling convention as gpu.py, written in the style of JAX's splash attention: the
schedule (schedule.py) is scalar-prefetched into SMEM, the innermost "arbitrary" grid axis enumerates the
scheduled blocks, and the online-softmax state (or the gradient accumulators) live in VMEM scratch across
it. Inputs are padded (T a multiple of block_q and block_k, padded tokens have segment -1):
  q, o, do [B, T, N, H]; k, v [B, T, K, H] (K | N); k_pos, k_seg int32 [B, T];
  q_pos, q_seg int32 [B, T] with sched [B, nq, 4] and tsched [B, nk, 2] (shared query metadata), or
  [B, N, T] with sched [B, N, nq, 4] and tsched [B, N, nk, 2] (per query head: routed attention's
  compacted rows); lse float32 [B, N, T].

Grids (steps: a static upper bound on the blocks one row of the schedule visits, see the *_steps helpers):
  forward, dq  (B, N, nq, steps)        parallel, parallel, parallel, arbitrary
  dk/dv        (B, K, nk, group, steps) parallel, parallel, parallel, arbitrary, arbitrary
Step s of a row visits its s-th scheduled block and computes under `pl.when(s < count)`; the index maps of
the dead steps s >= count repeat the last live block index, so the pipeline issues no new DMA for them.
The dk/dv scratch accumulates over the GQA group and the query blocks, so dk/dv come out per kv head.

Layout (built by the wrappers): head-major q/o/do/dq [B, N, T, H] and k/v/dk/dv [B, K, T, H]. Per-query
rows are lane-dense and stacked in pairs: (q_pos, q_seg) int32 [B, Nq, 2, T] (Nq = 1 when shared, so they
are not copied per head) and (lse, delta) float32 [B, N, 2, T]; the forward and dq kernels turn a row of
their (2, bq) block into a [bq, 1] column, as splash's dq kernel does with its logsumexp. Key (k_pos,
k_seg) are broadcast over sublanes, [B, 2, 8, T] read as [1, bk] rows, in the forward and dq kernels, and
over lanes, [B, 2, T, 128] read as [bk, 1] columns, in the dk/dv kernel, which works on transposed
[bk, bq] scores so that its query rows need no relayout. The forward keeps m and l lane-replicated in
[bq, 128] scratch and writes lse the same way, [B, N, T, 128], as splash does; the wrapper keeps lane 0.

Real TPUs: block_q and block_k must be multiples of 128 (they are the lane dimensions of the (2, bq) and
(2, 8, bk) metadata blocks); H should be a multiple of 128 (any H is legal as a full-dimension block). The
prefetched schedules take B * Nq * (4 nq + 2 nk) int32 words of SMEM. Interpret mode accepts any block
sizes that divide T. No TPU was available while writing this, so the kernels have only been run in TPU
interpret mode on CPU; Mosaic compilation (layouts, relayouts, block shapes) is unverified.

The public API runs all three kernels on live-pair grids instead (flash_forward_pairs, flash_dq_pairs,
flash_dkv_pairs below, lists from live_pairs.py): grid (B, N, live pairs of the longest row), for dk/dv
(B, K, group * live pairs plus empty key blocks), the mask only on edge pairs. The per-block-row kernels above
(flash_forward, flash_backward) remain as the tested baseline of the schedule.py grids.
"""
from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.sparse_attention import live_pairs

_F32 = jnp.float32
_LANES = 128
_SUBLANES = 8
_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def forward_steps(T: int, *, block_q: int, block_k: int, window: int | None, num_global: int,
                  per_head: bool) -> int:
  """Static bound on the key blocks one query block visits: the forward/dq innermost grid size.

  With shared query metadata and a window, schedule.py's precondition (query row t is token t, documents
  are contiguous) bounds it: query block i sees local keys in [i*bq - window + 1, (i+1)*bq - 1], and only
  the document open at the block's first valid query adds global keys outside that range, a run of
  num_global tokens (a merged range is no longer than the two). Otherwise (causal only, or per-head
  compacted rows, which may span any tokens) it is nk. Blocks past the bound would be skipped silently, so
  shared metadata must meet the precondition (make_schedule's own does).
  """
  nq, nk = T // block_q, T // block_k
  if window is None or per_head:
    return nk
  local = max(((i + 1) * block_q - 1) // block_k - max(i * block_q - window + 1, 0) // block_k + 1
              for i in range(nq))
  runs = (num_global + 2 * block_k - 2) // block_k if num_global else 0  # blocks a run of G tokens touches
  return min(nk, local + runs)


def dkv_steps(T: int, *, block_q: int, block_k: int, window: int | None, num_global: int,
              per_head: bool) -> int:
  """Static bound on the query blocks that visit one key block: the dk/dv innermost grid size.

  Only a window without global tokens bounds it (shared metadata): key block j is visited by query blocks
  j*bk // bq .. ((j+1)*bk + window - 2) // bq. A global key block is visited by every query block of its
  document, so otherwise it is nq.
  """
  nq, nk = T // block_q, T // block_k
  if window is None or num_global or per_head:
    return nq
  return max(min(nq - 1, ((j + 1) * block_k + window - 2) // block_q) - j * block_k // block_q + 1
             for j in range(nk))


def sched_step(sched_ref, row, s) -> tuple[jax.Array, jax.Array]:
  """(key block, live) of step s of forward-schedule row `row` (sched flattened to [rows * 4])."""
  g_lo, g_hi = sched_ref[4 * row], sched_ref[4 * row + 1]
  l_lo, l_hi = sched_ref[4 * row + 2], sched_ref[4 * row + 3]
  n_g = g_hi - g_lo
  count = n_g + l_hi - l_lo
  t = jnp.minimum(s, jnp.maximum(count - 1, 0))  # dead steps repeat the last live block
  return jnp.where(t < n_g, g_lo + t, l_lo + t - n_g), s < count


def tsched_step(tsched_ref, row, s) -> tuple[jax.Array, jax.Array]:
  """(query block, live) of step s of transposed-schedule row `row` (tsched flattened to [rows * 2])."""
  q_lo, q_hi = tsched_ref[2 * row], tsched_ref[2 * row + 1]
  count = q_hi - q_lo
  return q_lo + jnp.minimum(s, jnp.maximum(count - 1, 0)), s < count


def _visible(qp, qs, kp, ks, window: int | None, num_global: int) -> jax.Array:
  """Exact visibility mask from broadcastable query ([bq, 1] or [1, bq]) and key metadata."""
  mask = (qs == ks) & (ks != -1) & (kp <= qp)
  if window is not None:
    near = (qp - kp) < window
    if num_global:
      near = near | (kp < num_global)
    mask = mask & near
  return mask


def _scores(a: jax.Array, b: jax.Array, scale: float,
            softcap: float | None) -> tuple[jax.Array, jax.Array | None]:
  """(scale * a @ b.T soft-capped, tanh factor or None) in float32; the factor is for the backward."""
  s = lax.dot_general(a, b, _NT, preferred_element_type=_F32) * scale
  if softcap is None:
    return s, None
  t = jnp.tanh(s / softcap)
  return softcap * t, t


def _uncap(ds: jax.Array, t: jax.Array | None) -> jax.Array:
  """Chain rule through softcap * tanh(s / softcap)."""
  return ds if t is None else ds * (1.0 - t * t)


def _column(ref, r: int) -> jax.Array:
  """Row r of a lane-dense (rows, bq) block as a [bq, 1] column (a lane-to-sublane relayout)."""
  return jnp.expand_dims(ref[r], -1)


def _fwd_mask(qrows_ref, krows_ref, window: int | None, num_global: int) -> jax.Array:
  """[bq, bk] visibility from (2, bq) query rows and (2, 8, bk) sublane-broadcast key rows."""
  return _visible(_column(qrows_ref, 0), _column(qrows_ref, 1), krows_ref[0, :1], krows_ref[1, :1], window,
                  num_global)


def _dkv_mask(qrows_ref, krows_ref, window: int | None, num_global: int) -> jax.Array:
  """Transposed [bk, bq] visibility from (2, bq) query rows and (2, bk, 128) lane-broadcast key columns."""
  return _visible(qrows_ref[0:1], qrows_ref[1:2], krows_ref[0, :, :1], krows_ref[1, :, :1], window, num_global)


# Kernel bodies shared by the per-query-block grids and the live-pair grids. `mask`: the block's [bq, bk] (dk/dv:
# transposed [bk, bq]) visibility, or None for a FULL pair that every row sees whole.

def _fwd_init(m_ref, l_ref, acc_ref) -> None:
  m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
  l_ref[...] = jnp.zeros_like(l_ref)
  acc_ref[...] = jnp.zeros_like(acc_ref)


def _fwd_step(q_ref, k_ref, v_ref, m_ref, l_ref, acc_ref, mask, *, scale, softcap) -> None:
  """One online-softmax update of the output accumulator with a key block."""
  sc = _scores(q_ref[...], k_ref[...], scale, softcap)[0]  # [bq, bk]
  if mask is not None:
    sc = jnp.where(mask, sc, -jnp.inf)
  m_prev = m_ref[...]  # [bq, 128], lane-replicated
  m_next = jnp.maximum(m_prev, jnp.max(sc, axis=-1, keepdims=True))
  # Rows with nothing visible yet keep -inf; a full block gives every row a key.
  m_safe = m_next if mask is None else jnp.where(m_next == -jnp.inf, 0.0, m_next)
  p = jnp.exp(sc - m_safe[:, :1])
  alpha = jnp.exp(m_prev - m_safe)
  m_ref[...] = m_next
  l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=-1, keepdims=True)
  pv = jnp.dot(p.astype(v_ref.dtype), v_ref[...], preferred_element_type=_F32)
  acc_ref[...] = alpha[:, :1] * acc_ref[...] + pv


def _fwd_finish(o_ref, lse_ref, m_ref, l_ref, acc_ref) -> None:
  l = l_ref[...]
  nonempty = l > 0
  l_safe = jnp.where(nonempty, l, 1.0)
  o_ref[...] = (acc_ref[...] / l_safe[:, :1]).astype(o_ref.dtype)
  # Rows with no visible key: output 0 and lse 0 (the backward masks them out).
  lse_ref[...] = jnp.where(nonempty, m_ref[...] + jnp.log(l_safe), 0.0)


def _dq_step(q_ref, k_ref, v_ref, do_ref, stats_ref, acc_ref, mask, *, scale, softcap) -> None:
  k = k_ref[...]
  sc, t = _scores(q_ref[...], k, scale, softcap)  # [bq, bk]
  p = jnp.exp(sc - _column(stats_ref, 0))
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  dp = lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=_F32)
  ds = _uncap(p * (dp - _column(stats_ref, 1)), t)
  acc_ref[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=_F32)


def _dkv_init(dk_acc, dv_acc) -> None:
  dk_acc[...] = jnp.zeros_like(dk_acc)
  dv_acc[...] = jnp.zeros_like(dv_acc)


def _dkv_step(q_ref, k_ref, v_ref, do_ref, stats_ref, dk_acc, dv_acc, mask, *, scale, softcap) -> None:
  q = q_ref[...]
  do = do_ref[...]
  # Transposed [bk, bq] scores: the query-side rows are used as lane vectors, no relayout.
  sc, t = _scores(k_ref[...], q, scale, softcap)
  p = jnp.exp(sc - stats_ref[0:1])
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  dv_acc[...] += jnp.dot(p.astype(do.dtype), do, preferred_element_type=_F32)
  dp = lax.dot_general(v_ref[...], do, _NT, preferred_element_type=_F32)
  ds = _uncap(p * (dp - stats_ref[1:2]), t)
  dk_acc[...] += jnp.dot(ds.astype(q.dtype), q, preferred_element_type=_F32)


def _dkv_finish(dk_ref, dv_ref, dk_acc, dv_acc, scale) -> None:
  dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _fwd_kernel(sched_ref, q_ref, k_ref, v_ref, qrows_ref, krows_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref,
                *, row_of, scale, softcap, window, num_global):
  b, n, i, s = (pl.program_id(a) for a in range(4))
  _, live = sched_step(sched_ref, row_of(b, n, i), s)

  pl.when(s == 0)(lambda: _fwd_init(m_ref, l_ref, acc_ref))
  pl.when(live)(lambda: _fwd_step(q_ref, k_ref, v_ref, m_ref, l_ref, acc_ref,
                                  _fwd_mask(qrows_ref, krows_ref, window, num_global), scale=scale, softcap=softcap))
  pl.when(s == pl.num_programs(3) - 1)(lambda: _fwd_finish(o_ref, lse_ref, m_ref, l_ref, acc_ref))


def _dq_kernel(sched_ref, q_ref, k_ref, v_ref, do_ref, stats_ref, qrows_ref, krows_ref, dq_ref, acc_ref, *,
               row_of, scale, softcap, window, num_global):
  b, n, i, s = (pl.program_id(a) for a in range(4))
  _, live = sched_step(sched_ref, row_of(b, n, i), s)

  @pl.when(s == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  pl.when(live)(lambda: _dq_step(q_ref, k_ref, v_ref, do_ref, stats_ref, acc_ref,
                                 _fwd_mask(qrows_ref, krows_ref, window, num_global), scale=scale, softcap=softcap))

  @pl.when(s == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(tsched_ref, q_ref, k_ref, v_ref, do_ref, stats_ref, qrows_ref, krows_ref, dk_ref, dv_ref,
                dk_acc, dv_acc, *, row_of, group, scale, softcap, window, num_global):
  b, h, j, g, s = (pl.program_id(a) for a in range(5))
  _, live = tsched_step(tsched_ref, row_of(b, h * group + g, j), s)

  pl.when((g == 0) & (s == 0))(lambda: _dkv_init(dk_acc, dv_acc))
  pl.when(live)(lambda: _dkv_step(q_ref, k_ref, v_ref, do_ref, stats_ref, dk_acc, dv_acc,
                                  _dkv_mask(qrows_ref, krows_ref, window, num_global), scale=scale, softcap=softcap))
  pl.when((g == pl.num_programs(3) - 1) & (s == pl.num_programs(4) - 1))(
      lambda: _dkv_finish(dk_ref, dv_ref, dk_acc, dv_acc, scale))


def _heads_major(x: jax.Array) -> jax.Array:
  """[B, T, N, H] <-> [B, N, T, H]."""
  return x.transpose(0, 2, 1, 3)


def _query_rows(q_pos: jax.Array, q_seg: jax.Array) -> jax.Array:
  """[B, T] or [B, N, T] each -> lane-dense int32 [B, 1 or N, 2, T] (positions, segments)."""
  rows = jnp.stack([q_pos, q_seg], axis=-2).astype(jnp.int32)
  return rows[:, None] if q_pos.ndim == 2 else rows


def _key_rows_sublanes(k_pos: jax.Array, k_seg: jax.Array) -> jax.Array:
  """[B, T] each -> [B, 2, 8, T] (positions, segments), broadcast over sublanes."""
  rows = jnp.stack([k_pos, k_seg], axis=1).astype(jnp.int32)[:, :, None, :]
  return jnp.broadcast_to(rows, (rows.shape[0], 2, _SUBLANES, rows.shape[-1]))


def _key_rows_lanes(k_pos: jax.Array, k_seg: jax.Array) -> jax.Array:
  """[B, T] each -> [B, 2, T, 128] (positions, segments), broadcast over lanes."""
  rows = jnp.stack([k_pos, k_seg], axis=1).astype(jnp.int32)[..., None]
  return jnp.broadcast_to(rows, (*rows.shape[:-1], _LANES))


def _row_of(num_heads: int, num_blocks: int, per_head: bool):
  """Flat schedule row of (batch, query head, block)."""
  if per_head:
    return lambda b, n, i: (b * num_heads + n) * num_blocks + i
  return lambda b, n, i: b * num_blocks + i


def _rows_head(per_head: bool):
  """Head index into the query-row array: n per head, 0 when shared."""
  return (lambda n: n) if per_head else (lambda n: 0)


def _interpret(interpret: bool):
  return pltpu.InterpretParams() if interpret else False


def _semantics(num_arbitrary: int, num_axes: int) -> pltpu.CompilerParams:
  return pltpu.CompilerParams(dimension_semantics=(pltpu.PARALLEL,) * (num_axes - num_arbitrary)
                              + (pltpu.ARBITRARY,) * num_arbitrary)


def _query_grid_specs(*, N: int, nq: int, H: int, group: int, block_q: int, block_k: int,
                      per_head: bool) -> types.SimpleNamespace:
  """BlockSpecs of the forward and dq kernels: grid (B, N, nq, steps), prefetched sched."""
  row_of = _row_of(N, nq, per_head)
  rows_head = _rows_head(per_head)

  def kv_block(b, n, i, s, sched_ref):
    return sched_step(sched_ref, row_of(b, n, i), s)[0]

  return types.SimpleNamespace(
      row_of=row_of,
      heads=pl.BlockSpec((None, None, block_q, H), lambda b, n, i, s, _: (b, n, i, 0)),  # q, o, do, dq
      kv=pl.BlockSpec((None, None, block_k, H),
                      lambda b, n, i, s, r: (b, lax.div(n, group), kv_block(b, n, i, s, r), 0)),
      q_rows=pl.BlockSpec((None, None, 2, block_q), lambda b, n, i, s, _: (b, rows_head(n), 0, i)),
      stats=pl.BlockSpec((None, None, 2, block_q), lambda b, n, i, s, _: (b, n, 0, i)),
      k_rows=pl.BlockSpec((None, 2, _SUBLANES, block_k),
                          lambda b, n, i, s, r: (b, 0, 0, kv_block(b, n, i, s, r))),
  )


def _key_grid_specs(*, N: int, nk: int, H: int, group: int, block_q: int, block_k: int,
                    per_head: bool) -> types.SimpleNamespace:
  """BlockSpecs of the dk/dv kernel: grid (B, K, nk, group, steps), prefetched tsched; query head
  n = h * group + g."""
  row_of = _row_of(N, nk, per_head)
  rows_head = _rows_head(per_head)

  def q_block(b, h, j, g, s, tsched_ref):
    return tsched_step(tsched_ref, row_of(b, h * group + g, j), s)[0]

  return types.SimpleNamespace(
      row_of=row_of,
      heads=pl.BlockSpec((None, None, block_q, H),
                         lambda b, h, j, g, s, r: (b, h * group + g, q_block(b, h, j, g, s, r), 0)),
      kv=pl.BlockSpec((None, None, block_k, H), lambda b, h, j, g, s, _: (b, h, j, 0)),  # k, v, dk, dv
      q_rows=pl.BlockSpec((None, None, 2, block_q),
                          lambda b, h, j, g, s, r: (b, rows_head(h * group + g), 0, q_block(b, h, j, g, s, r))),
      stats=pl.BlockSpec((None, None, 2, block_q),
                         lambda b, h, j, g, s, r: (b, h * group + g, 0, q_block(b, h, j, g, s, r))),
      k_rows=pl.BlockSpec((None, 2, block_k, _LANES), lambda b, h, j, g, s, _: (b, 0, j, 0)),
  )


def flash_forward(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
                  q_seg: jax.Array, k_seg: jax.Array, sched: jax.Array, *, scale: float, block_q: int,
                  block_k: int, window: int | None, num_global: int, softcap: float | None,
                  interpret: bool) -> tuple[jax.Array, jax.Array]:
  """Returns (out [B, T, N, H] q.dtype, lse [B, N, T] float32)."""
  B, T, N, H = q.shape
  nq = T // block_q
  per_head = q_pos.ndim == 3
  steps = forward_steps(T, block_q=block_q, block_k=block_k, window=window, num_global=num_global,
                        per_head=per_head)
  spec = _query_grid_specs(N=N, nq=nq, H=H, group=N // k.shape[2], block_q=block_q, block_k=block_k,
                           per_head=per_head)
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, row_of=spec.row_of, scale=scale, softcap=softcap, window=window,
                        num_global=num_global),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(B, N, nq, steps),
          in_specs=[spec.heads, spec.kv, spec.kv, spec.q_rows, spec.k_rows],
          out_specs=[spec.heads,
                     pl.BlockSpec((None, None, block_q, _LANES), lambda b, n, i, s, _: (b, n, i, 0))],
          scratch_shapes=[pltpu.VMEM((block_q, _LANES), _F32), pltpu.VMEM((block_q, _LANES), _F32),
                          pltpu.VMEM((block_q, H), _F32)],
      ),
      out_shape=[jax.ShapeDtypeStruct((B, N, T, H), q.dtype), jax.ShapeDtypeStruct((B, N, T, _LANES), _F32)],
      compiler_params=_semantics(1, 4),
      interpret=_interpret(interpret),
      name='sparse_attention_fwd',
  )(sched.reshape(-1), _heads_major(q), _heads_major(k), _heads_major(v), _query_rows(q_pos, q_seg),
    _key_rows_sublanes(k_pos, k_seg))
  return _heads_major(out), lse[..., 0]


def flash_backward(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
                   q_seg: jax.Array, k_seg: jax.Array, sched: jax.Array, tsched: jax.Array, o: jax.Array,
                   lse: jax.Array, do: jax.Array, *, scale: float, block_q: int, block_k: int,
                   window: int | None, num_global: int, softcap: float | None,
                   interpret: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Returns (dq [B, T, N, H], dk [B, T, K, H], dv [B, T, K, H]) in the input dtypes."""
  B, T, N, H = q.shape
  K = k.shape[2]
  group = N // K
  nq, nk = T // block_q, T // block_k
  per_head = q_pos.ndim == 3
  delta = jnp.einsum('btnh,btnh->bnt', o.astype(_F32), do.astype(_F32))  # rowsum(dO * O)
  stats = jnp.stack([lse, delta], axis=2)  # [B, N, 2, T]
  qh, kh, vh, doh = _heads_major(q), _heads_major(k), _heads_major(v), _heads_major(do.astype(q.dtype))
  q_rows = _query_rows(q_pos, q_seg)
  bounds = dict(block_q=block_q, block_k=block_k, window=window, num_global=num_global, per_head=per_head)
  kw = dict(scale=scale, softcap=softcap, window=window, num_global=num_global)
  shapes = dict(N=N, H=H, group=group, block_q=block_q, block_k=block_k, per_head=per_head)

  spec = _query_grid_specs(nq=nq, **shapes)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, row_of=spec.row_of, **kw),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(B, N, nq, forward_steps(T, **bounds)),
          in_specs=[spec.heads, spec.kv, spec.kv, spec.heads, spec.stats, spec.q_rows, spec.k_rows],
          out_specs=spec.heads,
          scratch_shapes=[pltpu.VMEM((block_q, H), _F32)],
      ),
      out_shape=jax.ShapeDtypeStruct((B, N, T, H), q.dtype),
      compiler_params=_semantics(1, 4),
      interpret=_interpret(interpret),
      name='sparse_attention_dq',
  )(sched.reshape(-1), qh, kh, vh, doh, stats, q_rows, _key_rows_sublanes(k_pos, k_seg))

  dk, dv = _dkv_call(qh, kh, vh, doh, stats, q_rows, k_pos, k_seg, tsched, T=T, nk=nk, bounds=bounds, kw=kw,
                     shapes=shapes, interpret=interpret)
  return _heads_major(dq), dk, dv


def _dkv_call(qh, kh, vh, doh, stats, q_rows, k_pos, k_seg, tsched, *, T, nk, bounds, kw, shapes, interpret):
  """The dk/dv kernel on head-major inputs (kh, vh [B, K, T, H]) -> (dk, dv) [B, T, K, H]."""
  B, K, _, H = kh.shape
  group, block_k = shapes['group'], shapes['block_k']
  spec = _key_grid_specs(nk=nk, **shapes)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, row_of=spec.row_of, group=group, **kw),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(B, K, nk, group, dkv_steps(T, **bounds)),
          in_specs=[spec.heads, spec.kv, spec.kv, spec.heads, spec.stats, spec.q_rows, spec.k_rows],
          out_specs=[spec.kv, spec.kv],
          scratch_shapes=[pltpu.VMEM((block_k, H), _F32), pltpu.VMEM((block_k, H), _F32)],
      ),
      out_shape=[jax.ShapeDtypeStruct((B, K, T, H), kh.dtype), jax.ShapeDtypeStruct((B, K, T, H), vh.dtype)],
      compiler_params=_semantics(2, 5),
      interpret=_interpret(interpret),
      name='sparse_attention_dkv',
  )(tsched.reshape(-1), qh, kh, vh, doh, stats, q_rows, _key_rows_lanes(k_pos, k_seg))
  return _heads_major(dk), _heads_major(dv)


# Live-pair kernels: the grid walks a flattened list of the live (query block, key block) pairs (live_pairs.py)
# instead of a static `steps` bound per query block, and full pairs skip the element mask.
#   forward, dq  (B, N, steps)  parallel, parallel, arbitrary; steps = the longest row's count (a traced scalar)
#   dk/dv        (B, K, steps)  parallel, parallel, arbitrary; the transposed lists (live_pairs.dkv_live_pairs)
# Entry p of row r = b (shared metadata) or b * N + n (per head; dk/dv: b * K + h) names the pair; the init runs
# on the first entry of a query block (dk/dv: of a key block), the finish on its last, DEAD entries (past the row's
# count) do nothing and repeat the last live pair's blocks, so the pipeline fetches nothing for them.


def _pair_row_of(num_heads: int, per_head: bool):
  """Flat pair-list row of (batch, query head)."""
  return (lambda b, n: b * num_heads + n) if per_head else (lambda b, n: b)


def _pair_entry(pairs_ref, row, p, capacity: int):
  """(query block, key block, kind, first, last) of entry p of row `row` (pairs flattened to [rows * P])."""
  return live_pairs.unpack(pairs_ref[row * capacity + p])


def _fwd_pairs_kernel(pairs_ref, q_ref, k_ref, v_ref, qrows_ref, krows_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref,
                      *, row_of, capacity, scale, softcap, window, num_global):
  b, n, p = (pl.program_id(a) for a in range(3))
  _, _, kind, first, last = _pair_entry(pairs_ref, row_of(b, n), p, capacity)
  alive = kind != live_pairs.DEAD

  def step(masked: bool):
    mask = _fwd_mask(qrows_ref, krows_ref, window, num_global) if masked else None
    _fwd_step(q_ref, k_ref, v_ref, m_ref, l_ref, acc_ref, mask, scale=scale, softcap=softcap)

  pl.when(alive & first)(lambda: _fwd_init(m_ref, l_ref, acc_ref))
  pl.when(kind == live_pairs.EDGE)(lambda: step(True))
  pl.when(kind == live_pairs.FULL)(lambda: step(False))
  pl.when(alive & last)(lambda: _fwd_finish(o_ref, lse_ref, m_ref, l_ref, acc_ref))


def _dq_pairs_kernel(pairs_ref, q_ref, k_ref, v_ref, do_ref, stats_ref, qrows_ref, krows_ref, dq_ref, acc_ref, *,
                     row_of, capacity, scale, softcap, window, num_global):
  b, n, p = (pl.program_id(a) for a in range(3))
  _, _, kind, first, last = _pair_entry(pairs_ref, row_of(b, n), p, capacity)
  alive = kind != live_pairs.DEAD

  @pl.when(alive & first)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  def step(masked: bool):
    mask = _fwd_mask(qrows_ref, krows_ref, window, num_global) if masked else None
    _dq_step(q_ref, k_ref, v_ref, do_ref, stats_ref, acc_ref, mask, scale=scale, softcap=softcap)

  pl.when(kind == live_pairs.EDGE)(lambda: step(True))
  pl.when(kind == live_pairs.FULL)(lambda: step(False))

  @pl.when(alive & last)
  def _finish():
    dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _pair_grid_specs(*, N: int, H: int, group: int, block_q: int, block_k: int, capacity: int,
                     per_head: bool) -> types.SimpleNamespace:
  """BlockSpecs of the live-pair forward and dq kernels: grid (B, N, steps), prefetched pairs."""
  row_of = _pair_row_of(N, per_head)
  rows_head = _rows_head(per_head)

  def blocks(b, n, p, pairs_ref):
    return _pair_entry(pairs_ref, row_of(b, n), p, capacity)[:2]

  return types.SimpleNamespace(
      row_of=row_of,
      heads=pl.BlockSpec((None, None, block_q, H), lambda b, n, p, r: (b, n, blocks(b, n, p, r)[0], 0)),
      kv=pl.BlockSpec((None, None, block_k, H),
                      lambda b, n, p, r: (b, lax.div(n, group), blocks(b, n, p, r)[1], 0)),
      q_rows=pl.BlockSpec((None, None, 2, block_q),
                          lambda b, n, p, r: (b, rows_head(n), 0, blocks(b, n, p, r)[0])),
      stats=pl.BlockSpec((None, None, 2, block_q), lambda b, n, p, r: (b, n, 0, blocks(b, n, p, r)[0])),
      k_rows=pl.BlockSpec((None, 2, _SUBLANES, block_k), lambda b, n, p, r: (b, 0, 0, blocks(b, n, p, r)[1])),
      lse=pl.BlockSpec((None, None, block_q, _LANES), lambda b, n, p, r: (b, n, blocks(b, n, p, r)[0], 0)),
  )


def flash_forward_pairs(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
                        q_seg: jax.Array, k_seg: jax.Array, pairs: live_pairs.LivePairs, *, scale: float,
                        block_q: int, block_k: int, window: int | None, num_global: int, softcap: float | None,
                        interpret: bool) -> tuple[jax.Array, jax.Array]:
  """flash_forward over the live pairs (live_pairs.live_pairs of the same metadata and settings).

  Returns (out [B, T, N, H] q.dtype, lse [B, N, T] float32)."""
  B, T, N, H = q.shape
  per_head = q_pos.ndim == 3
  capacity = pairs.pairs.shape[-1]
  spec = _pair_grid_specs(N=N, H=H, group=N // k.shape[2], block_q=block_q, block_k=block_k, capacity=capacity,
                          per_head=per_head)
  out, lse = pl.pallas_call(
      functools.partial(_fwd_pairs_kernel, row_of=spec.row_of, capacity=capacity, scale=scale, softcap=softcap,
                        window=window, num_global=num_global),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(B, N, pairs.steps),
          in_specs=[spec.heads, spec.kv, spec.kv, spec.q_rows, spec.k_rows],
          out_specs=[spec.heads, spec.lse],
          scratch_shapes=[pltpu.VMEM((block_q, _LANES), _F32), pltpu.VMEM((block_q, _LANES), _F32),
                          pltpu.VMEM((block_q, H), _F32)],
      ),
      out_shape=[jax.ShapeDtypeStruct((B, N, T, H), q.dtype), jax.ShapeDtypeStruct((B, N, T, _LANES), _F32)],
      compiler_params=_semantics(1, 3),
      interpret=_interpret(interpret),
      name='sparse_attention_fwd_pairs',
  )(pairs.pairs.reshape(-1), _heads_major(q), _heads_major(k), _heads_major(v), _query_rows(q_pos, q_seg),
    _key_rows_sublanes(k_pos, k_seg))
  return _heads_major(out), lse[..., 0]


def flash_dq_pairs(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
                   q_seg: jax.Array, k_seg: jax.Array, pairs: live_pairs.LivePairs, o: jax.Array, lse: jax.Array,
                   do: jax.Array, *, scale: float, block_q: int, block_k: int, window: int | None,
                   num_global: int, softcap: float | None, interpret: bool) -> jax.Array:
  """The dq kernel over the live pairs. Returns dq [B, T, N, H] in q.dtype."""
  B, T, N, H = q.shape
  per_head = q_pos.ndim == 3
  capacity = pairs.pairs.shape[-1]
  delta = jnp.einsum('btnh,btnh->bnt', o.astype(_F32), do.astype(_F32))  # rowsum(dO * O)
  stats = jnp.stack([lse, delta], axis=2)  # [B, N, 2, T]
  spec = _pair_grid_specs(N=N, H=H, group=N // k.shape[2], block_q=block_q, block_k=block_k, capacity=capacity,
                          per_head=per_head)
  dq = pl.pallas_call(
      functools.partial(_dq_pairs_kernel, row_of=spec.row_of, capacity=capacity, scale=scale, softcap=softcap,
                        window=window, num_global=num_global),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(B, N, pairs.steps),
          in_specs=[spec.heads, spec.kv, spec.kv, spec.heads, spec.stats, spec.q_rows, spec.k_rows],
          out_specs=spec.heads,
          scratch_shapes=[pltpu.VMEM((block_q, H), _F32)],
      ),
      out_shape=jax.ShapeDtypeStruct((B, N, T, H), q.dtype),
      compiler_params=_semantics(1, 3),
      interpret=_interpret(interpret),
      name='sparse_attention_dq_pairs',
  )(pairs.pairs.reshape(-1), _heads_major(q), _heads_major(k), _heads_major(v), _heads_major(do.astype(q.dtype)),
    stats, _query_rows(q_pos, q_seg), _key_rows_sublanes(k_pos, k_seg))
  return _heads_major(dq)



def _dkv_pairs_kernel(pairs_ref, q_ref, k_ref, v_ref, do_ref, stats_ref, qrows_ref, krows_ref, dk_ref, dv_ref,
                      dk_acc, dv_acc, *, row_of, capacity, scale, softcap, window, num_global):
  b, h, p = (pl.program_id(a) for a in range(3))
  _, _, kind, first, last = _pair_entry(pairs_ref, row_of(b, h), p, capacity)
  alive = kind != live_pairs.DEAD

  def step(masked: bool):
    mask = _dkv_mask(qrows_ref, krows_ref, window, num_global) if masked else None
    _dkv_step(q_ref, k_ref, v_ref, do_ref, stats_ref, dk_acc, dv_acc, mask, scale=scale, softcap=softcap)

  pl.when(alive & first)(lambda: _dkv_init(dk_acc, dv_acc))
  pl.when(kind == live_pairs.EDGE)(lambda: step(True))
  pl.when(kind == live_pairs.FULL)(lambda: step(False))
  pl.when(alive & last)(lambda: _dkv_finish(dk_ref, dv_ref, dk_acc, dv_acc, scale))


def _dkv_pair_grid_specs(*, K: int, nq: int, H: int, group: int, block_q: int, block_k: int, capacity: int,
                         per_head: bool) -> types.SimpleNamespace:
  """BlockSpecs of the live-pair dk/dv kernel: grid (B, K, steps), prefetched transposed pairs whose query field
  g * nq + i names query head h * group + g and query block i."""
  row_of = (lambda b, h: b * K + h) if per_head else (lambda b, h: b)
  rows_head = _rows_head(per_head)

  def blocks(b, h, p, pairs_ref):  # (query head, query block, key block)
    iq, j = _pair_entry(pairs_ref, row_of(b, h), p, capacity)[:2]
    return h * group + lax.div(iq, nq), lax.rem(iq, nq), j

  def at(fn):
    return lambda b, h, p, r: fn(b, h, *blocks(b, h, p, r))

  return types.SimpleNamespace(
      row_of=row_of,
      heads=pl.BlockSpec((None, None, block_q, H), at(lambda b, h, n, i, j: (b, n, i, 0))),  # q, do
      kv=pl.BlockSpec((None, None, block_k, H), at(lambda b, h, n, i, j: (b, h, j, 0))),  # k, v, dk, dv
      q_rows=pl.BlockSpec((None, None, 2, block_q), at(lambda b, h, n, i, j: (b, rows_head(n), 0, i))),
      stats=pl.BlockSpec((None, None, 2, block_q), at(lambda b, h, n, i, j: (b, n, 0, i))),
      k_rows=pl.BlockSpec((None, 2, block_k, _LANES), at(lambda b, h, n, i, j: (b, 0, j, 0))),
  )


def flash_dkv_pairs(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
                    q_seg: jax.Array, k_seg: jax.Array, pairs: live_pairs.LivePairs, o: jax.Array, lse: jax.Array,
                    do: jax.Array, *, scale: float, block_q: int, block_k: int, window: int | None,
                    num_global: int, softcap: float | None, interpret: bool) -> tuple[jax.Array, jax.Array]:
  """The dk/dv kernel over the transposed live pairs (live_pairs.dkv_live_pairs with group = N // K of the same
  metadata and settings): grid (B, K, steps), dk/dv summed over the GQA group's query heads and query blocks.

  Returns (dk, dv) [B, T, K, H] in k.dtype, v.dtype."""
  B, T, N, H = q.shape
  K = k.shape[2]
  per_head = q_pos.ndim == 3
  capacity = pairs.pairs.shape[-1]
  delta = jnp.einsum('btnh,btnh->bnt', o.astype(_F32), do.astype(_F32))  # rowsum(dO * O)
  stats = jnp.stack([lse, delta], axis=2)  # [B, N, 2, T]
  spec = _dkv_pair_grid_specs(K=K, nq=T // block_q, H=H, group=N // K, block_q=block_q, block_k=block_k,
                              capacity=capacity, per_head=per_head)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_pairs_kernel, row_of=spec.row_of, capacity=capacity, scale=scale, softcap=softcap,
                        window=window, num_global=num_global),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(B, K, pairs.steps),
          in_specs=[spec.heads, spec.kv, spec.kv, spec.heads, spec.stats, spec.q_rows, spec.k_rows],
          out_specs=[spec.kv, spec.kv],
          scratch_shapes=[pltpu.VMEM((block_k, H), _F32), pltpu.VMEM((block_k, H), _F32)],
      ),
      out_shape=[jax.ShapeDtypeStruct((B, K, T, H), k.dtype), jax.ShapeDtypeStruct((B, K, T, H), v.dtype)],
      compiler_params=_semantics(1, 3),
      interpret=_interpret(interpret),
      name='sparse_attention_dkv_pairs',
  )(pairs.pairs.reshape(-1), _heads_major(q), _heads_major(k), _heads_major(v), _heads_major(do.astype(q.dtype)),
    stats, _query_rows(q_pos, q_seg), _key_rows_lanes(k_pos, k_seg))
  return _heads_major(dk), _heads_major(dv)
