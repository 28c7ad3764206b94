"""Tests for the decode attention kernels (Triton split-K and Mosaic TPU, interpret mode on CPU): against the
reference on random, ring-buffer and multi-document caches, a stacked [L, B, S, K, H] cache read at a traced layer,
the log-sum-exp output and merging a chunk's attention to itself with its attention to the cache."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_attention import (
    default_decode_tiles,
    default_num_splits,
    merge_attention,
    sparse_attention_reference,
    sparse_attention_with_lse,
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
  """Splits fill WAVES=2 waves of programs over the cores, clipped to the key blocks and MAX_SPLITS (32), then the
  fewest splits with the same blocks per split. Values computed by hand."""
  # B*K = 1 on 132 cores: want 264; S=260, block_k 64 -> 5 blocks -> 5 splits of one block.
  assert default_num_splits(1, 1, 260, 64, num_cores=132) == 5
  assert default_num_splits(1, 1, 1, 64, num_cores=132) == 1  # one block
  assert default_num_splits(1, 1, 10**6, 64, num_cores=132) == 32  # MAX_SPLITS
  # B*K = 8: ceil(264 / 8) = 33 -> 32; 10**5 slots = 1563 blocks -> 32 splits of 49 blocks.
  assert default_num_splits(1, 8, 10**5, 64, num_cores=132) == 32
  # B*K = 64: ceil(264 / 64) = 5 splits; 4096 slots = 64 blocks -> 13 blocks per split -> still 5 splits.
  assert default_num_splits(8, 8, 4096, 64, num_cores=132) == 5
  # B*K = 264 or more: one wave pair already, 1 split.
  assert default_num_splits(33, 8, 4096, 64, num_cores=132) == 1
  assert default_num_splits(256, 8, 4096, 64, num_cores=132) == 1
  # 10 blocks, want ceil(264 / 66) = 4 -> 3 blocks per split -> 4 splits (the last one 1 block).
  assert default_num_splits(66, 1, 640, 64, num_cores=132) == 4
  # 5 blocks, want 4 -> 2 blocks per split -> 3 splits, not 4 (the 4th would be empty).
  assert default_num_splits(66, 1, 260, 64, num_cores=132) == 3
  # 108 cores (A100), B*K = 16: ceil(216 / 16) = 14 splits; 2000 slots / 128 = 16 blocks -> 2 per split -> 8.
  assert default_num_splits(2, 8, 2000, 128, num_cores=108) == 8
  # Without a GPU the documented default core count is used.
  assert default_num_splits(1, 8, 10**5, 64) == default_num_splits(1, 8, 10**5, 64, num_cores=132)


def test_default_decode_tiles():
  assert default_decode_tiles(128, jnp.bfloat16) == (64, 4, 2)
  assert default_decode_tiles(96, jnp.bfloat16) == (64, 4, 2)  # not in the table: the fallback


def stacked_case(rng, dtype, *, L=3, B=2, Tq=3, N=4, K=2, S=70, H=16, window=None, num_global=0):
  """Every layer's cache [L, B, S, K, H] (S not a multiple of the blocks), shuffled positions with empty slots."""
  q = jnp.asarray(rng.standard_normal((B, Tq, N, H)), dtype)
  k, v = (jnp.asarray(rng.standard_normal((L, B, S, K, H)), dtype) for _ in range(2))
  caches = [random_cache(rng, S, S + 10, fill=0.8) for _ in range(B)]
  k_pos, k_seg = (jnp.asarray(np.stack(x)) for x in zip(*caches))
  q_pos = jnp.asarray(np.tile(np.arange(S + 10, S + 10 + Tq), (B, 1)), jnp.int32)
  return q, k, v, q_pos, k_pos, jnp.ones_like(q_pos), k_seg, dict(window=window, num_global=num_global)


@pytest.mark.parametrize('backend', ['gpu', 'tpu'])
@pytest.mark.parametrize('dtype,window,num_global', [(jnp.float32, None, 0), (jnp.float32, 9, 2),
                                                     (jnp.bfloat16, 20, 0)])
def test_stacked_cache_is_read_at_the_traced_layer(backend, dtype, window, num_global):
  """The kernel reads layer `layer` of every layer's cache (no slice copied out), and with return_lse gives the
  log-sum-exp of each row's visible scores (-inf where a row sees nothing)."""
  rng = np.random.default_rng(11)
  q, k, v, q_pos, k_pos, q_seg, k_seg, mask = stacked_case(rng, dtype, window=window, num_global=num_global)
  q_seg = q_seg.at[1, 2].set(5)  # a query of a document with nothing cached
  fn = jax.jit(lambda layer: sparse_decode_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, layer=layer,
                                                     backend=backend, interpret=True, block_k=16, return_lse=True,
                                                     **mask))
  got, lse = fn(jnp.int32(1))
  want, want_lse = sparse_attention_reference(q, k[1], v[1], q_pos, k_pos, q_seg, k_seg, return_lse=True, **mask)
  tol = TOL[dtype] * float(jnp.abs(want.astype(jnp.float32)).max())
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=0, atol=tol)
  assert got.dtype == dtype and lse.shape == want_lse.shape == (2, 4, 3)
  np.testing.assert_array_equal(np.isinf(np.asarray(lse)), np.isinf(np.asarray(want_lse)))
  assert np.isinf(np.asarray(lse)[1, :, 2]).all()
  finite = np.isfinite(np.asarray(want_lse))
  np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(want_lse)[finite], rtol=0, atol=1e-2)


