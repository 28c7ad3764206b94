"""Mosaic TPU Pallas block-sparse flash attention kernels: forward, dq, dk/dv over live block pairs.

Same mathematics and calling convention as gpu.py, written in the style of JAX's splash attention and
megablox: the grid walks a flattened list of the live (query block, key block) pairs (live_pairs.py),
scalar-prefetched into SMEM, so a dead pair costs no grid step; the online-softmax state (or the gradient
accumulators) live in VMEM scratch across a query block's (dk/dv: a key block's) entries. Inputs are padded (T a
multiple of block_q and block_k, padded tokens have segment -1):
  q, o, do [B, T, N, H]; k, v [B, T, K, H] (K | N); k_pos, k_seg int32 [B, T];
  q_pos, q_seg int32 [B, T] (shared query metadata: one pair list per batch row) or [B, N, T] (per query head:
  routed attention's compacted rows, one list per (batch row, query head)); lse float32 [B, N, T].

Grids (steps = the longest row's entry count, a traced scalar: Pallas TPU grids may be dynamic):
  forward, dq  (B, N, steps)  parallel, parallel, arbitrary
  dk/dv        (B, K, steps)  parallel, parallel, arbitrary; the transposed lists (live_pairs.dkv_live_pairs),
                              which sum dk/dv over the GQA group's query heads and query blocks
The init runs on the first entry of a query block (dk/dv: of a key block), the finish on its last; DEAD entries
(past a row's count) do nothing and repeat the last live pair's blocks, so the pipeline fetches nothing for them;
an EMPTY entry only initialises and writes (zero output, zero dk/dv); a FULL pair, which every row sees whole,
skips the element mask.

Wide key blocks with an inner compute loop (as splash's block_kv / block_kv_compute): a grid step holds a
block_k-wide key block (one DMA, one pair entry, one step overhead) and its body walks it in block_k_compute-wide
column chunks, so the [block_q, block_k_compute] float32 scores stay small; the forward updates its online
softmax per chunk. block_k_compute defaults to 128 when block_k is a multiple of 128, else block_k.

Layout (built by the wrappers): head-major q/o/do/dq [B, N, T, H] and k/v/dk/dv [B, K, T, H]. Per-query rows are
lane-dense and stacked in pairs: (q_pos, q_seg) int32 [B, Nq, 2, T] (Nq = 1 when shared, so they are not copied
per head) and (lse, delta) float32 [B, N, 2, T]; the forward and dq kernels turn a row of their (2, bq) block into
a [bq, 1] column, as splash's dq kernel does with its logsumexp. Key (k_pos, k_seg) are broadcast over sublanes,
[B, 2, 8, T] read as [1, bk] rows, in the forward and dq kernels, and over lanes, [B, 2, T, 128] read as [bk, 1]
columns, in the dk/dv kernel, which works on transposed [bk, bq] scores so that its query rows need no relayout.
The forward keeps m and l lane-replicated in [bq, 128] scratch and writes lse the same way, [B, N, T, 128], as
splash does; the wrapper keeps lane 0.

Real TPUs: block_q, block_k and block_k_compute must be multiples of 128 (lane dimensions of the metadata
blocks); H should be a multiple of 128 (any H is legal as a full-dimension block). The public API's default
(`api.tpu_block`) is the largest of 512, 256, 128 that divides T rounded up to 128. Interpret mode accepts any
block sizes that divide T. No TPU was available while writing this: the kernels have run in TPU interpret mode on
CPU and pass the Pallas TPU lowering; Mosaic's own compilation (layouts, VMEM use) is unverified.
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


def compute_chunk(block_k: int, block_k_compute: int | None = None) -> int:
  """The key columns one inner step computes: block_k_compute (must divide block_k), default 128 when block_k is
  a multiple of 128, else block_k."""
  if block_k_compute is None:
    return _LANES if block_k % _LANES == 0 else block_k
  if block_k_compute < 1 or block_k % block_k_compute:
    raise ValueError(f'block_k_compute={block_k_compute} must be a positive divisor of block_k={block_k}')
  return int(block_k_compute)


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


def _fwd_mask(qrows_ref, krows_ref, cols: slice, window: int | None, num_global: int) -> jax.Array:
  """[bq, chunk] visibility of key columns `cols` from (2, bq) query rows and (2, 8, bk) sublane-broadcast key
  rows."""
  return _visible(_column(qrows_ref, 0), _column(qrows_ref, 1), krows_ref[0, :1, cols], krows_ref[1, :1, cols],
                  window, num_global)


def _dkv_mask(qrows_ref, krows_ref, cols: slice, window: int | None, num_global: int) -> jax.Array:
  """Transposed [chunk, bq] visibility of key rows `cols` from (2, bq) query rows and (2, bk, 128)
  lane-broadcast key columns."""
  return _visible(qrows_ref[0:1], qrows_ref[1:2], krows_ref[0, cols, :1], krows_ref[1, cols, :1], window,
                  num_global)


def _chunks(block_k: int, chunk: int) -> list[slice]:
  """Static column slices of the inner compute loop (unrolled: a handful of chunks per key block)."""
  return [slice(c, c + chunk) for c in range(0, block_k, chunk)]


# Kernel bodies. `mask_of(cols)`: the [bq, chunk] (dk/dv: transposed [chunk, bq]) visibility of a chunk of the key
# block, or None for a FULL pair that every row sees whole.

def _fwd_init(m_ref, l_ref, acc_ref) -> None:
  m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
  l_ref[...] = jnp.zeros_like(l_ref)
  acc_ref[...] = jnp.zeros_like(acc_ref)


def _fwd_step(q_ref, k_ref, v_ref, m_ref, l_ref, acc_ref, mask_of, *, chunk, scale, softcap) -> None:
  """Online-softmax updates of the output accumulator with a key block, one column chunk at a time."""
  q = q_ref[...]
  for cols in _chunks(k_ref.shape[0], chunk):
    sc = _scores(q, k_ref[cols, :], scale, softcap)[0]  # [bq, chunk]
    if mask_of is not None:
      sc = jnp.where(mask_of(cols), sc, -jnp.inf)
    m_prev = m_ref[...]  # [bq, 128], lane-replicated
    m_next = jnp.maximum(m_prev, jnp.max(sc, axis=-1, keepdims=True))
    # Rows with nothing visible yet keep -inf; a full block gives every row a key.
    m_safe = m_next if mask_of is None else jnp.where(m_next == -jnp.inf, 0.0, m_next)
    p = jnp.exp(sc - m_safe[:, :1])
    alpha = jnp.exp(m_prev - m_safe)
    m_ref[...] = m_next
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=-1, keepdims=True)
    pv = jnp.dot(p.astype(v_ref.dtype), v_ref[cols, :], preferred_element_type=_F32)
    acc_ref[...] = alpha[:, :1] * acc_ref[...] + pv


def _fwd_finish(o_ref, lse_ref, m_ref, l_ref, acc_ref) -> None:
  l = l_ref[...]
  nonempty = l > 0
  l_safe = jnp.where(nonempty, l, 1.0)
  o_ref[...] = (acc_ref[...] / l_safe[:, :1]).astype(o_ref.dtype)
  # Rows with no visible key: output 0 and lse 0 (the backward masks them out).
  lse_ref[...] = jnp.where(nonempty, m_ref[...] + jnp.log(l_safe), 0.0)


def _dq_step(q_ref, k_ref, v_ref, do_ref, stats_ref, acc_ref, mask_of, *, chunk, scale, softcap) -> None:
  q, do = q_ref[...], do_ref[...]
  lse, delta = _column(stats_ref, 0), _column(stats_ref, 1)
  for cols in _chunks(k_ref.shape[0], chunk):
    k = k_ref[cols, :]
    sc, t = _scores(q, k, scale, softcap)  # [bq, chunk]
    p = jnp.exp(sc - lse)
    if mask_of is not None:
      p = jnp.where(mask_of(cols), p, 0.0)
    dp = lax.dot_general(do, v_ref[cols, :], _NT, preferred_element_type=_F32)
    ds = _uncap(p * (dp - delta), t)
    acc_ref[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=_F32)


def _dkv_init(dk_acc, dv_acc) -> None:
  dk_acc[...] = jnp.zeros_like(dk_acc)
  dv_acc[...] = jnp.zeros_like(dv_acc)


def _dkv_step(q_ref, k_ref, v_ref, do_ref, stats_ref, dk_acc, dv_acc, mask_of, *, chunk, scale, softcap) -> None:
  q, do = q_ref[...], do_ref[...]
  lse, delta = stats_ref[0:1], stats_ref[1:2]
  for cols in _chunks(k_ref.shape[0], chunk):
    # Transposed [chunk, bq] scores: the query-side rows are used as lane vectors, no relayout.
    sc, t = _scores(k_ref[cols, :], q, scale, softcap)
    p = jnp.exp(sc - lse)
    if mask_of is not None:
      p = jnp.where(mask_of(cols), p, 0.0)
    dv_acc[cols, :] += jnp.dot(p.astype(do.dtype), do, preferred_element_type=_F32)
    dp = lax.dot_general(v_ref[cols, :], do, _NT, preferred_element_type=_F32)
    ds = _uncap(p * (dp - delta), t)
    dk_acc[cols, :] += jnp.dot(ds.astype(q.dtype), q, preferred_element_type=_F32)


def _dkv_finish(dk_ref, dv_ref, dk_acc, dv_acc, scale) -> None:
  dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _pair_entry(pairs_ref, row, p, capacity: int):
  """(query block, key block, kind, first, last) of entry p of row `row` (pairs flattened to [rows * P])."""
  return live_pairs.unpack(pairs_ref[row * capacity + p])


def _by_kind(kind, step, mask_of) -> None:
  """Runs step(mask_of) on an EDGE entry and step(None) on a FULL one (EMPTY and DEAD entries compute nothing)."""
  pl.when(kind == live_pairs.EDGE)(lambda: step(mask_of))
  pl.when(kind == live_pairs.FULL)(lambda: step(None))


def _fwd_kernel(pairs_ref, q_ref, k_ref, v_ref, qrows_ref, krows_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref, *,
                row_of, capacity, chunk, scale, softcap, window, num_global):
  b, n, p = (pl.program_id(a) for a in range(3))
  _, _, kind, first, last = _pair_entry(pairs_ref, row_of(b, n), p, capacity)
  alive = kind != live_pairs.DEAD
  pl.when(alive & first)(lambda: _fwd_init(m_ref, l_ref, acc_ref))
  _by_kind(kind, lambda mask_of: _fwd_step(q_ref, k_ref, v_ref, m_ref, l_ref, acc_ref, mask_of, chunk=chunk,
                                           scale=scale, softcap=softcap),
           lambda cols: _fwd_mask(qrows_ref, krows_ref, cols, window, num_global))
  pl.when(alive & last)(lambda: _fwd_finish(o_ref, lse_ref, m_ref, l_ref, acc_ref))


def _dq_kernel(pairs_ref, q_ref, k_ref, v_ref, do_ref, stats_ref, qrows_ref, krows_ref, dq_ref, acc_ref, *,
               row_of, capacity, chunk, scale, softcap, window, num_global):
  b, n, p = (pl.program_id(a) for a in range(3))
  _, _, kind, first, last = _pair_entry(pairs_ref, row_of(b, n), p, capacity)
  alive = kind != live_pairs.DEAD

  @pl.when(alive & first)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  _by_kind(kind, lambda mask_of: _dq_step(q_ref, k_ref, v_ref, do_ref, stats_ref, acc_ref, mask_of, chunk=chunk,
                                          scale=scale, softcap=softcap),
           lambda cols: _fwd_mask(qrows_ref, krows_ref, cols, window, num_global))

  @pl.when(alive & last)
  def _finish():
    dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(pairs_ref, q_ref, k_ref, v_ref, do_ref, stats_ref, qrows_ref, krows_ref, dk_ref, dv_ref, dk_acc,
                dv_acc, *, row_of, capacity, chunk, scale, softcap, window, num_global):
  b, h, p = (pl.program_id(a) for a in range(3))
  _, _, kind, first, last = _pair_entry(pairs_ref, row_of(b, h), p, capacity)
  alive = kind != live_pairs.DEAD
  pl.when(alive & first)(lambda: _dkv_init(dk_acc, dv_acc))
  _by_kind(kind, lambda mask_of: _dkv_step(q_ref, k_ref, v_ref, do_ref, stats_ref, dk_acc, dv_acc, mask_of,
                                           chunk=chunk, scale=scale, softcap=softcap),
           lambda cols: _dkv_mask(qrows_ref, krows_ref, cols, window, num_global))
  pl.when(alive & last)(lambda: _dkv_finish(dk_ref, dv_ref, dk_acc, dv_acc, scale))


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


def _stats(o: jax.Array, do: jax.Array, lse: jax.Array) -> jax.Array:
  """(lse, delta = rowsum(dO * O)) float32 [B, N, 2, T], the backward kernels' per-query rows."""
  delta = jnp.einsum('btnh,btnh->bnt', o.astype(_F32), do.astype(_F32))
  return jnp.stack([lse, delta], axis=2)


