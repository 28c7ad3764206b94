"""Tests for pallas_kernels.routed_attention (Pallas kernels in interpret mode on CPU) against the dense
reference, which is itself checked against a brute-force loop oracle in test_sparse_attention.py."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.routed_attention import (
    count_routed_visited_blocks,
    gather_rows,
    group_by_head,
    routed_attention,
    routed_attention_reference,
    scatter_rows,
)
from pallas_kernels.routed_attention import api as routed_api
from pallas_kernels.sparse_attention import count_visited_blocks, sparse_attention
from tests.pallas_kernels.test_sparse_attention import layout


def random_routing(rng, B, T, N, top_k, num_shared=0):
  """(gates [B,T,N] float32, active [B,T,N] bool): shared heads always on with gate 1, top_k of the others
  chosen uniformly per token with positive gates."""
  routed = N - num_shared
  scores = rng.random((B, T, routed))
  chosen = np.argsort(-scores, axis=-1)[..., :top_k]
  active = np.zeros((B, T, routed), bool)
  np.put_along_axis(active, chosen, True, axis=-1)
  gates = np.where(active, rng.random((B, T, routed)) + 0.5, 0.0)
  active = np.concatenate([np.ones((B, T, num_shared), bool), active], axis=-1)
  gates = np.concatenate([np.ones((B, T, num_shared)), gates], axis=-1)
  return jnp.asarray(gates, jnp.float32), jnp.asarray(active)


def test_grouping_against_loop_oracle():
  rng = np.random.default_rng(0)
  B, T, N, H = 2, 9, 3, 2
  active = rng.random((B, T, N)) < 0.4
  groups = group_by_head(jnp.asarray(active))
  for b in range(B):
    for n in range(N):
      tokens = [t for t in range(T) if active[b, t, n]]
      assert list(np.asarray(groups.index[b, n, :len(tokens)])) == tokens
      assert np.asarray(groups.valid[b, n]).tolist() == [c < len(tokens) for c in range(T)]
  x = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
  rows = gather_rows(x, groups)
  back = scatter_rows(rows, groups)
  np.testing.assert_array_equal(np.asarray(back), np.where(active[..., None], np.asarray(x), 0.0))


def _one_hot_rows(active):
  """Dense oracle of the grouping: P [B, N, C, T] with P[b, n, c, t] = 1 iff token t is head n's c-th active
  token (numpy loops, independent of grouping.py)."""
  B, T, N = active.shape
  P = np.zeros((B, N, T, T), np.float32)
  for b in range(B):
    for n in range(N):
      for c, t in enumerate(np.flatnonzero(active[b, :, n])):
        P[b, n, c, t] = 1.0
  return jnp.asarray(P)


def test_grouping_vjps_are_the_transposes():
  """gather_rows / scatter_rows and their custom VJPs against the one-hot matrix oracle and its autodiff."""
  rng = np.random.default_rng(1)
  B, T, N, H = 2, 11, 3, 4
  active = rng.random((B, T, N)) < 0.5
  groups = group_by_head(jnp.asarray(active))
  P = _one_hot_rows(active)
  x = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
  rows_ct = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
  oracle_gather = lambda x: jnp.einsum('bnct,btnh->bcnh', P, x, precision='highest')
  oracle_scatter = lambda r: jnp.einsum('bnct,bcnh->btnh', P, r, precision='highest')
  for fn, oracle, arg in ((gather_rows, oracle_gather, x), (scatter_rows, oracle_scatter, rows_ct)):
    got, got_vjp = jax.vjp(lambda a, fn=fn: fn(a, groups), arg)
    want, want_vjp = jax.vjp(oracle, arg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    ct = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
    np.testing.assert_allclose(np.asarray(got_vjp(ct)[0]), np.asarray(want_vjp(ct)[0]), atol=1e-6)


def test_routed_backward_has_no_scatter_add():
  """The routed backward reverses the grouping with the opposite gathers (custom VJPs), not with the scatter-adds
  that autodiff of a gather gives: no scatter-add in the jaxpr of the gradient, sub-jaxprs included; the control,
  autodiff of a plain take_along_axis, has one."""
  from tests.pallas_kernels.test_decode_no_copy import equations  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  B, T, N, K, H = 1, 32, 4, 2, 16
  pos, seg = layout([([20, 12],)])
  gates, active = random_routing(rng, B, T, N, 2)
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32)

  def loss(q, k, gates):
    out = routed_attention(q, k, k, pos, pos, seg, seg, gates, active, block_q=16, block_k=16, backend='gpu',
                           interpret=True)
    return jnp.sum(out ** 2)

  prims = lambda fn, *a: {e.primitive.name for e in equations(jax.make_jaxpr(fn)(*a).jaxpr)}
  found = prims(jax.grad(loss, argnums=(0, 1, 2)), q, k, gates)
  assert 'scatter-add' not in found and 'gather' in found
  idx = jnp.zeros((B, T, N, 1), jnp.int32)
  control = prims(jax.grad(lambda x: jnp.sum(jnp.take_along_axis(x, idx, axis=1))), q)
  assert 'scatter-add' in control


# (name, dtype, B, N, K, H, rows, window, num_global, top_k, num_shared, block_q, block_k, softcap)
CASES = [
    ('f32_causal_k2of4_mha', jnp.float32, 1, 4, 4, 16, [([64],)], None, 0, 2, 0, 16, 16, None),
    ('f32_window8_global2_gqa2_packed_tail', jnp.float32, 2, 4, 2, 16, [([30, 35, 10], 5, (40,)), ([80],)],
     8, 2, 2, 0, 16, 32, None),
    ('f32_shared1_k1of3_gqa4_tail', jnp.float32, 1, 4, 1, 16, [([40, 25], 5)], None, 0, 1, 1, 16, 16, None),
    ('f32_window16_k3of4_softcap', jnp.float32, 1, 4, 2, 16, [([50, 30],)], 16, 1, 3, 0, 16, 16, 1.0),
    ('f32_all_heads_window5', jnp.float32, 1, 2, 1, 16, [([70],)], 5, 2, 2, 0, 16, 16, None),
    ('bf16_window8_global2_k2of4_gqa2', jnp.bfloat16, 1, 4, 2, 32, [([45, 30], 5, (3,))], 8, 2, 2, 0, 16, 32,
     None),
]


@functools.partial(jax.jit, static_argnames=('window', 'num_global', 'block_q', 'block_k', 'backend', 'softcap'))
def _fwd_bwd(q, k, v, gates, active, pos, seg, ct, **kw):
  def f(q, k, v, gates):
    return routed_attention(q, k, v, pos, pos, seg, seg, gates, active, **kw)

  out, vjp = jax.vjp(f, q, k, v, gates)
  return (out, *vjp(ct))


@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_reference(case):
  name, dtype, B, N, K, H, rows, window, num_global, top_k, num_shared, block_q, block_k, softcap = case
  pos, seg = layout(rows)
  T = pos.shape[1]
  rng = np.random.default_rng(len(name))
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
  k = jnp.asarray(rng.standard_normal((B, T, K, H)), dtype)
  v = jnp.asarray(rng.standard_normal((B, T, K, H)), dtype)
  ct = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
  gates, active = random_routing(rng, B, T, N, top_k, num_shared)
  kw = dict(window=window, num_global=num_global, block_q=block_q, block_k=block_k, softcap=softcap)
  got = _fwd_bwd(q, k, v, gates, active, pos, seg, ct, backend='gpu', **kw)
  want = _fwd_bwd(q, k, v, gates, active, pos, seg, ct, backend='reference', **kw)
  # Tolerances as in test_sparse_attention: float32 differs only in summation order; bfloat16 rounds p and ds
  # to bf16 before the matmuls (2^-8 relative steps summed over up to T terms).
  tol = 2e-5 if dtype == jnp.float32 else 2e-2
  for g, w, what in zip(got, want, ('out', 'dq', 'dk', 'dv', 'dgates')):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert g.shape == w.shape, what
    err, bound = np.max(np.abs(g - w)), tol * max(1.0, np.max(np.abs(w)))
    assert err <= bound, f'{name} {what}: max abs err {err} > {bound}'
  # Unselected pairs: zero output, zero query gradient, zero gate gradient.
  off = ~np.asarray(active)
  assert np.all(np.asarray(got[0], np.float32)[off] == 0)
  assert np.all(np.asarray(got[1], np.float32)[off] == 0)
  assert np.all(np.asarray(got[4])[off] == 0)


def test_routed_matches_reference_without_explicit_active():
  rng = np.random.default_rng(1)
  pos, seg = layout([([40],)])
  q, k, v = (jnp.asarray(rng.standard_normal((1, 40, 2, 16)), jnp.float32) for _ in range(3))
  gates, _ = random_routing(rng, 1, 40, 2, 1)
  got = routed_attention(q, k, v, pos, pos, seg, seg, gates, block_q=16, block_k=16)
  want = routed_attention_reference(q, k, v, pos, pos, seg, seg, gates)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


@pytest.mark.parametrize('window,num_global', [(None, 0), (1024, 4)])
def test_work_falls_with_k(window, num_global):
  """The kernel's visited blocks (its work) at k = N/2 are at most 0.6x those at k = N (default GPU tiles:
  32 compacted query rows, 64 keys)."""
  rng = np.random.default_rng(2)
  B, T, N = 2, 2048, 8
  pos, seg = layout([([T],), ([300, T - 300],)])
  kw = dict(block_q=32, block_k=64, window=window, num_global=num_global)
  all_heads = count_routed_visited_blocks(pos, seg, jnp.ones((B, T, N), bool), **kw)
  # All heads active is exactly N copies of the sparse kernel's schedule.
  assert all_heads == N * count_visited_blocks(pos, seg, **kw)
  work = {}
  for top_k in (N // 4, N // 2, N):
    _, active = random_routing(rng, B, T, N, top_k)
    work[top_k] = count_routed_visited_blocks(pos, seg, active, **kw)
  assert work[N] == all_heads
  assert work[N // 2] <= 0.6 * all_heads, work
  assert work[N // 4] < work[N // 2]


def test_validation_errors():
  q = jnp.zeros((1, 32, 4, 16))
  k = jnp.zeros((1, 32, 2, 16))
  p = jnp.zeros((1, 32), jnp.int32)
  with pytest.raises(ValueError, match='gates must have shape'):
    routed_attention(q, k, k, p, p, p, p, jnp.zeros((1, 32, 3)))
  with pytest.raises(ValueError, match='active must have shape'):
    routed_attention(q, k, k, p, p, p, p, jnp.zeros((1, 32, 4)), jnp.zeros((1, 32), bool))
  with pytest.raises(ValueError, match='must divide'):
    routed_attention(q, jnp.zeros((1, 32, 3, 16)), jnp.zeros((1, 32, 3, 16)), p, p, p, p, jnp.zeros((1, 32, 4)))


@pytest.mark.parametrize('kernel', ['sparse', 'routed'])
def test_public_api_on_the_tpu_backend(kernel):
  """sparse_attention / routed_attention with backend='tpu' (Mosaic kernels, TPU interpret mode) vs the references:
  forward and gradients through the custom VJP (the kernels themselves are tested in test_sparse_attention_tpu.py)."""
  rng = np.random.default_rng(3)
  pos, seg = layout([([30, 20], 14)])
  B, T, N, K, H = 1, 64, 4, 2, 16
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32) for _ in range(2))
  gates, active = random_routing(rng, B, T, N, 2)
  kw = dict(window=8, num_global=2, softcap=2.0)

  def run(backend):
    def f(q, k, v, gates):
      if kernel == 'sparse':
        return sparse_attention(q, k, v, pos, pos, seg, seg, backend=backend, **kw, **blocks(backend))
      return routed_attention(q, k, v, pos, pos, seg, seg, gates, active, backend=backend, **kw, **blocks(backend))
    out, vjp = jax.vjp(f, q, k, v, gates)
    return (out, *vjp(jnp.ones_like(out)))

  blocks = lambda backend: {} if backend == 'reference' else dict(block_q=16, block_k=32)
  for got, want in zip(jax.jit(lambda: run('tpu'))(), jax.jit(lambda: run('reference'))()):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5 * max(1.0, float(np.abs(want).max())))


def _tile_work_by_brute_force(active, *, block_q, block_k, window):
  """Rows x key columns the routed kernel's tiles cover over one causal document per row, from first principles:
  head n's active tokens in order form its rows; a tile of block_q rows visits the key blocks from the first one
  its earliest row can see (0, or its window's start) through the block of its latest row."""
  work = 0
  B, T, N = active.shape
  for b in range(B):
    for n in range(N):
      tokens = np.flatnonzero(active[b, :, n])
      for i in range(0, len(tokens), block_q):
        tile = tokens[i:i + block_q]
        first = 0 if window is None else max(0, tile[0] - window + 1) // block_k
        work += (tile[-1] // block_k + 1 - first) * block_q * block_k
  return work


def test_default_query_tile_is_64_rows_without_a_window_and_32_under_one():
  """64-row tiles without a window cost little extra covered area at k = N/2 (their causal key range does not
  depend on their span), while under a window the wider span of a compacted tile costs a lot more."""
  assert routed_api.default_block_q('gpu', None) == 64 and routed_api.default_block_q('gpu', 256) == 32
  assert routed_api.default_block_q('tpu', None) == 128
  rng = np.random.default_rng(0)
  scores = rng.random((2, 1024, 8))
  active = scores >= np.sort(scores, axis=-1)[..., 4:5]  # top 4 of 8 heads per token
  ratio = lambda window: (_tile_work_by_brute_force(active, block_q=64, block_k=64, window=window) /
                          _tile_work_by_brute_force(active, block_q=32, block_k=64, window=window))
  assert ratio(None) < 1.15
  assert ratio(64) > 1.25
