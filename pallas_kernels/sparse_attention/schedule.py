"""Block schedule for block-sparse self-attention over packed rows (S == T).

Precondition (the training use): queries and keys are the same tokens, documents are contiguous runs of
a packed row and positions increase by 1 inside a document, so the document of the token at index t
starts at index t - pos[t]. Then every key visible to query t has index in
  local:  [max(t - pos[t], t - window + 1), t]          (window None: [t - pos[t], t])
  global: [t - pos[t], t - pos[t] + num_global)         (only when a window is set)
Tokens with segment -1 (kernel padding) see nothing and are ignored.

The schedule holds, per (batch row, query block), int32 key-block ranges
  [g_lo, g_hi)  global blocks,  [l_lo, l_hi)  local blocks,  with g_hi <= l_lo
(an empty global range is (0, 0); a global range touching the local one is merged into it), so no key
block is visited twice. All of it is O(B*T) jnp work outside the kernels; the transposed schedule for the
dk/dv kernel is O(B * nq * nk).
"""
from __future__ import annotations

import jax.numpy as jnp

_BIG = 2**30


def make_schedule(pos, seg, *, block_q, block_k, window=None, num_global=0, q_index=None):
  """pos, seg: [B, T] int32 query positions/segments, T a multiple of block_q and block_k. Returns
  [B, nq, 4] int32 (g_lo, g_hi, l_lo, l_hi) in key-block units.

  q_index: optional [B, T] int32 token index of each query row (default: row t is token t). Routed
  attention passes the compacted rows of one head here; the keys are always tokens 0..T-1.
  """
  B, T = pos.shape
  if T % block_q or T % block_k:
    raise ValueError(f'T={T} must be a multiple of block_q={block_q} and block_k={block_k}')
  nq, nk = T // block_q, T // block_k
  pos = pos.astype(jnp.int32)
  if q_index is None:
    t = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :], (B, T))
  else:
    t = q_index.astype(jnp.int32)
  start = jnp.clip(t - pos, 0, t)  # document start index
  valid = seg != -1
  lo = start if window is None else jnp.maximum(start, t - window + 1)

  def blocks(x):
    return x.reshape(B, nq, block_q)

  valid_b = blocks(valid)
  any_valid = jnp.any(valid_b, axis=-1)
  l_lo_idx = jnp.min(jnp.where(valid_b, blocks(lo), _BIG), axis=-1)
  l_hi_idx = jnp.max(jnp.where(valid_b, blocks(t), -1), axis=-1)
  l_lo = jnp.where(any_valid, l_lo_idx // block_k, 0)
  l_hi = jnp.where(any_valid, l_hi_idx // block_k + 1, 0)

  g_lo = jnp.zeros_like(l_lo)
  g_hi = jnp.zeros_like(l_lo)
  if window is not None and num_global > 0:
    # Per query: global keys [start, start + G), causal-clipped, and clipped to end before the block's
    # local range (keys at or after l_lo_idx are visited by the local loop anyway).
    g_end = jnp.minimum(jnp.minimum(blocks(start) + num_global, blocks(t + 1)),
                        l_lo_idx[..., None])
    active = valid_b & (g_end > blocks(start))
    has_g = jnp.any(active, axis=-1)
    g_lo_idx = jnp.min(jnp.where(active, blocks(start), _BIG), axis=-1)
    g_hi_idx = jnp.max(jnp.where(active, g_end, -1), axis=-1)
    g_lo = g_lo_idx // block_k
    g_hi = (g_hi_idx + block_k - 1) // block_k
    merge = has_g & (g_hi >= l_lo)
    l_lo = jnp.where(merge, jnp.minimum(g_lo, l_lo), l_lo)
    keep = has_g & ~merge
    g_lo = jnp.where(keep, g_lo, 0)
    g_hi = jnp.where(keep, g_hi, 0)
  sched = jnp.stack([g_lo, g_hi, l_lo, l_hi], axis=-1)
  return jnp.clip(sched, 0, nk).astype(jnp.int32)


def visited_blocks(sched, num_k_blocks):
  """Boolean [B, nq, nk]: key block j is visited by query block i."""
  j = jnp.arange(num_k_blocks, dtype=jnp.int32)
  g = (sched[..., 0:1] <= j) & (j < sched[..., 1:2])
  loc = (sched[..., 2:3] <= j) & (j < sched[..., 3:4])
  return g | loc


def transpose_schedule(sched, num_k_blocks):
  """[B, nk, 2] int32 (q_lo, q_hi): the covering range of query blocks that visit each key block
  ((0, 0) when none does). The dk/dv kernel applies the exact mask, so visiting the (rare) query blocks
  inside the covering range that the forward schedule skipped is harmless."""
  vis = visited_blocks(sched, num_k_blocks)  # [B, nq, nk]
  nq = vis.shape[1]
  any_v = jnp.any(vis, axis=1)
  first = jnp.argmax(vis, axis=1)
  last = nq - 1 - jnp.argmax(vis[:, ::-1, :], axis=1)
  q_lo = jnp.where(any_v, first, 0)
  q_hi = jnp.where(any_v, last + 1, 0)
  return jnp.stack([q_lo, q_hi], axis=-1).astype(jnp.int32)


def count_visited_blocks(pos, seg, *, block_q, block_k, window=None, num_global=0):
  """Number of (query block, key block) pairs the forward kernel visits, summed over the batch."""
  sched = make_schedule(pos, seg, block_q=block_q, block_k=block_k, window=window,
                        num_global=num_global)
  return int(jnp.sum(sched[..., 1] - sched[..., 0]) + jnp.sum(sched[..., 3] - sched[..., 2]))
