"""Full vs edge key blocks of the Triton kernels (gpu.py, edge_blocks.py), the base-2 softmax and the tile table.

Interpret mode on CPU: a host callback in the forward kernel's masked branch records every (query block, key block)
pair whose element mask is evaluated, and the tests compare those pairs with an independent count from the dense
reference mask: a visited pair needs the mask unless the mask restricted to the query block's valid rows (segment
!= -1) and all of the block's keys is all-True.
"""
import collections
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_attention import api, edge_blocks, gpu
from pallas_kernels.sparse_attention import (
    make_schedule,
    sparse_attention,
    sparse_attention_mask,
    sparse_attention_reference,
    sparse_attention_with_lse,
)
from pallas_kernels.sparse_attention.schedule import visited_blocks
from tests.pallas_kernels.test_sparse_attention import layout as sparse_layout


def layout(rows):
  """Packed rows (doc_lens, pad, never) whose `pad` tail is kernel padding (segment -1, position 0)."""
  return sparse_layout(rows, pad_segment=-1)


def brute_force_pairs(pos, seg, *, block_q, block_k, window, num_global):
  """From the dense reference mask: (all_true, any_true) [B, nq, nk] over each block's valid rows and all keys."""
  mask = np.asarray(sparse_attention_mask(pos, pos, seg, seg, window=window, num_global=num_global))
  valid = np.asarray(seg) != -1
  B, T = valid.shape
  nq, nk = T // block_q, T // block_k
  all_true = np.zeros((B, nq, nk), bool)
  any_true = np.zeros((B, nq, nk), bool)
  for b in range(B):
    for i in range(nq):
      rows = [r for r in range(i * block_q, (i + 1) * block_q) if valid[b, r]]
      for j in range(nk):
        m = mask[b, rows, j * block_k:(j + 1) * block_k]
        all_true[b, i, j] = len(rows) > 0 and m.all()
        any_true[b, i, j] = m.any()
  return all_true, any_true


# (name, rows (doc_lens, pad, never), window, num_global, block_q, block_k, every_visited_pair_has_a_visible_key)
LAYOUTS = [
    ('causal', [([128],)], None, 0, 16, 16, True),
    ('causal_bq32_bk16', [([128],)], None, 0, 32, 16, True),
    ('window40', [([128],)], 40, 0, 16, 16, True),
    ('window48_global3', [([160],)], 48, 3, 16, 16, True),
    ('packed_docs_padding_causal', [([30, 45, 20], 33), ([70, 58],)], None, 0, 16, 16, True),
    ('packed_docs_padding_window40_global2', [([50, 3, 40], 35, (60,)), ([128],)], 40, 2, 16, 16, False),
]


def _record_masked(rows, window, num_global, block_q, block_k, dtype=jnp.float32, N=2, K=1, H=16, seed=0):
  pos, seg = layout(rows)
  B, T = pos.shape
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
  k, v = (jnp.asarray(rng.standard_normal((B, T, K, H)), dtype) for _ in range(2))
  sched = make_schedule(pos, seg, block_q=block_q, block_k=block_k, window=window, num_global=num_global)
  calls = []
  record = lambda b, i, n, j: calls.append((int(b), int(i), int(n), int(j)))
  out, lse = gpu.flash_forward(q, k, v, pos, pos, seg, seg, sched, scale=H ** -0.5, block_q=block_q,
                               block_k=block_k, window=window, num_global=num_global, softcap=None, interpret=True,
                               masked_block_callback=record)
  jax.block_until_ready((out, lse))
  jax.effects_barrier()
  return pos, seg, sched, (q, k, v), (out, lse), calls