def _interpret(interpret: bool):
  return pltpu.InterpretParams() if interpret else False


def _semantics(num_arbitrary: int, num_axes: int) -> pltpu.CompilerParams:
  return pltpu.CompilerParams(dimension_semantics=(pltpu.PARALLEL,) * (num_axes - num_arbitrary)
                              + (pltpu.ARBITRARY,) * num_arbitrary)


def _rows_head(per_head: bool):
  """Head index into the query-row array: n per head, 0 when shared."""
  return (lambda n: n) if per_head else (lambda n: 0)


def _query_grid_specs(*, N: int, H: int, group: int, block_q: int, block_k: int, capacity: int,
                      per_head: bool) -> types.SimpleNamespace:
  """BlockSpecs of the forward and dq kernels: grid (B, N, steps), prefetched pairs; row b * N + n per head,
  b when shared."""
  row_of = (lambda b, n: b * N + n) if per_head else (lambda b, n: b)
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


def _key_grid_specs(*, K: int, nq: int, H: int, group: int, block_q: int, block_k: int, capacity: int,
                    per_head: bool) -> types.SimpleNamespace:
  """BlockSpecs of the dk/dv kernel: grid (B, K, steps), prefetched transposed pairs whose query field
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


def _kernel_kw(pairs, *, block_k, block_k_compute, scale, softcap, window, num_global) -> dict:
  return dict(capacity=pairs.pairs.shape[-1], chunk=compute_chunk(block_k, block_k_compute), scale=scale,
              softcap=softcap, window=window, num_global=num_global)


def flash_forward(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, q_seg: jax.Array,
                  k_seg: jax.Array, pairs: live_pairs.LivePairs, *, scale: float, block_q: int, block_k: int,
                  window: int | None, num_global: int, softcap: float | None, interpret: bool,
                  block_k_compute: int | None = None) -> tuple[jax.Array, jax.Array]:
  """The forward kernel over the live pairs (live_pairs.live_pairs of the same metadata and settings).

  Returns (out [B, T, N, H] q.dtype, lse [B, N, T] float32)."""
  B, T, N, H = q.shape
  kw = _kernel_kw(pairs, block_k=block_k, block_k_compute=block_k_compute, scale=scale, softcap=softcap,
                  window=window, num_global=num_global)
  spec = _query_grid_specs(N=N, H=H, group=N // k.shape[2], block_q=block_q, block_k=block_k,
                           capacity=kw['capacity'], per_head=q_pos.ndim == 3)
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, row_of=spec.row_of, **kw),
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
      name='sparse_attention_fwd',
  )(pairs.pairs.reshape(-1), _heads_major(q), _heads_major(k), _heads_major(v), _query_rows(q_pos, q_seg),
    _key_rows_sublanes(k_pos, k_seg))
  return _heads_major(out), lse[..., 0]


def flash_dq(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, q_seg: jax.Array,
             k_seg: jax.Array, pairs: live_pairs.LivePairs, o: jax.Array, lse: jax.Array, do: jax.Array, *,
             scale: float, block_q: int, block_k: int, window: int | None, num_global: int,
             softcap: float | None, interpret: bool, block_k_compute: int | None = None) -> jax.Array:
  """The dq kernel over the forward's live pairs. Returns dq [B, T, N, H] in q.dtype."""
  B, T, N, H = q.shape
  kw = _kernel_kw(pairs, block_k=block_k, block_k_compute=block_k_compute, scale=scale, softcap=softcap,
                  window=window, num_global=num_global)
  spec = _query_grid_specs(N=N, H=H, group=N // k.shape[2], block_q=block_q, block_k=block_k,
                           capacity=kw['capacity'], per_head=q_pos.ndim == 3)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, row_of=spec.row_of, **kw),
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
      name='sparse_attention_dq',
  )(pairs.pairs.reshape(-1), _heads_major(q), _heads_major(k), _heads_major(v), _heads_major(do.astype(q.dtype)),
    _stats(o, do, lse), _query_rows(q_pos, q_seg), _key_rows_sublanes(k_pos, k_seg))
  return _heads_major(dq)


