"""Tests for the live-pair grids of the Mosaic TPU kernels (live_pairs.py): the pair lists (and the transposed
dk/dv lists) against the dense reference mask, and the grid steps of tpu.flash_forward / flash_dkv counted in TPU
interpret mode. The kernels' values and lowering are tested in test_sparse_attention_tpu.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_attention import live_pairs as lp
from pallas_kernels.sparse_attention import tpu
from pallas_kernels.sparse_attention.reference import sparse_attention_mask
from tests.pallas_kernels.test_sparse_attention_tpu import count_calls, layout, routed_rows


def brute_force(q_pos, q_seg, k_pos, k_seg, *, block_q, block_k, window, num_global):
  """(live, full) bool [R, nq, nk] from the dense mask: any / every (query, key) of the block pair visible."""
  mask = np.asarray(sparse_attention_mask(q_pos, k_pos, q_seg, k_seg, window=window, num_global=num_global))
  R, T, S = mask.shape
  blocks = mask.reshape(R, T // block_q, block_q, S // block_k, block_k)
  return blocks.any(axis=(2, 4)), blocks.all(axis=(2, 4))


def decode_rows(pairs):
  """Per row: the list of (i, j, kind) of its live entries, and its count."""
  out = []
  for row in np.asarray(pairs.pairs):
    i, j, kind, first, last = (np.asarray(x) for x in lp.unpack(row))
    n = int(np.sum(kind != lp.DEAD))
    assert np.all(kind[:n] != lp.DEAD) and np.all(kind[n:] == lp.DEAD)
    if n < row.size:  # DEAD entries repeat the last live pair's blocks: no new DMA
      assert np.all(i[n:] == i[n - 1]) and np.all(j[n:] == j[n - 1])
    out.append((list(zip(i[:n].tolist(), j[:n].tolist(), kind[:n].tolist())), first[:n], last[:n]))
  return out


ROWS = [[30, 3, 50, 20, 41, 32], [176], [1, 40, 60, 43, 32], [2] * 88]  # packed documents, a padded tail


@pytest.mark.parametrize('window,num_global', [(None, 0), (7, 0), (33, 3), (40, 0), (500, 2), (16, 1)])
@pytest.mark.parametrize('bq,bk', [(16, 16), (32, 16), (16, 32)])
def test_pair_lists_match_dense_mask(window, num_global, bq, bk):
  pos, seg = layout(ROWS, pad=16)
  kw = dict(block_q=bq, block_k=bk, window=window, num_global=num_global)
  live, full = brute_force(pos, seg, pos, seg, **kw)
  got_live, got_full = lp.block_masks(pos, seg, pos, seg, **kw)
  np.testing.assert_array_equal(np.asarray(got_live), live)
  np.testing.assert_array_equal(np.asarray(got_full), full)
  pairs = lp.live_pairs(pos, seg, pos, seg, **kw)
  nq, nk = live.shape[1:]
  for r, (entries, first, last) in enumerate(decode_rows(pairs)):
    want = [(i, j, lp.FULL if full[r, i, j] else lp.EDGE) for i in range(nq) for j in range(nk) if live[r, i, j]]
    want += [(i, 0, lp.EMPTY) for i in range(nq) if not live[r, i].any()]  # zero output for empty blocks
    assert entries == sorted(want)
    qb = np.array([e[0] for e in entries])
    np.testing.assert_array_equal(first, np.r_[True, qb[1:] != qb[:-1]])
    np.testing.assert_array_equal(last, np.r_[qb[1:] != qb[:-1], True])
  counts = [len(e[0]) for e in decode_rows(pairs)]
  assert int(pairs.steps) == max(counts) <= pairs.pairs.shape[1]


def check_dkv_lists(pairs, live, full, group):
  """The transposed lists of rows [R, ...] against (live, full) [R * group, nq, nk] of their query rows (row r,
  head g: r * group + g); for shared metadata pass the mask repeated over the group."""
  R = pairs.pairs.shape[0]
  nq, nk = live.shape[1:]
  live, full = (x.reshape(R, group, nq, nk) for x in (live, full))
  counts = []
  for r, (entries, first, last) in enumerate(decode_rows(pairs)):
    want = []
    for j in range(nk):
      col = [(g * nq + i, j, lp.FULL if full[r, g, i, j] else lp.EDGE) for g in range(group) for i in range(nq)
             if live[r, g, i, j]]
      want += col or [(0, j, lp.EMPTY)]  # zero dk/dv for a key block nothing sees
    assert entries == want  # ordered by (key block, query head, query block)
    kb = np.array([e[1] for e in entries])
    np.testing.assert_array_equal(first, np.r_[True, kb[1:] != kb[:-1]])
    np.testing.assert_array_equal(last, np.r_[kb[1:] != kb[:-1], True])
    counts.append(len(entries))
  assert int(pairs.steps) == max(counts) <= pairs.pairs.shape[1]


@pytest.mark.parametrize('window,num_global', [(None, 0), (7, 0), (33, 3), (500, 2), (16, 1)])
@pytest.mark.parametrize('bq,bk,group', [(16, 16, 1), (32, 16, 2), (16, 32, 3)])
def test_dkv_pair_lists_match_dense_mask(window, num_global, bq, bk, group):
  pos, seg = layout(ROWS, pad=16)
  kw = dict(block_q=bq, block_k=bk, window=window, num_global=num_global)
  live, full = brute_force(pos, seg, pos, seg, **kw)
  pairs = lp.dkv_live_pairs(pos, seg, pos, seg, group=group, **kw)
  assert pairs.pairs.shape[0] == pos.shape[0]  # shared metadata: one list for every kv head
  check_dkv_lists(pairs, np.repeat(live, group, 0), np.repeat(full, group, 0), group)
  assert bk > 16 or (~live.any(axis=1)).any()  # the padded tail: key blocks with EMPTY entries


def per_head_masks(pos, seg, num_heads, seed, **kw):
  """Random routed per-head rows of the layout and their brute-force (live, full) [B * N, nq, nk]: returns
  (q_pos, q_seg, q_index, live, full)."""
  q_pos, q_seg, q_index = routed_rows(np.random.default_rng(seed), pos, seg, num_heads)
  B, N, T = q_pos.shape
  live, full = brute_force(q_pos.reshape(B * N, T), q_seg.reshape(B * N, T), jnp.repeat(pos, N, 0),
                           jnp.repeat(seg, N, 0), **kw)
  return q_pos, q_seg, q_index, live, full


def test_per_head_dkv_pair_lists_match_dense_mask():
  """Routed per-head rows, GQA: the list of (batch, kv head) merges its group's query heads."""
  pos, seg = layout([[30, 28, 40], [98]], pad=30)
  for window, num_global in [(None, 0), (16, 2), (40, 0)]:
    kw = dict(block_q=16, block_k=32, window=window, num_global=num_global)
    q_pos, q_seg, q_index, live, full = per_head_masks(pos, seg, 4, 1, **kw)
    B = q_pos.shape[0]
    pairs = lp.dkv_live_pairs(q_pos, q_seg, pos, seg, q_index=q_index, group=2, **kw)
    assert pairs.pairs.shape[0] == B * 2
    check_dkv_lists(pairs, live, full, 2)