@pytest.mark.parametrize('case', LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_masked_block_count_matches_dense_mask(case):
  name, rows, window, num_global, block_q, block_k, tight = case
  N = 2
  pos, seg, sched, _, _, calls = _record_masked(rows, window, num_global, block_q, block_k, N=N)
  T = pos.shape[1]
  per_head = collections.Counter(c[2] for c in calls)
  assert set(per_head) == set(range(N)) and len(set(per_head.values())) == 1, per_head
  masked = {(b, i, j) for b, i, n, j in calls}
  assert len(calls) == N * len(masked), 'a pair was masked twice'

  all_true, any_true = brute_force_pairs(pos, seg, block_q=block_q, block_k=block_k, window=window,
                                         num_global=num_global)
  vis = np.asarray(visited_blocks(sched, T // block_k))
  assert not np.any(any_true & ~vis), 'schedule misses a visible pair'
  mixed = any_true & ~all_true
  want = {tuple(int(x) for x in p) for p in np.argwhere(vis & ~all_true)}
  assert masked == want, (name, sorted(masked ^ want))
  assert {tuple(int(x) for x in p) for p in np.argwhere(mixed)} <= masked
  if tight:  # the schedule visits no pair without a visible key: masked pairs are exactly the mixed ones
    assert len(masked) == int(mixed.sum())
  # The skipping is real: every layout here has full pairs (how many: the analytic test below).
  assert len(masked) < int(vis.sum()), (len(masked), int(vis.sum()))
  full = gpu.with_full_ranges(sched, pos, seg, pos, seg, block_q=block_q, block_k=block_k, window=window,
                              num_global=num_global)
  assert edge_blocks.count_masked_blocks(full) == len(masked)


def test_masked_block_counts_analytic_single_document():
  """Causal, one document, square blocks: only the nq diagonal blocks are masked (of nq (nq + 1) / 2 visited).
  Window W = w * b (w >= 1): query block i visits blocks max(i - w, 0) .. i; block i is an edge, block i - w too
  (its first keys are outside the last rows' window), the min(i, w - 1) blocks between are full."""
  b, nq = 16, 8
  _, _, _, _, _, calls = _record_masked([([b * nq],)], None, 0, b, b, N=1)
  assert len(calls) == nq
  for w in (1, 2, 3):
    _, _, _, _, _, calls = _record_masked([([b * nq],)], w * b, 0, b, b, N=1)
    assert len(calls) == sum(min(i, w) + 1 - min(i, w - 1) for i in range(nq))


def test_full_block_pairs_are_exact_on_any_layout():
  """edge_blocks.full_block_pairs equals the brute-force all-True matrix even where the schedule's layout
  precondition fails (shuffled positions and segments, holes)."""
  rng = np.random.default_rng(3)
  B, T, bq, bk = 3, 96, 16, 8
  pos = np.sort(rng.integers(0, 60, (B, T)), axis=1).astype(np.int32)
  seg = np.repeat(rng.integers(-1, 3, (B, T // 24)), 24, axis=1).astype(np.int32)
  seg[0, 5] = -1
  pos[1, 40:48] = 3  # repeated positions inside a document
  pos, seg = jnp.asarray(pos), jnp.asarray(seg)
  for window, num_global in [(None, 0), (10, 0), (10, 4), (30, 12)]:
    got = np.asarray(edge_blocks.full_block_pairs(pos, seg, pos, seg, block_q=bq, block_k=bk, window=window,
                                                  num_global=num_global))
    want, _ = brute_force_pairs(pos, seg, block_q=bq, block_k=bk, window=window, num_global=num_global)
    np.testing.assert_array_equal(got, want)
    assert got.any(), (window, num_global)


# (name, rows, window, num_global, block_q, block_k, softcap)
CASES = [
    ('causal', [([128],)], None, 0, 16, 16, None),
    ('window40_bq32', [([128],)], 40, 0, 32, 16, None),
    ('window48_global3', [([160],)], 48, 3, 16, 16, None),
    ('packed_padding_holes_window40_global2', [([50, 3, 40], 35, (60, 100)), ([128],)], 40, 2, 16, 16, None),
    ('packed_padding_causal_softcap', [([30, 45, 20], 33), ([70, 58],)], None, 0, 16, 32, 2.0),
]


@functools.partial(jax.jit, static_argnames=('window', 'num_global', 'block_q', 'block_k', 'backend', 'softcap'))
def _fwd_bwd(q, k, v, pos, seg, ct, *, window, num_global, block_q, block_k, backend, softcap):
  def f(q, k, v):
    return sparse_attention(q, k, v, pos, pos, seg, seg, window=window, num_global=num_global, block_q=block_q,
                            block_k=block_k, backend=backend, softcap=softcap)

  out, vjp = jax.vjp(f, q, k, v)
  return (out, *vjp(ct))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['f32', 'bf16'])
@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_outputs_and_gradients_match_reference(case, dtype):
  name, rows, window, num_global, block_q, block_k, softcap = case
  pos, seg = layout(rows)
  B, T = pos.shape
  N, K, H = 4, 2, 16
  rng = np.random.default_rng(len(name))
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
  k, v = (jnp.asarray(rng.standard_normal((B, T, K, H)), dtype) for _ in range(2))
  ct = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
  kw = dict(window=window, num_global=num_global, block_q=block_q, block_k=block_k, softcap=softcap)
  got = _fwd_bwd(q, k, v, pos, seg, ct, backend='gpu', **kw)
  want = _fwd_bwd(q, k, v, pos, seg, ct, backend='reference', **kw)
  tol = 2e-5 if dtype == jnp.float32 else 2e-2  # as test_sparse_attention.py
  for g, w, what in zip(got, want, ('out', 'dq', 'dk', 'dv')):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert np.all(np.isfinite(g)), (name, what)
    err = np.max(np.abs(g - w))
    assert err <= tol * max(1.0, np.max(np.abs(w))), f'{name} {what}: {err}'
  never = np.asarray(seg) == -1
  assert np.all(np.asarray(got[0], np.float32)[never] == 0)
  assert np.all(np.asarray(got[1], np.float32)[never] == 0)  # dq of rows that see nothing

  out, lse = sparse_attention_with_lse(q, k, v, pos, pos, seg, seg, window=window, num_global=num_global,
                                       block_q=block_q, block_k=block_k, softcap=softcap, backend='gpu')
  _, want_lse = sparse_attention_reference(q, k, v, pos, pos, seg, seg, window=window, num_global=num_global,
                                           softcap=softcap, return_lse=True)
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), np.isfinite(np.asarray(want_lse)))
  fin = np.isfinite(np.asarray(want_lse))
  np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(want_lse)[fin], rtol=0,
                             atol=2e-5 if dtype == jnp.float32 else 2e-2)


def test_tile_table_defaults_and_overrides():
  q = jax.ShapeDtypeStruct((1, 256, 8, 128), jnp.bfloat16)
  kw = dict(num_global=0, scale=None, softcap=None, block_q=None, block_k=None, backend='gpu', interpret=True)
  cfg = api.kernel_config(q, window=None, **kw)
  assert (cfg.block_q, cfg.block_k, cfg.num_warps, cfg.num_stages) == gpu.TILES[(128, 'bfloat16', 'causal')]
  assert (cfg.block_q, cfg.block_k, cfg.num_warps, cfg.num_stages) == (128, 64, 8, 2)
  cfg = api.kernel_config(q, window=1024, **dict(kw, block_k=32, num_warps=4))
  assert (cfg.block_q, cfg.block_k, cfg.num_warps, cfg.num_stages) == (128, 32, 4, 2)
  small = jax.ShapeDtypeStruct((1, 64, 2, 16), jnp.float32)  # not in the table: the previous defaults
  cfg = api.kernel_config(small, window=None, **kw)
  assert (cfg.block_q, cfg.block_k, cfg.num_warps, cfg.num_stages) == gpu.FALLBACK_TILES == (64, 64, None, None)
  cfg = api.kernel_config(q, window=None, **dict(kw, backend='tpu'))  # T = 256: the widest TPU block dividing it
  assert (cfg.block_q, cfg.block_k) == (256, 256)


def test_forward_and_backward_lower_to_triton_for_cuda():
  """On CPU, lowered for CUDA through Triton at the table's head_dim 128 bf16 tiles: the base-2 softmax and the
  split full / edge loops lower; three kernel calls (forward, dq, dk/dv)."""
  B, T, N, K, H = 1, 512, 4, 2, 128
  x = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16)
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  seg = jnp.ones((B, T), jnp.int32)

  def loss(q, k, v):
    f = lambda q, k, v: sparse_attention(q, k, v, pos, pos, seg, seg, window=128, num_global=4, backend='gpu',
                                         interpret=False)
    return jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)

  text = jax.jit(loss).trace(x, kv, kv).lower(lowering_platforms=('cuda',)).as_text()
  assert text.count('custom_call @__gpu$xla.gpu.triton') == 3, set(re.findall(r'custom_call @[^(]+', text))
