"""Paged decode attention (dsjax.model.paged_attention) against a float64 oracle over dense, contiguous per-row K/V.

The oracle never sees pages: each row's keys/values are drawn as one contiguous [length, K, H] array, and the test
writes them into a shuffled page pool itself (numpy loops, not `gather_pages`). Everything in the pool that a query
must not see (the null page, slots past a row's length, pages freed because they fell out of the window, stale
block-table entries past a row's length) holds large garbage (GARBAGE), so any leak moves the output far beyond
tolerance. Tolerances are on max |got - oracle| relative to max |oracle|:
  float32: 1e-5 (the same math up to summation order);
  bfloat16: the oracle uses the same bf16-rounded q/K/V in float64. The jnp paths round only the output
    (2^-9 relative), so 8e-3; the shipped kernels also round q*scale, the probabilities and (GPU) the per-split
    partial outputs to bf16 before their matmuls/merge, so 2e-2.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.model import paged_attention as pa

GARBAGE = 50.0
# bs=8, M=7: one token on its last page (and, for windows of 12 and 20, a window spanning its maximum number of
# blocks), an empty row, two blocks (partial), seven whole pages.
LENGTHS = (41, 0, 9, 56)


def _cdiv(a, b):
  return -(-a // b)


def visible(t, p, window, num_global):
  """The mask, from its definition: a query at position t sees key position p."""
  return (p <= t) & ((window is None) | (t - p < (window or 0)) | (p < num_global))


def make_case(seed, *, N, K, H, bs, M, dtype, window=None, num_global=0, free=True, lengths=LENGTHS):
  """Random q [B, N, H] and per-row contiguous K/V [B, M*bs, K, H] (float64 copies of the dtype-rounded values),
  and a page pool holding them: pages [K, P, bs, H] with shuffled page ids, freed out-of-window blocks (when
  `free` and a window is set) nulled in the block table, row 0's block-table entries past its length left stale
  (pointing at other rows' pages)."""
  rng = np.random.default_rng(seed)
  B = len(lengths)
  lengths = np.asarray(lengths, np.int32)
  assert lengths.max() <= M * bs
  rounded = lambda x: np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)
  q = rounded(rng.standard_normal((B, N, H)))
  k_tok, v_tok = (rounded(rng.standard_normal((B, M * bs, K, H))) for _ in range(2))
  P = 1 + B * M + 3  # the null page, every block of every row, three never-used pages
  ids = rng.permutation(np.arange(1, P))[:B * M].reshape(B, M)
  k_pages, v_pages = (np.full((K, P, bs, H), GARBAGE) for _ in range(2))
  table = np.zeros((B, M), np.int32)
  freed = 0
  for b, length in enumerate(lengths):
    t = length - 1
    for m in range(_cdiv(length, bs)):
      positions = np.arange(m * bs, (m + 1) * bs)
      if free and window is not None and not visible(t, positions, window, num_global).any():
        freed += 1  # the page went back to the pool: garbage, table entry null
        continue
      table[b, m] = ids[b, m]
      for j, p in enumerate(positions):
        if p < length:
          k_pages[:, ids[b, m], j] = k_tok[b, p]
          v_pages[:, ids[b, m], j] = v_tok[b, p]
  stale = _cdiv(lengths[0], bs)
  table[0, stale:] = ids[3, :M - stale]  # past row 0's length: another row's live pages
  if free and window is not None:
    assert freed > 0, 'the case must free some out-of-window blocks'
  jx = lambda x: jnp.asarray(x, dtype)
  paged = (jx(q), jx(k_pages), jx(v_pages), jnp.asarray(table), jnp.asarray(lengths))
  return paged, (q, k_tok, v_tok, lengths)


def oracle(q, k_tok, v_tok, lengths, *, window=None, num_global=0, scale=None, hidden=None):
  """Float64 masked softmax per row and head over the row's contiguous keys 0..length-1; empty rows give zeros.
  hidden: {row: positions} removed from that row (its block-table entries were nulled)."""
  B, N, H = q.shape
  K = k_tok.shape[2]
  scale = 1 / np.sqrt(H) if scale is None else scale
  out = np.zeros((B, N, H))
  for b, length in enumerate(lengths):
    if length == 0:
      continue
    p = np.arange(length)
    mask = visible(length - 1, p, window, num_global) & ~np.isin(p, (hidden or {}).get(b, []))
    for n in range(N):
      kv = n // (N // K)
      s = k_tok[b, :length, kv] @ q[b, n] * scale
      s = np.where(mask, s, -np.inf)
      w = np.exp(s - s.max())
      out[b, n] = (w / w.sum()) @ v_tok[b, :length, kv]
  return out


