"""Flattened lists of the live (query block, key block) pairs, the grid of the Mosaic TPU kernels (tpu.py).

A pair is live when some query of the query block sees some key of the key block, and full when every query of
the block sees every key of the block (then the kernel skips the element mask; a pair with any padding token,
segment -1, is never full). One list per schedule row (a batch row, or a (batch row, query head) with per-head
query metadata), sorted by (query block, key block), as megablox's group metadata flattens its tiles: the
kernel's last grid axis walks the list, so a dead (query block, key block) pair costs no grid step. A query
block with no live pair gets one `EMPTY` entry, so that the kernel still writes its zero output. The dk/dv kernel
walks the transposed lists of dkv_live_pairs: one per (batch row[, kv head]), sorted by (key block, query head of
the GQA group, query block), first/last flags per key block, one EMPTY entry per key block that nothing sees.

Each entry is one int32 word (SMEM scalar prefetch is 32-bit on TPU, so narrower types would not shrink it):
  bits 0-1 kind (EMPTY 0, EDGE 1: masked, FULL 2: unmasked, DEAD 3: padding past the row's count),
  bit 2 first entry of its query block, bit 3 last entry of its query block,
  bits 4-17 key block (< 16384), bits 18-30 query block (< 8192).
Entries past a row's count repeat its last entry with kind DEAD, so the index maps fetch no new block and the
kernel skips them; the grid runs max-over-rows-of-count steps (a traced scalar: Pallas TPU grids may be dynamic).

Live pairs follow the precondition of schedule.py (query row t is token q_index[t], documents are contiguous runs
with positions increasing by 1 from 0): query t sees the key-index intervals [lo_t, t] (local) and
[start_t, start_t + num_global) (global, with a window), so its live key blocks are two block ranges, added to a
per-query-block difference array: O(R * T + R * nq * nk) jnp work outside the kernel. Full flags need no
precondition: they compare per-block minima and maxima of the actual query and key metadata.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

EMPTY, EDGE, FULL, DEAD = 0, 1, 2, 3
_J_SHIFT, _I_SHIFT = 4, 18
_J_MASK = (1 << (_I_SHIFT - _J_SHIFT)) - 1
MAX_Q_BLOCKS, MAX_K_BLOCKS = 1 << (31 - _I_SHIFT), 1 << (_I_SHIFT - _J_SHIFT)
_BIG = 2**30


class LivePairs(NamedTuple):
  """pairs int32 [R, P] packed entries (R = B, or B * N with per-head query metadata; P a static capacity);
  steps int32 []: the kernels' pair-axis grid size, the largest count of a row."""
  pairs: jax.Array
  steps: jax.Array


def pack(i, j, kind, first, last):
  """One entry word from query block i, key block j, kind and the first/last flags (ints or int32 arrays)."""
  first, last = (jnp.asarray(x).astype(jnp.int32) for x in (first, last))
  return (jnp.left_shift(jnp.asarray(i, jnp.int32), _I_SHIFT) | jnp.left_shift(jnp.asarray(j, jnp.int32), _J_SHIFT)
          | jnp.left_shift(last, 3) | jnp.left_shift(first, 2) | jnp.asarray(kind, jnp.int32))


def unpack(word):
  """(query block, key block, kind, first, last) of an entry word; works on SMEM scalars inside a kernel."""
  word = jnp.asarray(word, jnp.int32)
  return (jnp.right_shift(word, _I_SHIFT), jnp.right_shift(word, _J_SHIFT) & _J_MASK, word & 3,
          (jnp.right_shift(word, 2) & 1) == 1, (jnp.right_shift(word, 3) & 1) == 1)