@pytest.mark.parametrize('Tq,N,K,S,window,num_global,dtype', [
    (1, 4, 4, 100, None, 0, jnp.float32),  # S % block_k != 0: a masked partial last block
    (4, 8, 2, 77, 7, 2, jnp.float32),  # GQA 4, window + global tokens
    (2, 4, 1, 40, 6, 2, jnp.bfloat16),  # multi-query
])
def test_tpu_backend_matches_reference(Tq, N, K, S, window, num_global, dtype):
  rng = np.random.default_rng(S)
  B, H = 2, 16
  q, k, v = make_inputs(rng, B, Tq, N, K, S, H, dtype)
  k_pos, k_seg = zip(*[random_cache(rng, S, S + 20 * b, fill=0.9 - 0.2 * b) for b in range(B)])
  q_pos = np.array([np.arange(S + 20 * b - Tq, S + 20 * b) for b in range(B)], np.int32)
  check(q, k, v, q_pos, np.stack(k_pos), np.ones_like(q_pos), np.stack(k_seg), window=window,
        num_global=num_global, block_k=32, backend='tpu')


@pytest.mark.parametrize('window,num_global', [(None, 0), (5, 2)])
def test_chunk_and_cache_merge_exactly(window, num_global):
  """A prompt chunk continuing a cached document: flash attention of the chunk to itself merged with decode
  attention to the cache equals attention to both key sets at once."""
  rng = np.random.default_rng(4)
  B, T, N, K, H, S = 2, 20, 4, 2, 16, 30
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
  k_new, v_new = (jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32) for _ in range(2))
  k_old, v_old = (jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.float32) for _ in range(2))
  pos = jnp.asarray(np.tile(np.arange(S, S + T), (B, 1)), jnp.int32)  # the chunk continues positions 0..S-1
  seg = jnp.ones((B, T), jnp.int32).at[1, 15:].set(0)  # padding at the end of row 1
  old_pos = jnp.asarray(np.tile(rng.permutation(S), (B, 1)), jnp.int32)  # the cache in any slot order
  old_seg = jnp.ones((B, S), jnp.int32).at[0, :3].set(-1)  # a few empty slots
  kw = dict(window=window, num_global=num_global)

  @jax.jit
  def merged(q, k_new, v_new, k_old, v_old):
    chunk = sparse_attention_with_lse(q, k_new, v_new, pos, pos, seg, seg, interpret=True, block_q=8, block_k=8,
                                      **kw)
    past = sparse_decode_attention(q, k_old, v_old, pos, old_pos, seg, old_seg, return_lse=True, interpret=True,
                                   block_k=8, **kw)
    return merge_attention([chunk, past])

  got = merged(q, k_new, v_new, k_old, v_old)
  both = lambda x, y: jnp.concatenate([x, y], axis=1)
  want = sparse_attention_reference(q, both(k_old, k_new), both(v_old, v_new), pos, both(old_pos, pos), seg,
                                    both(old_seg, seg), **kw)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-5)


def test_flash_lse_matches_reference():
  rng = np.random.default_rng(5)
  B, T, N, K, H = 1, 40, 4, 2, 16
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32) for _ in range(2))
  pos = jnp.asarray(np.concatenate([np.arange(25), np.arange(15)])[None], jnp.int32)
  seg = jnp.asarray(np.repeat([1, 2], [25, 15])[None], jnp.int32)
  out, lse = jax.jit(lambda q, k, v: sparse_attention_with_lse(q, k, v, pos, pos, seg, seg, window=6, num_global=1,
                                                               interpret=True))(q, k, v)
  want, want_lse = sparse_attention_reference(q, k, v, pos, pos, seg, seg, window=6, num_global=1, return_lse=True)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=0, atol=2e-5)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), rtol=0, atol=2e-5)


@pytest.mark.parametrize('backend,platform,call', [('tpu', 'tpu', 'tpu_custom_call'), ('gpu', 'cuda', 'triton')])
def test_decode_lowers_reading_the_stacked_cache_in_place(backend, platform, call):
  """Lowered for the real device (on CPU): one kernel call whose operand is every layer's cache as it is: no
  per-layer slice and no padding of a cache that is not a multiple of the block (300 slots here)."""
  L, B, S, K, N, H = 4, 2, 300, 4, 16, 128
  cache = jax.ShapeDtypeStruct((L, B, S, K, H), jnp.bfloat16)
  q = jax.ShapeDtypeStruct((B, 1, N, H), jnp.bfloat16)
  rows = jnp.zeros((B, S), jnp.int32)
  query_rows = jnp.zeros((B, 1), jnp.int32)

  def step(q, k, v, layer):
    return sparse_decode_attention(q, k, v, query_rows, rows, query_rows, rows, layer=layer, window=256,
                                   num_global=4, backend=backend, interpret=False)

  text = jax.jit(step).trace(q, cache, cache, jnp.int32(2)).lower(lowering_platforms=(platform,)).as_text()
  assert text.count(call) == 1
  cache_shape = (L, B, S, K * H) if backend == 'tpu' else (L, B, S, K, H)  # [L, B, S, K*H]: a free reshape
  shapes = {tuple(int(d) for d in dims.split('x')[:-1]) for dims in re.findall(r'tensor<((?:\d+x)+)[a-z]', text)}
  with_slots = {shape for shape in shapes if S in shape}
  # The cache is only ever the whole stacked array (and its [B, S] / [B, 2, S] slot metadata): never one layer's
  # [B, S, K, H] slice, never padded past S slots.
  assert with_slots <= {(L, B, S, K, H), cache_shape, (B, S), (B, 1, S), (B, 2, S)}, with_slots
  assert not any(S < d <= 2 * S and d != K * H for shape in shapes for d in shape), shapes