def zeros_args(B, N, K, H, bs, M, dtype=jnp.bfloat16):
  """Zero inputs for lowering; P = 1 + B*M pages."""
  P = 1 + B * M  # not a power of two: the pool is never loaded whole
  return (jnp.zeros((B, N, H), dtype), jnp.zeros((K, P, bs, H), dtype), jnp.zeros((K, P, bs, H), dtype),
          jnp.zeros((B, M), jnp.int32), jnp.zeros((B,), jnp.int32))


def assert_close(got, want, tol, what=''):
  got = np.asarray(jnp.asarray(got).astype(jnp.float32), np.float64)
  assert got.shape == want.shape, what
  err = np.abs(got - want).max() / np.abs(want).max()
  assert err <= tol, f'{what}: relative error {err:.2e} > {tol:.0e}'


def tolerance(dtype, kernel):
  if dtype == jnp.float32:
    return 1e-5
  return 2e-2 if kernel else 8e-3


@functools.partial(jax.jit, static_argnames=('window', 'num_global', 'path', 'platform', 'interpret'))
def decode(q, k_pages, v_pages, table, lengths, *, window=None, num_global=0, path='reference', platform='cpu',
           interpret=None):
  return pa.paged_decode_attention(q, k_pages, v_pages, table, lengths, window=window, num_global=num_global,
                                   path=path, platform=platform, interpret=interpret)


@functools.partial(jax.jit, static_argnames=('window', 'num_global'))
def full_gather_reference(q, k_pages, v_pages, table, lengths, *, window=None, num_global=0):
  return pa.reference_paged_attention(q, k_pages, v_pages, table, lengths, window=window, num_global=num_global)


def test_gather_pages_is_the_rows_contiguous_view():
  (_, k_pages, _, table, lengths), (_, k_tok, _, _) = make_case(0, N=2, K=2, H=8, bs=8, M=7, dtype=jnp.float32)
  view = np.asarray(pa.gather_pages(k_pages, table))
  assert view.shape == (4, 56, 2, 8)
  for b, length in enumerate(np.asarray(lengths)):
    np.testing.assert_array_equal(view[b, :length], k_tok[b, :length])
  assert (view[0, 48:] != GARBAGE).all()  # row 0's stale entries point at row 3's live pages


# (name, dtype, N, K, H, bs, M, lengths): full causal, every path that takes it on CPU. The GPU kernel covers 64
# tokens per compute block; the last case's 13 blocks of 16 make it split each row into 4 partitions (merged by
# log-sum-exp), the others run one partition.
FULL_CASES = [
    ('f32_gqa2_bs8', jnp.float32, 4, 2, 32, 8, 7, LENGTHS),
    ('bf16_gqa4_bs16', jnp.bfloat16, 4, 1, 64, 16, 4, LENGTHS),
    ('f32_gqa2_bs16_splits', jnp.float32, 4, 2, 32, 16, 13, (200, 0, 65, 131)),
]


@pytest.mark.parametrize('case', FULL_CASES, ids=[c[0] for c in FULL_CASES])
def test_full_causal_matches_oracle(case):
  """Reference path and JAX's Triton paged kernel (interpreted) against the dense oracle."""
  _, dtype, N, K, H, bs, M, lengths = case
  paged, dense = make_case(1, N=N, K=K, H=H, bs=bs, M=M, dtype=dtype, lengths=lengths)
  want = oracle(*dense)
  assert np.abs(want[1]).max() == 0 and np.abs(want[0]).max() > 0.1
  assert pa.paged_kernel('pallas', 'cpu', head_dim=H, page_size=bs, num_blocks=M, window=None,
                         dtype=dtype)[0] == 'gpu_paged_attention'
  for path in ('reference', 'pallas'):
    got = decode(*paged, path=path, platform='cpu')
    assert got.dtype == dtype
    assert_close(got, want, tolerance(dtype, path == 'pallas'), path)
    assert np.all(np.asarray(got[1], np.float32) == 0), f'{path}: the empty row must give zeros'