def block_masks(q_pos, q_seg, k_pos, k_seg, *, block_q, block_k, window=None, num_global=0, q_index=None):
  """Query metadata [R, T], key metadata [R, T] (or [T]-broadcastable rows), q_index optional [R, T] token
  index of each query row (default t). Returns (live, full) bool [R, nq, nk]."""
  R, T = q_pos.shape
  if T % block_q or T % block_k:
    raise ValueError(f'T={T} must be a multiple of block_q={block_q} and block_k={block_k}')
  nq, nk = T // block_q, T // block_k
  if nq > MAX_Q_BLOCKS or nk > MAX_K_BLOCKS:
    raise ValueError(f'{nq} query / {nk} key blocks do not fit the entry word ({MAX_Q_BLOCKS} / {MAX_K_BLOCKS})')
  k_pos, k_seg = (jnp.broadcast_to(x, (R, T)).astype(jnp.int32) for x in (k_pos, k_seg))
  q_pos, q_seg = q_pos.astype(jnp.int32), q_seg.astype(jnp.int32)
  t = (jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (R, T)) if q_index is None
       else q_index.astype(jnp.int32))
  valid = q_seg != -1
  start = jnp.clip(t - q_pos, 0, t)
  lo = start if window is None else jnp.maximum(start, t - window + 1)
  ranges = [(lo, t)]
  if window is not None and num_global:
    g_end = jnp.minimum(start + num_global, t + 1) - 1  # inclusive
    ranges.append((start, jnp.where(g_end >= start, g_end, -1)))
  rows = jnp.broadcast_to(jnp.arange(R)[:, None], (R, T))
  qblock = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None] // block_q, (R, T))
  diff = jnp.zeros((R, nq, nk + 1), jnp.int32)
  for a, b in ranges:
    ok = valid & (b >= a)
    diff = diff.at[rows, qblock, jnp.where(ok, a // block_k, 0)].add(ok.astype(jnp.int32))
    diff = diff.at[rows, qblock, jnp.where(ok, b // block_k + 1, 0)].add(-ok.astype(jnp.int32))
  live = jnp.cumsum(diff, axis=-1)[..., :nk] > 0

  def summary(x, blk, fn):  # per block of blk tokens: [R, T] -> [R, T // blk]
    return fn(x.reshape(R, T // blk, blk), axis=-1)

  qs_lo, qs_hi = summary(q_seg, block_q, jnp.min), summary(q_seg, block_q, jnp.max)
  ks_lo, ks_hi = summary(k_seg, block_k, jnp.min), summary(k_seg, block_k, jnp.max)
  qp_lo, qp_hi = summary(q_pos, block_q, jnp.min), summary(q_pos, block_q, jnp.max)
  kp_hi = summary(k_pos, block_k, jnp.max)
  one_doc = ((qs_lo == qs_hi)[:, :, None] & (ks_lo == ks_hi)[:, None, :] & (qs_lo[:, :, None] == ks_lo[:, None, :])
             & (qs_lo != -1)[:, :, None])
  full = one_doc & (kp_hi[:, None, :] <= qp_lo[:, :, None])
  if window is not None:
    # Every query sees every key iff the farthest non-global key is inside the window of the latest query.
    kp_far = summary(jnp.where(k_pos >= num_global, k_pos, _BIG), block_k, jnp.min)
    full = full & (qp_hi[:, :, None] - kp_far[:, None, :] < window)
  return live, full & live


def per_head_capacity(T: int, *, block_q: int, block_k: int) -> int:
  """Static bound on the entries of one per-head row whose valid rows are distinct tokens in increasing order at
  rows 0..count-1 (grouping.group_by_head's layout), padding (segment -1) after.

  Causality alone bounds it (a window only removes pairs). With m non-empty query blocks there are at least
  (m - 1) * bq + 1 valid rows, and row r < count holds a token of index at most T - count + r (the rows after it
  need distinct later tokens), so block i < m - 1 sees key blocks up to (T - count + (i + 1) * bq - 1) // bk; the
  last non-empty block may see all nk; each of the nq - m empty blocks takes one EMPTY entry. The maximum over m
  is about nq * nk / 2 (the causal triangle) instead of nq * nk.
  """
  nq, nk = T // block_q, T // block_k
  best = 0
  for m in range(1, nq + 1):
    count = (m - 1) * block_q + 1
    total = nk + nq - m + sum(min(nk, (T - count + (i + 1) * block_q - 1) // block_k + 1) for i in range(m - 1))
    best = max(best, total)
  return min(best, nq * nk)


def row_capacity(T: int, *, block_q: int, block_k: int, window: int | None, num_global: int,
                 per_head: bool) -> int:
  """Static bound on the entries of one row: the size P of the pair lists.

  Per-head rows (routed attention's compacted rows: a head's tokens in increasing token order at rows
  0..count-1, padding after) are bounded by `per_head_capacity`, about half of nq * nk. Shared metadata meets the
  precondition, so
  query block i sees key blocks up to its last token, and with a window only the blocks of its local range
  [i*bq - window + 1, (i+1)*bq - 1] plus those of the one run of num_global tokens of the document open at its first
  query (a merged range is no longer than the two); an empty block takes one entry.
  """
  nq, nk = T // block_q, T // block_k
  if per_head:
    return per_head_capacity(T, block_q=block_q, block_k=block_k)
  runs = (num_global + 2 * block_k - 2) // block_k if (window is not None and num_global) else 0
  total = 0
  for i in range(nq):
    hi = ((i + 1) * block_q - 1) // block_k
    lo = 0 if window is None else max(i * block_q - window + 1, 0) // block_k
    total += max(1, min(nk, hi - lo + 1 + runs, hi + 1))
  return total


def pair_lists(live, full, capacity: int, *, transposed: bool = False) -> LivePairs:
  """live, full bool [R, nq, nk] -> LivePairs with [R, capacity] entries (see the module docstring).

  transposed: live, full are [R, nk, nq'] (key block outer); the entries are then ordered by key block, the
  first/last flags mark a key block's first/last entry, a key block with no live pair gets one EMPTY entry
  (query block 0), and the words keep their fields (key block in the key field, nq' < MAX_Q_BLOCKS in the query
  field). Entries past `capacity` are dropped, so capacity must bound every row's count (row_capacity does).
  """
  R, n_out, n_in = live.shape
  any_live = jnp.any(live, axis=-1, keepdims=True)
  inner = jnp.arange(n_in, dtype=jnp.int32)
  sel = live | (~any_live & (inner == 0))
  kind = jnp.where(live, jnp.where(full, FULL, EDGE), EMPTY)
  first = sel & (jnp.cumsum(sel, axis=-1) == 1)
  last = sel & (jnp.cumsum(sel[..., ::-1], axis=-1)[..., ::-1] == 1)
  outer = jnp.arange(n_out, dtype=jnp.int32)[:, None]
  i, j = (inner, outer) if transposed else (outer, inner)
  words = pack(i, j, kind, first, last).reshape(R, n_out * n_in)
  sel = sel.reshape(R, n_out * n_in)
  slot = jnp.where(sel, jnp.cumsum(sel, axis=-1) - 1, capacity)
  rows = jnp.broadcast_to(jnp.arange(R)[:, None], slot.shape)
  pairs = jnp.zeros((R, capacity), jnp.int32).at[rows, slot].set(words, mode='drop')
  count = jnp.minimum(jnp.sum(sel, axis=-1), capacity)  # >= n_out >= 1: every outer block has an entry
  last_word = jnp.take_along_axis(pairs, (count - 1)[:, None], axis=-1)
  dead = (last_word & ~3) | DEAD
  pairs = jnp.where(jnp.arange(capacity)[None] < count[:, None], pairs, dead)
  return LivePairs(pairs, jnp.max(count).astype(jnp.int32))


def _masks(q_pos, q_seg, k_pos, k_seg, *, q_index, **kw):
  """block_masks of shared [B, T] or per-head [B, N, T] query metadata -> (live, full) [B or B * N, nq, nk]."""
  if q_pos.ndim == 2:
    return block_masks(q_pos, q_seg, k_pos, k_seg, q_index=q_index, **kw)
  B, N, T = q_pos.shape
  flat = lambda x: None if x is None else x.reshape(B * N, T)
  rep = lambda x: jnp.repeat(x, N, axis=0)
  return block_masks(flat(q_pos), flat(q_seg), rep(k_pos), rep(k_seg), q_index=flat(q_index), **kw)


def live_pairs(q_pos, q_seg, k_pos, k_seg, *, block_q, block_k, window=None, num_global=0, q_index=None):
  """The forward and dq kernels' pair lists. Shared query metadata q_pos/q_seg [B, T] -> pairs [B, P]; per-head
  [B, N, T] (with q_index [B, N, T], the token of each row) -> pairs [B * N, P]. Keys k_pos/k_seg [B, T]."""
  kw = dict(block_q=block_q, block_k=block_k, window=window, num_global=num_global)
  live, full = _masks(q_pos, q_seg, k_pos, k_seg, q_index=q_index, **kw)
  return pair_lists(live, full, row_capacity(q_pos.shape[-1], per_head=q_pos.ndim == 3, **kw))


def dkv_capacity(T: int, *, group: int, block_q: int, block_k: int, window: int | None, num_global: int,
                 per_head: bool) -> int:
  """Static bound on the entries of one dk/dv list row: group copies of the live pairs (at most the forward's
  row_capacity, which also counts empty query blocks) plus one EMPTY entry per key block, at most group * nq * nk."""
  nq, nk = T // block_q, T // block_k
  fwd = row_capacity(T, block_q=block_q, block_k=block_k, window=window, num_global=num_global, per_head=per_head)
  return min(group * fwd + nk, group * nq * nk)


def dkv_live_pairs(q_pos, q_seg, k_pos, k_seg, *, group, block_q, block_k, window=None, num_global=0,
                   q_index=None):
  """The dk/dv kernel's pair lists (transposed: key block outer), GQA group of `group` query heads per kv head.

  Entry word fields: key block j; query field g * nq + i for query head h * group + g of kv head h and query block
  i (so the kernel sums a key block's dk/dv over its group's heads and query blocks between the first and last
  flags); a key block that no query of the group sees gets one EMPTY entry, so its zero dk/dv are written.
  Shared query metadata q_pos/q_seg [B, T] -> pairs [B, P] (the same for every kv head); per-head [B, N, T] (with
  q_index [B, N, T]) -> pairs [B * K, P], K = N // group. Keys k_pos/k_seg [B, T].
  """
  kw = dict(block_q=block_q, block_k=block_k, window=window, num_global=num_global)
  T = q_pos.shape[-1]
  nq = T // block_q
  if group * nq > MAX_Q_BLOCKS:
    raise ValueError(f'group * nq = {group * nq} does not fit the entry word ({MAX_Q_BLOCKS})')
  live, full = _masks(q_pos, q_seg, k_pos, k_seg, q_index=q_index, **kw)  # [R, nq, nk]
  R, _, nk = live.shape
  per_head = q_pos.ndim == 3
  if per_head:  # rows (b, n = h * group + g) -> (b, h), query field g * nq + i
    to_key_major = lambda x: x.reshape(R // group, group, nq, nk).transpose(0, 3, 1, 2).reshape(R // group, nk, -1)
  else:  # the same mask for every query head of the group
    to_key_major = lambda x: jnp.tile(x.transpose(0, 2, 1), (1, 1, group))
  return pair_lists(to_key_major(live), to_key_major(full), dkv_capacity(T, group=group, per_head=per_head, **kw),
                    transposed=True)