def flash_dkv(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, q_seg: jax.Array,
              k_seg: jax.Array, pairs: live_pairs.LivePairs, o: jax.Array, lse: jax.Array, do: jax.Array, *,
              scale: float, block_q: int, block_k: int, window: int | None, num_global: int,
              softcap: float | None, interpret: bool,
              block_k_compute: int | None = None) -> tuple[jax.Array, jax.Array]:
  """The dk/dv kernel over the transposed live pairs (live_pairs.dkv_live_pairs with group = N // K of the same
  metadata and settings): dk/dv summed over the GQA group's query heads and query blocks.

  Returns (dk, dv) [B, T, K, H] in k.dtype, v.dtype."""
  B, T, N, H = q.shape
  K = k.shape[2]
  kw = _kernel_kw(pairs, block_k=block_k, block_k_compute=block_k_compute, scale=scale, softcap=softcap,
                  window=window, num_global=num_global)
  spec = _key_grid_specs(K=K, nq=T // block_q, H=H, group=N // K, block_q=block_q, block_k=block_k,
                         capacity=kw['capacity'], per_head=q_pos.ndim == 3)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, row_of=spec.row_of, **kw),
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
      name='sparse_attention_dkv',
  )(pairs.pairs.reshape(-1), _heads_major(q), _heads_major(k), _heads_major(v), _heads_major(do.astype(q.dtype)),
    _stats(o, do, lse), _query_rows(q_pos, q_seg), _key_rows_lanes(k_pos, k_seg))
  return _heads_major(dk), _heads_major(dv)