# (name, dtype, window, num_global): sparse rows with freed out-of-window blocks.
SPARSE_CASES = [
    ('bf16_window12', jnp.bfloat16, 12, 0),
    ('f32_window12_globals3', jnp.float32, 12, 3),
    ('f32_window20_globals9', jnp.float32, 20, 9),  # globals span two blocks, one shared with the window
    ('f32_window38_globals3', jnp.float32, 38, 3),  # window blocks + global blocks cover M: full gather fallback
]


@pytest.mark.parametrize('case', SPARSE_CASES, ids=[c[0] for c in SPARSE_CASES])
def test_sparse_matches_oracle(case):
  """Window (+ global tokens) on every path and platform (all take the windowed gather) and the full-gather
  reference, against the oracle; the window must matter (the full-causal oracle differs)."""
  _, dtype, window, num_global = case
  N, K, H, bs, M = 4, 2, 32, 8, 7
  paged, dense = make_case(2, N=N, K=K, H=H, bs=bs, M=M, dtype=dtype, window=window, num_global=num_global)
  want = oracle(*dense, window=window, num_global=num_global)
  assert np.abs(want - oracle(*dense)).max() > 0.1, 'the case must make the window matter'
  kw = dict(window=window, num_global=num_global)
  got = full_gather_reference(*paged, **kw)
  assert_close(got, want, tolerance(dtype, False), 'reference_paged_attention')
  for path, platform in (('reference', 'cpu'), ('pallas', 'gpu'), ('pallas', 'tpu')):
    kernel, _ = pa.paged_kernel(path, platform, head_dim=H, page_size=bs, num_blocks=M, window=window, dtype=dtype)
    assert kernel == 'windowed'
    got = decode(*paged, path=path, platform=platform, **kw)
    assert got.dtype == dtype
    assert_close(got, want, tolerance(dtype, False), f'{path}/{platform}')
    assert np.all(np.asarray(got[1], np.float32) == 0)


@pytest.mark.parametrize('window,num_global', [(None, 0), (20, 3)])
def test_null_pages_are_invisible(window, num_global):
  """A null block-table entry hides its positions even inside the mask (the jnp paths; the shipped kernels mask by
  length only and rely on full-causal rows having every block below their length allocated)."""
  (q, k_pages, v_pages, table, lengths), dense = make_case(6, N=4, K=2, H=32, bs=8, M=7, dtype=jnp.float32,
                                                           window=window, num_global=num_global)
  table = table.at[0, 3].set(0).at[3, 5].set(0)  # row 0: positions 24..31; row 3: 40..47
  want = oracle(*dense, window=window, num_global=num_global, hidden={0: range(24, 32), 3: range(40, 48)})
  assert np.abs(want - oracle(*dense, window=window, num_global=num_global)).max() > 0.1
  paged = (q, k_pages, v_pages, table, lengths)
  assert_close(full_gather_reference(*paged, window=window, num_global=num_global), want, 1e-5, 'full gather')
  assert_close(decode(*paged, window=window, num_global=num_global), want, 1e-5, 'paged_decode_attention')


def test_windowed_gather_is_bounded():
  """The windowed path gathers Gb + Wb blocks per row, not M (checked on the jaxpr's gathered shapes)."""
  assert pa.windowed_blocks(8, 100, window=12, num_global=3) == (1, 3)
  assert pa.windowed_blocks(8, 100, window=8, num_global=0) == (0, 2)
  assert pa.windowed_blocks(8, 100, window=1, num_global=9) == (2, 1)
  paged, _ = make_case(3, N=4, K=2, H=32, bs=8, M=7, dtype=jnp.float32, window=12, num_global=3)
  jaxpr = jax.make_jaxpr(functools.partial(pa.windowed_paged_attention, window=12, num_global=3))(*paged)
  text = str(jaxpr)
  assert 'f32[2,4,4,8,32]' in text  # the gathered pages [K, B, Gb + Wb, bs, H]
  assert 'f32[2,4,7,8,32]' not in text  # never all M blocks


