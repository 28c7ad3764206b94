"""Tests for the split-K decode attention kernel (Pallas, interpret mode on CPU)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_attention import (
    default_num_splits,
    sparse_attention_reference,
    sparse_decode_attention,
)

# bfloat16: q/k/v are the same bf16 values for kernel and reference (the reference upcasts them), but
# the kernel feeds the probabilities to the P @ V dot in bf16 (8-bit mantissa, ~4e-3 relative) and
# both round the output to bf16, so a 2e-2 bound relative to max|ref| leaves a safe margin.
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def random_cache(rng, S, length, *, fill=0.8, seg=1):
  """An unordered cache of S slots holding distinct positions of one document of `length` tokens
  (segment `seg`); about (1 - fill) of the slots are empty (segment -1, position 0)."""
  n = min(S, length, max(1, int(round(S * fill))))
  pos = np.zeros(S, np.int32)
  segs = np.full(S, -1, np.int32)
  slots = rng.permutation(S)[:n]
  pos[slots] = np.sort(rng.choice(length, n, replace=False))
  segs[slots] = seg
  return pos, segs


def ring_cache(rng, S, length, *, window, num_global, seg=1):
  """Ring buffer of a sparse model's bounded cache: the first `num_global` tokens, then the last
  `window` tokens stored at slot num_global + pos % window (so slots wrap around), remaining slots empty;
  then the slot order is shuffled."""
  assert S >= num_global + window
  pos = np.zeros(S, np.int32)
  segs = np.full(S, -1, np.int32)
  for p in range(min(num_global, length)):
    pos[p], segs[p] = p, seg
  for p in range(max(num_global, length - window), length):
    slot = num_global + p % window
    pos[slot], segs[slot] = p, seg
  perm = rng.permutation(S)
  return pos[perm], segs[perm]


def make_inputs(rng, B, Tq, N, K, S, H, dtype):
  q = rng.standard_normal((B, Tq, N, H)).astype(np.float32)
  k = rng.standard_normal((B, S, K, H)).astype(np.float32)
  v = rng.standard_normal((B, S, K, H)).astype(np.float32)
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def check(q, k, v, q_pos, k_pos, q_seg, k_seg, *, window=None, num_global=0, softcap=None, **kw):
  args = tuple(jnp.asarray(x) for x in (q_pos, k_pos, q_seg, k_seg))
  # jit both: one XLA compile each instead of op-by-op dispatch (keeps the suite fast on CPU).
  fn = jax.jit(functools.partial(sparse_decode_attention, window=window, num_global=num_global,
                                 softcap=softcap, interpret=True, **kw))
  ref = jax.jit(functools.partial(sparse_attention_reference, window=window, num_global=num_global,
                                  softcap=softcap))
  got = fn(q, k, v, *args)
  want = ref(q, k, v, *args)
  assert got.shape == q.shape and got.dtype == q.dtype
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  tol = TOL[q.dtype.type] * max(1.0, float(np.abs(want).max()))
  np.testing.assert_allclose(got, want, rtol=0, atol=tol)
  return got, want


CASES = [
    # Tq, N, K, S, block_k, num_splits, window, num_global, dtype
    (1, 4, 4, 100, 32, 1, None, 0, jnp.float32),  # GQA 1, S % block_k != 0
    (4, 4, 2, 100, 32, 3, None, 0, jnp.float32),  # GQA 2, 3 splits (one mostly padding)
    (1, 8, 2, 200, 16, None, 5, 0, jnp.float32),  # GQA 4, auto splits, small window
    (4, 8, 2, 77, 16, 3, 7, 2, jnp.float32),  # window + global tokens
    (4, 8, 8, 64, 64, 1, 9, 2, jnp.float32),  # exactly one block
    (1, 4, 1, 130, 32, None, None, 0, jnp.float32),  # multi-query (GQA 4 with K=1)
    (4, 8, 2, 100, 32, 3, None, 0, jnp.bfloat16),
    (1, 4, 2, 90, 16, None, 6, 2, jnp.bfloat16),
]


@pytest.mark.parametrize('case', CASES, ids=lambda c: '-'.join(map(str, c[:8])))
def test_decode_matches_reference_random_cache(case):
  Tq, N, K, S, block_k, num_splits, window, num_global, dtype = case
  rng = np.random.default_rng(Tq * 1000 + N * 100 + S)
  B, H = 2, 16
  q, k, v = make_inputs(rng, B, Tq, N, K, S, H, dtype)
  k_pos, k_seg, q_pos = [], [], []
  for b in range(B):
    length = S + 20 * b  # the query tokens are the last Tq of the document; cache holds a subset
    p, s = random_cache(rng, S, length, fill=0.9 - 0.2 * b)
    k_pos.append(p)
    k_seg.append(s)
    q_pos.append(np.arange(length - Tq, length))
  q_pos = np.array(q_pos, np.int32)
  check(q, k, v, q_pos, np.stack(k_pos), np.ones_like(q_pos), np.stack(k_seg), window=window,
        num_global=num_global, block_k=block_k, num_splits=num_splits)


@pytest.mark.parametrize('Tq,num_splits,dtype,softcap', [(1, 1, jnp.float32, None), (4, 3, jnp.float32, 1.0),
                                                         (4, None, jnp.bfloat16, None)])
def test_ring_buffer_cache(Tq, num_splits, dtype, softcap):
  """Bounded num_global + window cache in ring-buffer order (shuffled) with empty slots."""
  rng = np.random.default_rng(Tq)
  window, num_global = 24, 2
  B, N, K, H, S = 2, 4, 2, 16, 40  # S > num_global + window: spare slots stay empty
  q, k, v = make_inputs(rng, B, Tq, N, K, S, H, dtype)
  lengths = (17, 103)  # row 0: cache not yet full; row 1: wrapped around several times
  caches = [ring_cache(rng, S, n, window=window, num_global=num_global) for n in lengths]
  q_pos = np.array([np.arange(n - Tq, n) for n in lengths], np.int32)
  got, _ = check(q, k, v, q_pos, np.stack([c[0] for c in caches]), np.ones_like(q_pos),
                 np.stack([c[1] for c in caches]), window=window, num_global=num_global,
                 block_k=16, num_splits=num_splits, softcap=softcap)
  assert np.abs(got).min() >= 0 and np.all(np.abs(got).sum(-1) > 0)  # every row sees something


def test_two_documents_and_row_without_visible_keys():
  """Row 0: cache holds documents 1 and 2 interleaved; the queries see only their own document.
  Row 1: the second query token belongs to a document with nothing in the cache -> zeros."""
  rng = np.random.default_rng(7)
  B, Tq, N, K, H, S = 2, 4, 4, 2, 16, 70
  q, k, v = make_inputs(rng, B, Tq, N, K, S, H, jnp.float32)
  p1, s1 = random_cache(rng, S, 60, fill=0.5, seg=1)
  p2, s2 = random_cache(rng, S, 50, fill=0.4, seg=2)
  both = s1 == -1  # put document 2 into slots document 1 left empty
  p1[both], s1[both] = p2[both], s2[both]
  assert {1, 2} <= set(s1.tolist())
  p_r1, s_r1 = random_cache(rng, S, 80, fill=0.7, seg=3)
  k_pos, k_seg = np.stack([p1, p_r1]), np.stack([s1, s_r1])
  q_pos = np.array([[50, 51, 59, 60], [76, 3, 77, 78]], np.int32)
  q_seg = np.array([[2, 2, 1, 1], [3, 9, 3, 3]], np.int32)  # segment 9: nothing cached
  for num_splits in (1, 3):
    got, want = check(q, k, v, q_pos, k_pos, q_seg, k_seg, block_k=16, num_splits=num_splits)
    np.testing.assert_array_equal(got[1, 1], 0.0)
    assert np.all(np.abs(got[1, [0, 2, 3]]).sum(-1) > 0)
  # Cross-check document isolation: dropping document 1 from the cache leaves document 2 queries as is.
  k_seg_only2 = np.where(k_seg == 1, -1, k_seg)
  got2, _ = check(q, k, v, q_pos, k_pos, q_seg, k_seg_only2, block_k=16, num_splits=3)
  np.testing.assert_allclose(got2[0, :2], got[0, :2], rtol=0, atol=1e-6)


def test_window_excludes_everything_but_globals_and_empty_cache():
  rng = np.random.default_rng(3)
  B, Tq, N, K, H, S = 2, 1, 2, 1, 16, 33
  q, k, v = make_inputs(rng, B, Tq, N, K, S, H, jnp.float32)
  k_pos = np.tile(np.arange(S, dtype=np.int32), (B, 1))
  k_seg = np.ones((B, S), np.int32)
  k_seg[1] = -1  # row 1: empty cache -> zeros
  q_pos = np.array([[200], [200]], np.int32)  # far beyond the window: only global tokens visible
  got, _ = check(q, k, v, q_pos, k_pos, np.ones_like(q_pos), k_seg, window=4, num_global=2,
                 block_k=16, num_splits=2)
  np.testing.assert_array_equal(got[1], 0.0)
  assert np.all(np.abs(got[0]).sum(-1) > 0)  # row 0 sees exactly the 2 global tokens


def test_default_num_splits():
  assert default_num_splits(1, 64) == 1
  assert default_num_splits(256, 64) == 1
  assert default_num_splits(257, 64) == 2
  assert default_num_splits(10**6, 64) == 16


def test_validation_errors():
  q = jnp.zeros((1, 2, 4, 8))
  kv = jnp.zeros((1, 10, 2, 8))
  qp, kp = jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 10), jnp.int32)
  call = lambda q, k, v, qp, kp, **kw: sparse_decode_attention(q, k, v, qp, kp, qp, kp,
                                                               interpret=True, **kw)
  with pytest.raises(ValueError, match='must divide'):
    call(q, jnp.zeros((1, 10, 3, 8)), jnp.zeros((1, 10, 3, 8)), qp, kp)
  with pytest.raises(ValueError, match='batch'):
    call(q, jnp.zeros((2, 10, 2, 8)), jnp.zeros((2, 10, 2, 8)), qp, jnp.zeros((2, 10), jnp.int32))
  with pytest.raises(ValueError, match='head_dim'):
    call(q, jnp.zeros((1, 10, 2, 4)), jnp.zeros((1, 10, 2, 4)), qp, kp)
  with pytest.raises(ValueError, match='q_pos'):
    call(q, kv, kv, jnp.zeros((1, 3), jnp.int32), kp)
  with pytest.raises(ValueError, match='k_pos'):
    call(q, kv, kv, qp, jnp.zeros((1, 9), jnp.int32))
  with pytest.raises(ValueError, match='same shape'):
    call(q, kv, jnp.zeros((1, 11, 2, 8)), qp, kp)
  with pytest.raises(ValueError, match='num_splits'):
    call(q, kv, kv, qp, kp, num_splits=0)
  with pytest.raises(ValueError, match='block_k'):
    call(q, kv, kv, qp, kp, block_k=0)
