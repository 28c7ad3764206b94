"""Full and edge key blocks: which visited key blocks need the element mask.

A key block j is *full* for query block i when every valid query row of block i (segment != -1) sees every key
of block j: all those rows are in one document, every key of the block is a token of that same document
(none has segment -1), every key is causally visible to every row (max key position <= min row position) and,
with a window, every key that is not a global token (position >= num_global) is inside every row's window
(max row position - min such key position < window). On a full block the mask is all-True on the valid rows, so
the kernels skip evaluating it; every other visited block is an *edge* block and is masked element by element.
Rows with segment -1 are excluded from the condition: the kernels zero them separately (forward: output 0 and
lse 0 at the end; backward: their lse is +inf, so their probabilities are 0).

The condition is evaluated exactly from block minima / maxima of the positions and segments, so, unlike the
block schedule, it needs no layout precondition: a block called full is all-True whatever the layout. The
kernels loop over one contiguous run of full blocks per query block, [f_lo, f_hi) inside the local range
[l_lo, l_hi) of the schedule (see schedule.py): the first run of full blocks there. Under the training layout
(contiguous documents, positions +1) the full blocks of the local range are contiguous, so the run is all of
them: for causal attention every block left of the diagonal of a one-document query block, for a window the
blocks between the window's trailing edge and the diagonal. Global-range blocks are always masked (with
num_global < block_k they cannot be full anyway). All of it is O(B * nq * nk) jnp work outside the kernels,
like `transpose_schedule`.
"""
from __future__ import annotations

import jax.numpy as jnp

_BIG = 2**30


def full_block_pairs(q_pos, q_seg, k_pos, k_seg, *, block_q, block_k, window=None, num_global=0):
  """Boolean [..., nq, nk]: key block j is full for query block i (see the module docstring).

  q_pos/q_seg: [B, T] or per query head [B, N, T] int32 (T a multiple of block_q); k_pos/k_seg: [B, S] int32 (S a
  multiple of block_k).
  """
  B, S = k_pos.shape
  T = q_pos.shape[-1]
  lead = q_pos.shape[:-1]
  nq, nk = T // block_q, S // block_k
  qp = q_pos.astype(jnp.int32).reshape(*lead, nq, block_q)
  qs = q_seg.astype(jnp.int32).reshape(*lead, nq, block_q)
  kp = k_pos.astype(jnp.int32).reshape(B, nk, block_k)
  ks = k_seg.astype(jnp.int32).reshape(B, nk, block_k)

  valid = qs != -1
  q_any = jnp.any(valid, axis=-1)
  q_seg_lo = jnp.min(jnp.where(valid, qs, _BIG), axis=-1)
  q_seg_hi = jnp.max(jnp.where(valid, qs, -_BIG), axis=-1)
  q_one_doc = q_any & (q_seg_lo == q_seg_hi)
  q_pos_lo = jnp.min(jnp.where(valid, qp, _BIG), axis=-1)
  q_pos_hi = jnp.max(jnp.where(valid, qp, -_BIG), axis=-1)

  k_one_doc = jnp.all(ks != -1, axis=-1) & (jnp.min(ks, axis=-1) == jnp.max(ks, axis=-1))
  k_seg0 = ks[..., 0]
  k_pos_hi = jnp.max(kp, axis=-1)
  if window is not None and num_global > 0:
    k_local = jnp.where(kp >= num_global, kp, _BIG)  # keys that must be inside the window
  else:
    k_local = kp
  k_local_lo = jnp.min(k_local, axis=-1)

  # Key stats [B, nk] -> [B, 1.., 1, nk] against query stats [..., nq, 1].
  kb = lambda x: x.reshape(B, *([1] * (len(lead) - 1)), 1, nk)
  qb = lambda x: x[..., None]
  full = (qb(q_one_doc) & kb(k_one_doc) & (qb(q_seg_lo) == kb(k_seg0)) & (kb(k_pos_hi) <= qb(q_pos_lo)))
  if window is not None:
    full = full & (qb(q_pos_hi) - kb(k_local_lo) < window)  # k_local_lo = _BIG: only global keys, always visible
  return full


def first_run(cand, lo, hi):
  """[..., n] booleans and ranges [lo, hi) [...] -> (r_lo, r_hi) [...]: the first run of True inside [lo, hi)
  ((lo, lo) when there is none)."""
  n = cand.shape[-1]
  j = jnp.arange(n, dtype=jnp.int32)
  inside = (lo[..., None] <= j) & (j < hi[..., None])
  c = cand & inside
  has = jnp.any(c, axis=-1)
  r_lo = jnp.argmax(c, axis=-1).astype(jnp.int32)
  stop = inside & ~cand & (j >= r_lo[..., None])
  r_hi = jnp.where(jnp.any(stop, axis=-1), jnp.argmax(stop, axis=-1), hi).astype(jnp.int32)
  return jnp.where(has, r_lo, lo), jnp.where(has, r_hi, lo)


def full_key_ranges(q_pos, q_seg, k_pos, k_seg, sched, *, block_q, block_k, window=None, num_global=0):
  """[..., nq, 2] int32 (f_lo, f_hi): the run of full key blocks inside each query block's local range
  [l_lo, l_hi) = sched[..., 2:4] (l_lo <= f_lo <= f_hi <= l_hi; (l_lo, l_lo) when none is full).

  q_pos/q_seg [B, T] with sched [B, nq, 4], or per query head [B, N, T] with sched [B, N, nq, 4]; k_pos/k_seg
  [B, S]. The kernels mask [l_lo, f_lo) and [f_hi, l_hi) and skip the mask on [f_lo, f_hi).
  """
  full = full_block_pairs(q_pos, q_seg, k_pos, k_seg, block_q=block_q, block_k=block_k, window=window,
                          num_global=num_global)
  f_lo, f_hi = first_run(full, sched[..., 2], sched[..., 3])
  return jnp.stack([f_lo, f_hi], axis=-1)


def transpose_full_ranges(sched, tsched, num_k_blocks):
  """[..., nk, 2] int32 (fq_lo, fq_hi) for the dk/dv kernel: the first run, inside each key block's query range
  [q_lo, q_hi) = tsched[..., 0:2], of query blocks whose forward full run (sched[..., 4:6]) holds the key block.
  ((q_lo, q_lo) when none.) Every such pair is full, so the dk/dv kernel may skip its mask."""
  j = jnp.arange(num_k_blocks, dtype=jnp.int32)
  in_run = (sched[..., 4:5] <= j) & (j < sched[..., 5:6])  # [..., nq, nk]
  fq_lo, fq_hi = first_run(jnp.swapaxes(in_run, -1, -2), tsched[..., 0], tsched[..., 1])
  return jnp.stack([fq_lo, fq_hi], axis=-1)


def count_masked_blocks(sched) -> int:
  """(query block, key block) pairs whose element mask the forward kernel evaluates, given the 6-column GPU
  schedule [..., nq, 6] (g_lo, g_hi, l_lo, l_hi, f_lo, f_hi): every visited pair outside the full run."""
  visited = (sched[..., 1] - sched[..., 0]) + (sched[..., 3] - sched[..., 2])
  return int(jnp.sum(visited - (sched[..., 5] - sched[..., 4])))