def test_per_head_pair_lists_match_dense_mask():
  """Routed attention's compacted per-head rows (q_index: the token of each row)."""
  pos, seg = layout([[30, 28, 40], [98]], pad=30)
  for window, num_global in [(None, 0), (16, 2), (40, 0)]:
    kw = dict(block_q=16, block_k=32, window=window, num_global=num_global)
    q_pos, q_seg, q_index, live, full = per_head_masks(pos, seg, 3, 0, **kw)
    B, N, T = q_pos.shape
    pairs = lp.live_pairs(q_pos, q_seg, pos, seg, q_index=q_index, **kw)
    assert pairs.pairs.shape == (B * N, lp.per_head_capacity(T, block_q=16, block_k=32))
    for r, (entries, _, _) in enumerate(decode_rows(pairs)):
      got = {(i, j): kind for i, j, kind in entries if kind != lp.EMPTY}
      assert got == {(i, j): lp.FULL if full[r, i, j] else lp.EDGE for i, j in zip(*np.nonzero(live[r]))}
    assert live.sum() < live.size / 2
    if window is None:
      assert full.any()  # compacted rows of a long causal document


@pytest.mark.parametrize('bq,bk', [(16, 16), (16, 32), (32, 16)])
def test_per_head_capacity_is_the_tight_bound(bq, bk):
  """Every head routed to the last `count` tokens of one document (for each count: the layout with the most live
  pairs per query block) and random routings: no row has more entries than per_head_capacity, and the worst
  layout has exactly that many (so no entry is ever dropped, and the SMEM list is no larger than needed)."""
  T = 128
  pos, seg = layout([[T]])
  rows = np.zeros((3, T, T), np.int32)  # (q_pos, q_seg, q_index) per count
  rows[1] = -1
  for count in range(1, T + 1):
    idx = np.arange(T - count, T)
    rows[0, count - 1, :count], rows[1, count - 1, :count], rows[2, count - 1, :count] = idx, 1, idx
  rng = np.random.default_rng(6)
  random_pos, random_seg, random_index = routed_rows(rng, jnp.repeat(pos, 8, 0), jnp.repeat(seg, 8, 0), 4)
  cap = lp.per_head_capacity(T, block_q=bq, block_k=bk)
  assert cap < (T // bq) * (T // bk)
  kw = dict(block_q=bq, block_k=bk)
  live, _ = lp.block_masks(jnp.asarray(rows[0]), jnp.asarray(rows[1]), jnp.repeat(pos, T, 0), jnp.repeat(seg, T, 0),
                           q_index=jnp.asarray(rows[2]), **kw)
  entries = np.asarray(live).sum(axis=(1, 2)) + (~np.asarray(live).any(-1)).sum(-1)  # live pairs + EMPTY blocks
  assert entries.max() == cap
  flat = lambda x: x.reshape(-1, T)
  live, _ = lp.block_masks(flat(random_pos), flat(random_seg), jnp.repeat(pos, 32, 0), jnp.repeat(seg, 32, 0),
                           q_index=flat(random_index), **kw)
  assert (np.asarray(live).sum(axis=(1, 2)) + (~np.asarray(live).any(-1)).sum(-1)).max() <= cap


def test_pair_counts_remove_dead_steps():
  """A single causal document: nq (nq + 1) / 2 live pairs of nq^2, of which nq are edge (the diagonal)."""
  T, b = 1024, 128
  pos, seg = layout([[T]])
  pairs = lp.live_pairs(pos, seg, pos, seg, block_q=b, block_k=b)
  entries = decode_rows(pairs)[0][0]
  nq = T // b
  assert int(pairs.steps) == len(entries) == nq * (nq + 1) // 2 == pairs.pairs.shape[1]
  assert sum(kind == lp.EDGE for _, _, kind in entries) == nq
  # A window of 2 blocks: 2 pairs per query block (1 for the first), half of them full.
  pairs = lp.live_pairs(pos, seg, pos, seg, block_q=b, block_k=b, window=b)
  assert int(pairs.steps) == 2 * nq - 1


@pytest.mark.parametrize('window,num_global,per_head', [(None, 0, False), (20, 0, False), (20, 3, False),
                                                       (None, 0, True), (20, 3, True)])
def test_grid_steps_are_the_live_pairs(monkeypatch, window, num_global, per_head):
  """Counts, with host callbacks in TPU interpret mode, the grid steps (kernel body runs) and the steps that
  compute scores, masked or not, for causal, window, window + globals and routed per-head rows: B * N * steps runs
  (steps: the longest row's live pairs plus one entry per empty query block), scores on exactly the live pairs and
  the mask on exactly the edge pairs (pairs from the dense mask by brute force)."""
  counts = count_calls(monkeypatch, tpu, scores='_scores', masks='_fwd_mask', steps='_fwd_kernel')
  pos, seg = layout([[40, 70, 18], [128]])
  B, T = pos.shape
  N, K, H, b = 2, 1, 8, 16
  kw = dict(block_q=b, block_k=b, window=window, num_global=num_global)
  if per_head:  # one list per (batch row, head): the dense mask of each head's compacted rows
    q_pos, q_seg, q_index, live, full = per_head_masks(pos, seg, N, 4, **kw)
    heads = 1  # each list row is one (batch row, head)
  else:
    q_pos, q_seg, q_index = pos, seg, None
    live, full = brute_force(pos, seg, pos, seg, **kw)
    heads = N  # each list row serves every head
  pairs = lp.live_pairs(q_pos, q_seg, pos, seg, q_index=q_index, **kw)
  q = jnp.ones((B, T, N, H))
  k = jnp.ones((B, T, K, H))
  out, _ = tpu.flash_forward(q, k, k, q_pos, pos, q_seg, seg, pairs, scale=1.0, softcap=None, interpret=True,
                             **kw)
  jax.block_until_ready(out)
  nq = T // b
  assert counts['steps'] == B * N * int(pairs.steps)
  assert int(pairs.steps) == max(int(live[r].sum() + (~live[r].any(-1)).sum()) for r in range(live.shape[0]))
  assert counts['scores'] == heads * int(live.sum())
  assert counts['masks'] == heads * int((live & ~full).sum())
  # Against the old static grids: nq * nq steps per row for causal and per-head rows; under a window most are dead.
  assert int(pairs.steps) < (nq * nq // 2 if window is not None else nq * nq)
  if window is None:  # long causal documents: most live pairs are full (a window of 20 cuts every 16-block)
    assert counts['masks'] < counts['scores']


def test_dkv_grid_steps_are_the_live_pairs(monkeypatch):
  """The dk/dv kernel body runs B * K * steps times (steps: the longest row's group * live pairs plus one EMPTY
  entry per key block nothing sees, here the padded tail), computes scores on exactly K * group * live pairs and
  the mask on the edge ones, and writes zero dk/dv for the EMPTY key block (interpret mode fills unwritten
  outputs with NaN)."""
  pos, seg = layout([[40, 70, 18], [128]], pad=32)
  B, T = pos.shape
  N, K, H, b = 4, 2, 8, 32
  group = N // K
  kw = dict(block_q=b, block_k=b, window=None, num_global=0)
  live, full = brute_force(pos, seg, pos, seg, **kw)
  pairs = lp.live_pairs(pos, seg, pos, seg, **kw)
  dkv_pairs = lp.dkv_live_pairs(pos, seg, pos, seg, group=group, **kw)
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32)
  args = (q, k, k, pos, pos, seg, seg)
  out, lse = tpu.flash_forward(*args, pairs, scale=1.0, softcap=None, interpret=True, **kw)
  counts = count_calls(monkeypatch, tpu, scores='_scores', masks='_dkv_mask', steps='_dkv_kernel')
  dk, dv = tpu.flash_dkv(*args, dkv_pairs, out, lse, q, scale=1.0, softcap=None, interpret=True, **kw)
  jax.block_until_ready((dk, dv))
  empty = ~live.any(axis=1)  # [B, nk]
  assert empty[:, -1].all() and empty.sum() == B
  assert int(dkv_pairs.steps) == max(group * int(live[r].sum()) + int(empty[r].sum()) for r in range(B))
  assert counts['steps'] == B * K * int(dkv_pairs.steps)
  assert counts['scores'] == K * group * int(live.sum()) < B * N * (T // b) ** 2 // 2
  assert counts['masks'] == K * group * int((live & ~full).sum()) < counts['scores']
  for g in (dk, dv):
    g = np.asarray(g)
    assert np.all(np.isfinite(g)) and np.all(g[:, -b:] == 0) and np.abs(g[:, :-b]).max() > 0


def test_public_forward_with_lse_on_the_tpu_backend():
  """sparse_attention_with_lse (inference) runs the live-pair forward with backend='tpu'."""
  from pallas_kernels.sparse_attention import sparse_attention_with_lse  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  pos, seg = layout([[30, 20, 7]])
  B, T, N, K, H = 1, 57, 2, 1, 16
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32) for _ in range(2))
  kw = dict(window=9, num_global=2)
  got = sparse_attention_with_lse(q, k, v, pos, pos, seg, seg, backend='tpu', block_q=16, block_k=16, **kw)
  want = sparse_attention_with_lse(q, k, v, pos, pos, seg, seg, backend='reference', **kw)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5 * max(1.0, float(np.abs(w).max())))
