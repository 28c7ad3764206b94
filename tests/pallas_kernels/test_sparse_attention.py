"""Tests for pallas_kernels.sparse_attention (Pallas kernels run in interpret mode on CPU)."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_attention import (
    count_visited_blocks,
    make_schedule,
    sparse_attention,
    sparse_attention_mask,
    sparse_attention_reference,
    transpose_schedule,
)
from pallas_kernels.sparse_attention.schedule import visited_blocks


def packed_row(doc_lens, pad=0, never=(), pad_segment=0):
  """Positions/segments of one packed row: documents (segments 1, 2, ...), then `pad` padding tokens (segment
  `pad_segment`: 0, a padding document with positions 0..pad-1, or -1, kernel padding with position 0). `never`:
  indices overwritten with segment -1 (position 0)."""
  pos, seg = [], []
  for d, n in enumerate(doc_lens):
    pos += list(range(n))
    seg += [d + 1] * n
  pos += list(range(pad)) if pad_segment != -1 else [0] * pad
  seg += [pad_segment] * pad
  pos, seg = np.array(pos, np.int32), np.array(seg, np.int32)
  for i in never:
    # A token that nothing matches. Its neighbours keep their positions, so documents stay contiguous
    # runs with consistent positions apart from the hole (keys never match it; as a query it is skipped).
    pos[i], seg[i] = 0, -1
  return pos, seg


def layout(rows, pad_segment=0):
  pos, seg = zip(*[packed_row(*r, pad_segment=pad_segment) for r in rows])
  return jnp.asarray(np.stack(pos)), jnp.asarray(np.stack(seg))


def brute_force_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, window, num_global, scale, softcap=None):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  out = np.zeros((B, T, N, H))
  for b in range(B):
    for n in range(N):
      kh = n // (N // K)
      for i in range(T):
        vis = []
        for j in range(S):
          ok = (q_seg[b, i] == k_seg[b, j] and k_seg[b, j] != -1 and k_pos[b, j] <= q_pos[b, i])
          if window is not None:
            ok = ok and (q_pos[b, i] - k_pos[b, j] < window or k_pos[b, j] < num_global)
          if ok:
            vis.append(j)
        if not vis:
          continue
        logits = np.array([scale * q[b, i, n] @ k[b, j, kh] for j in vis])
        if softcap is not None:
          logits = softcap * np.tanh(logits / softcap)
        w = np.exp(logits - logits.max())
        w /= w.sum()
        out[b, i, n] = sum(wj * v[b, j, kh] for wj, j in zip(w, vis))
  return out


def test_reference_matches_brute_force():
  rng = np.random.default_rng(0)
  B, T, S, N, K, H = 2, 12, 12, 4, 2, 8
  q = rng.standard_normal((B, T, N, H)).astype(np.float32)
  k = rng.standard_normal((B, S, K, H)).astype(np.float32)
  v = rng.standard_normal((B, S, K, H)).astype(np.float32)
  pos = np.array([[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0]], np.int32)
  seg = np.array([[1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 0, 0], [3, 3, 3, 3, 3, 3, 3, 3, 3, 3, -1, 0]], np.int32)
  for window, num_global, softcap in [(None, 0, None), (3, 0, None), (3, 2, 0.5), (100, 1, None)]:
    scale = 1 / math.sqrt(H)
    want = brute_force_attention(q, k, v, pos, pos, seg, seg, window, num_global, scale, softcap)
    got = sparse_attention_reference(q, k, v, pos, pos, seg, seg, window=window,
                                     num_global=num_global, softcap=softcap)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  # The segment -1 query sees nothing: output 0.
  assert np.all(np.asarray(got)[1, 10] == 0)


# (name, dtype, B, N, K, H, rows (doc_lens, pad, never), window, num_global, block_q, block_k, softcap)
CASES = [
    ('f32_causal_single_doc_mha', jnp.float32, 1, 4, 4, 16, [([64],)], None, 0, 16, 16, None),
    ('f32_window8_global2_gqa2_packed_tail', jnp.float32, 2, 4, 2, 16,
     [([30, 35, 10], 5, (40,)), ([80],)], 8, 2, 16, 32, None),
    ('f32_window_gt_T_global2_gqa4_tail', jnp.float32, 1, 4, 1, 32, [([60, 30], 10)], 200, 2, 32, 16, None),
    ('f32_window16_gqa2_packed', jnp.float32, 2, 4, 2, 16, [([50, 46],), ([20, 20, 40], 16)], 16, 0,
     32, 32, None),
    ('f32_causal_global_noop_gqa4_tail', jnp.float32, 1, 4, 1, 16, [([40, 25], 5)], None, 2, 16, 16, None),
    ('f32_window5_global2_long', jnp.float32, 1, 4, 2, 16, [([150], 10)], 5, 2, 16, 16, None),
    # A cap of 1.0 bends scores of size ~1 hard, so a wrong tanh' in the backward shows.
    ('f32_softcap_window8_global2_gqa2_tail', jnp.float32, 1, 4, 2, 16, [([45, 30], 7)], 8, 2, 16, 16, 1.0),
    ('f32_softcap_causal_mha', jnp.float32, 1, 2, 2, 16, [([64],)], None, 0, 32, 16, 2.0),
    ('bf16_window8_global2_gqa2_packed_tail', jnp.bfloat16, 1, 4, 2, 32, [([45, 30], 5, (3,))], 8, 2,
     16, 32, None),
    ('bf16_causal_mha', jnp.bfloat16, 1, 4, 4, 16, [([64],)], None, 0, 32, 32, None),
    ('bf16_softcap_window16_gqa2', jnp.bfloat16, 1, 4, 2, 16, [([70],)], 16, 1, 16, 16, 1.0),
]


@functools.partial(jax.jit, static_argnames=('window', 'num_global', 'block_q', 'block_k', 'backend', 'softcap'))
def _fwd_bwd(q, k, v, pos, seg, ct, *, window, num_global, block_q, block_k, backend, softcap):
  def f(q, k, v):
    return sparse_attention(q, k, v, pos, pos, seg, seg, window=window, num_global=num_global,
                            block_q=block_q, block_k=block_k, backend=backend, softcap=softcap)

  out, vjp = jax.vjp(f, q, k, v)
  return (out, *vjp(ct))


def _close(got, want, tol, name):
  got = np.asarray(got, np.float32)
  want = np.asarray(want, np.float32)
  assert got.shape == want.shape, name
  err = np.max(np.abs(got - want))
  bound = tol * max(1.0, np.max(np.abs(want)))
  assert err <= bound, f'{name}: max abs err {err} > {bound}'


@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_reference(case):
  name, dtype, B, N, K, H, rows, window, num_global, block_q, block_k, softcap = case
  pos, seg = layout(rows)
  T = pos.shape[1]
  assert T % block_q or T % block_k or 'tail' not in name
  rng = np.random.default_rng(len(name))
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
  k = jnp.asarray(rng.standard_normal((B, T, K, H)), dtype)
  v = jnp.asarray(rng.standard_normal((B, T, K, H)), dtype)
  ct = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
  kw = dict(window=window, num_global=num_global, block_q=block_q, block_k=block_k, softcap=softcap)
  got = _fwd_bwd(q, k, v, pos, seg, ct, backend='gpu', **kw)
  want = _fwd_bwd(q, k, v, pos, seg, ct, backend='reference', **kw)
  # float32: same math up to summation order. bfloat16: the kernel rounds the probabilities (and ds in
  # the backward) to bf16 before the MXU-style matmuls, as flash attention does, while the reference
  # stays in float32 until the final cast; bf16 has a 2^-8 ~ 4e-3 relative step, and sums of T such
  # terms give errors of a few 1e-3 of the largest value, so 2e-2 (of max |ref|) is the bound.
  tol = 2e-5 if dtype == jnp.float32 else 2e-2
  for g, w, what in zip(got, want, ('out', 'dq', 'dk', 'dv')):
    assert g.dtype == dtype, what
    _close(g, w, tol, f'{name} {what}')
  # Rows that see nothing (segment -1 tokens) give zero output.
  never = np.asarray(seg) == -1
  if never.any():
    assert np.all(np.asarray(got[0], np.float32)[never] == 0)


def test_schedule_counts_single_document():
  T, b = 256, 16
  nq = nk = T // b
  pos = jnp.arange(T, dtype=jnp.int32)[None]
  seg = jnp.ones((1, T), jnp.int32)
  count = functools.partial(count_visited_blocks, pos, seg, block_q=b, block_k=b)
  # Causal: query block i visits key blocks 0..i.
  assert count() == nq * (nq + 1) // 2 == 136
  # Window W = w * b: query block i (rows 16i..16i+15) needs keys from 16i - W + 1, i.e. blocks i-w..i.
  for w in (1, 2, 4):
    want = sum(min(i, w) + 1 for i in range(nq))
    assert count(window=w * b) == want
  assert count(window=b) == 1 + 2 * (nq - 1) == 31
  # Window 16 + 2 globals: key block 0 is extra for query blocks i >= 2 (for i < 2 it is local).
  assert count(window=b, num_global=2) == 31 + (nq - 2) == 45
  # Window larger than T: same as causal; globals then add nothing.
  assert count(window=10 * T, num_global=2) == 136
  # Skipping is real.
  assert count(window=b, num_global=2) < 0.2 * nq * nk
  # block_q != block_k, causal: query block i (32 rows) visits key blocks 0..2i+1 of 16.
  assert count_visited_blocks(pos, seg, block_q=32, block_k=16) == sum(2 * i + 2 for i in range(8))


def test_schedule_ranges_disjoint_and_packed_docs_skip():
  # Two documents: the query blocks of the second never visit the first's blocks (causal).
  pos, seg = layout([([64, 64],)])
  sched = np.asarray(make_schedule(pos, seg, block_q=16, block_k=16))
  assert np.all(sched[0, 4:, 2] == 4)  # local range starts at the second document's first block
  assert count_visited_blocks(pos, seg, block_q=16, block_k=16) == 2 * 10
  pos, seg = layout([([40, 70, 18], 0), ([128],)])
  sched = np.asarray(make_schedule(pos, seg, block_q=16, block_k=16, window=20, num_global=3))
  assert np.all(sched[..., 1] <= sched[..., 2])
  assert np.all(sched[..., 0] <= sched[..., 1]) and np.all(sched[..., 2] <= sched[..., 3])


@pytest.mark.parametrize('window,num_global', [(None, 0), (7, 0), (7, 3), (33, 1), (500, 2)])
@pytest.mark.parametrize('bq,bk', [(16, 16), (32, 16), (16, 32)])
def test_schedule_covers_every_visible_pair(window, num_global, bq, bk):
  pos, seg = layout([([30, 3, 50, 20], 25, (10, 60)), ([1, 40, 60], 27), ([128],)])
  T = pos.shape[1]
  mask = np.asarray(sparse_attention_mask(pos, pos, seg, seg, window=window, num_global=num_global))
  need = mask.reshape(3, T // bq, bq, T // bk, bk).any(axis=(2, 4))  # [B, nq, nk]
  sched = make_schedule(pos, seg, block_q=bq, block_k=bk, window=window, num_global=num_global)
  vis = np.asarray(visited_blocks(sched, T // bk))
  assert not np.any(need & ~vis)
  # Transposed schedule (dk/dv kernel) covers every visible pair too.
  ts = np.asarray(transpose_schedule(sched, T // bk))
  i = np.arange(T // bq)[None, :, None]
  tvis = (ts[:, None, :, 0] <= i) & (i < ts[:, None, :, 1])
  assert not np.any(need & ~tvis)


def test_validation_errors():
  q = jnp.zeros((1, 32, 4, 16))
  k = jnp.zeros((1, 32, 3, 16))
  p = jnp.zeros((1, 32), jnp.int32)
  with pytest.raises(ValueError, match='must divide'):
    sparse_attention(q, k, k, p, p, p, p)
  k = jnp.zeros((2, 32, 2, 16))
  with pytest.raises(ValueError, match='batch mismatch'):
    sparse_attention(q, k, k, p, p, p, p)
  k = jnp.zeros((1, 48, 2, 16))
  p48 = jnp.zeros((1, 48), jnp.int32)
  with pytest.raises(ValueError, match='S == T'):
    sparse_attention(q, k, k, p, p48, p, p48)
  with pytest.raises(ValueError, match='k_pos must have shape'):
    sparse_attention(q, k, k, p, p, p, p48, backend='reference')
  k = jnp.zeros((1, 32, 2, 16))
  with pytest.raises(ValueError, match='window'):
    sparse_attention(q, k, k, p, p, p, p, window=0)
  with pytest.raises(ValueError, match='backend'):
    sparse_attention(q, k, k, p, p, p, p, backend='cuda')
  with pytest.raises(ValueError, match='softcap'):
    sparse_attention(q, k, k, p, p, p, p, softcap=0.0)
  # The reference backend allows S != T (cross attention).
  out = sparse_attention(q, jnp.zeros((1, 48, 2, 16)), jnp.zeros((1, 48, 2, 16)), p, p48, p, p48,
                         backend='reference')
  assert out.shape == q.shape