def test_kernel_choice_and_fallbacks():
  choose = lambda path, platform, H=128, bs=16, M=8, window=None, dtype=jnp.bfloat16: pa.paged_kernel(
      path, platform, head_dim=H, page_size=bs, num_blocks=M, window=window, dtype=dtype)[0]
  assert choose('reference', 'gpu') == 'reference'
  assert choose('pallas', 'gpu') == choose('pallas', 'cpu') == 'gpu_paged_attention'
  assert choose('pallas', 'tpu') == 'tpu_paged_attention'
  assert choose('pallas', 'gpu', window=128) == 'gpu_paged_attention'  # the window covers all M*bs = 128 positions
  assert choose('pallas', 'gpu', window=127) == choose('pallas', 'tpu', window=127) == 'windowed'
  assert choose('pallas', 'gpu', H=96) == choose('pallas', 'gpu', H=8) == 'reference'
  assert choose('pallas', 'gpu', bs=12) == 'reference'
  assert choose('pallas', 'tpu', H=64) == 'reference'  # Mosaic block shapes need H % 128 == 0
  assert choose('pallas', 'tpu', dtype=jnp.float32) == 'reference'  # the TPU kernel rounds K/V to bf16
  with pytest.raises(ValueError, match='path'):
    choose('cudnn', 'gpu')
  q = jnp.zeros((2, 3, 16))
  pages = jnp.zeros((2, 4, 8, 16))
  with pytest.raises(ValueError, match='N % K'):
    pa.paged_decode_attention(q, pages, pages, jnp.zeros((2, 2), jnp.int32), jnp.zeros((2,), jnp.int32))


def test_gpu_kernel_fallback_matches_oracle():
  """A head_dim the Triton kernel cannot tile (48) runs the reference under path 'pallas' and is still right."""
  paged, dense = make_case(4, N=4, K=2, H=48, bs=8, M=7, dtype=jnp.float32)
  assert pa.paged_kernel('pallas', 'gpu', head_dim=48, page_size=8, num_blocks=7, window=None,
                         dtype=jnp.float32)[0] == 'reference'
  assert_close(decode(*paged, path='pallas', platform='gpu'), oracle(*dense), 1e-5)


def test_tpu_kernel_interpreted_matches_oracle():
  """JAX's Mosaic paged kernel in TPU interpret mode (bf16 pages, H = 128, GQA 2) against the oracle."""
  paged, dense = make_case(5, N=4, K=2, H=128, bs=16, M=4, dtype=jnp.bfloat16)
  got = decode(*paged, path='pallas', platform='tpu', interpret=True)
  assert got.dtype == jnp.bfloat16
  assert_close(got, oracle(*dense), tolerance(jnp.bfloat16, True))
  assert np.all(np.asarray(got[1], np.float32) == 0)


@pytest.mark.parametrize('N,K', [(4, 2), (8, 1)])  # query groups of 2 (q padded to f32 rows) and 8 (q as is)
def test_tpu_kernel_cross_lowers(N, K):
  """The TPU path passes the Pallas TPU lowering (block shapes, scalar prefetch, DMAs); Mosaic's own compile
  needs a TPU and is not checked here."""
  f = functools.partial(pa.paged_decode_attention, path='pallas', platform='tpu')
  lowered = jax.jit(f).trace(*zeros_args(3, N, K, 128, 16, 5)).lower(lowering_platforms=('tpu',))
  assert lowered.as_text().count('tpu_custom_call') == 1


def test_gpu_kernel_cross_lowers_and_its_constraints_are_the_lowerings():
  """The GPU path passes the Pallas Triton lowering for CUDA (Triton's own compile needs a GPU); the configs
  `paged_kernel` sends to the reference are ones that lowering rejects."""
  f = functools.partial(pa.paged_decode_attention, path='pallas', platform='gpu')
  lowered = jax.jit(f).trace(*zeros_args(3, 4, 2, 32, 8, 7)).lower(lowering_platforms=('cuda',))
  assert 'triton' in lowered.as_text()
  for H, bs in ((48, 8), (32, 12)):
    assert pa.paged_kernel('pallas', 'gpu', head_dim=H, page_size=bs, num_blocks=7, window=None,
                           dtype=jnp.bfloat16)[0] == 'reference'
    kernel = lambda *a: pa._gpu_paged_attention(*a, 0.1, False)  # pylint: disable=protected-access
    with pytest.raises(ValueError, match='power of 2'):
      jax.jit(kernel).trace(*zeros_args(3, 4, 2, H, bs, 7)).lower(lowering_platforms=('cuda',))


def test_tpu_kernel_needs_head_dim_multiple_of_128():
  kernel = lambda *a: pa._tpu_paged_attention(*a, 0.1, False)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match='divisible by 8 and 128'):
    jax.jit(kernel).trace(*zeros_args(3, 4, 2, 64, 16, 5)).lower(lowering_platforms=('tpu',))
