"""Backward of the Triton kernels (gpu.py): the dk/dv kernel over the G query heads of one kv head (issue 23).

Interpret mode on CPU: dq/dk/dv equal jax.grad of the dense reference for causal, window, window + globals and
packed rows with padding, GQA groups G in {1, 2, 4}, float32 and bfloat16, with shared and per-query-head metadata;
the backward's jaxpr has no float32 [B, T, N, H] dk/dv and no sum over the group axis outside the kernels; the
backward lowers to Triton for CUDA.
"""
import functools
import re

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
import numpy as np
import pytest

from pallas_kernels.routed_attention import routed_attention
from pallas_kernels.sparse_attention import api, sparse_attention, sparse_attention_reference
from tests.pallas_kernels.test_gpu_edge_blocks import layout

# Float32 differs from the reference only in summation order; bfloat16 rounds p and ds to bf16 before the
# matmuls (2^-8 relative steps), as in test_sparse_attention.py. Relative to max(1, max |reference|).
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}

# (name, rows (doc_lens, pad, holes), window, num_global, block_q, block_k)
LAYOUTS = [
    ('causal', [([64],)], None, 0, 16, 16),
    ('window24', [([64],)], 24, 0, 16, 16),
    ('window20_global3_bq32', [([64],)], 20, 3, 32, 16),
    ('packed_padding_holes', [([20, 17, 9], 18, (30,)), ([40, 24],)], 24, 2, 16, 16),
]


@functools.partial(jax.jit, static_argnames=('window', 'num_global', 'block_q', 'block_k', 'backend'))
def _grads(q, k, v, pos, seg, ct, *, window, num_global, block_q, block_k, backend):
  def loss(q, k, v):
    if backend == 'reference':
      out = sparse_attention_reference(q, k, v, pos, pos, seg, seg, window=window, num_global=num_global)
    else:
      out = sparse_attention(q, k, v, pos, pos, seg, seg, window=window, num_global=num_global, block_q=block_q,
                             block_k=block_k, backend=backend)
    return jnp.sum(out.astype(jnp.float32) * ct.astype(jnp.float32))

  return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _inputs(B, T, N, K, H, dtype, seed):
  rng = np.random.default_rng(seed)
  q, ct = (jnp.asarray(rng.standard_normal((B, T, N, H)), dtype) for _ in range(2))
  k, v = (jnp.asarray(rng.standard_normal((B, T, K, H)), dtype) for _ in range(2))
  return q, k, v, ct


def _assert_close(got, want, tol, name):
  for g, w, what in zip(got, want, ('dq', 'dk', 'dv')):
    assert g.shape == w.shape and g.dtype == w.dtype, (name, what, g.shape, w.shape, g.dtype, w.dtype)
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert np.all(np.isfinite(g)), (name, what)
    err, bound = np.max(np.abs(g - w)), tol * max(1.0, np.max(np.abs(w)))
    assert err <= bound, f'{name} {what}: max abs err {err} > {bound}'


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['f32', 'bf16'])
@pytest.mark.parametrize('group', [1, 2, 4])
@pytest.mark.parametrize('case', LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_gradients_match_reference(case, group, dtype):
  name, rows, window, num_global, block_q, block_k = case
  pos, seg = layout(rows)
  B, T = pos.shape
  K, H = 2, 16
  q, k, v, ct = _inputs(B, T, K * group, K, H, dtype, seed=len(name) + group)
  kw = dict(window=window, num_global=num_global, block_q=block_q, block_k=block_k)
  got = _grads(q, k, v, pos, seg, ct, backend='gpu', **kw)
  want = _grads(q, k, v, pos, seg, ct, backend='reference', **kw)
  _assert_close(got, want, TOL[dtype], f'{name} G={group}')
  never = np.asarray(seg) == -1
  assert np.all(np.asarray(got[0], np.float32)[never] == 0)  # dq of rows that see nothing
  assert np.all(np.asarray(got[1], np.float32)[never] == 0)  # padded keys: seen by no query
  assert np.all(np.asarray(got[2], np.float32)[never] == 0)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['f32', 'bf16'])
@pytest.mark.parametrize('group', [2, 4])
def test_per_head_metadata_gradients_match_reference(group, dtype):
  """Per-query-head metadata (the routed-attention path): head n has its own segments (its last 16 * ((N-1-n) % 4)
  rows are padding, a hole at row 5 + 7n), so the G heads of one kv head have different query-block ranges in the
  transposed schedule that the dk/dv kernel loops, the first head of a group the narrowest (using its ranges for the
  others would miss query blocks). Reference: each head on its own rows, gradients summed by jax.grad."""
  K, H, T, window, num_global, bq, bk = 2, 16, 64, 24, 2, 16, 16
  N = K * group
  pos, seg = layout([([40, 24],)])
  q_seg = np.repeat(np.asarray(seg)[:, None, :], N, axis=1)
  for n in range(N):
    q_seg[:, n, 5 + 7 * n] = -1
    q_seg[:, n, T - 16 * ((N - 1 - n) % 4):] = -1
  q_pos = jnp.broadcast_to(pos[:, None, :], q_seg.shape)
  q_seg = jnp.asarray(q_seg)
  q, k, v, ct = _inputs(1, T, N, K, H, dtype, seed=group)
  cfg = api.kernel_config(q, window=window, num_global=num_global, scale=None, softcap=None, block_q=bq,
                          block_k=bk, backend='gpu', interpret=True)
  sched = api.block_schedule(q_pos, q_seg, cfg)
  assert len({tuple(np.asarray(sched[0, n]).ravel()) for n in range(N)}) > 1  # the heads' ranges differ

  def kernel_loss(q, k, v):
    out = api.flash_attention(q, k, v, q_pos, pos, q_seg, seg, sched, cfg)
    return jnp.sum(out.astype(jnp.float32) * ct.astype(jnp.float32))

  def reference_loss(q, k, v):
    total = 0.0
    for n in range(N):
      c = n // group
      out = sparse_attention_reference(q[:, :, n:n + 1], k[:, :, c:c + 1], v[:, :, c:c + 1], pos, pos,
                                       q_seg[:, n], seg, window=window, num_global=num_global)
      total = total + jnp.sum(out.astype(jnp.float32) * ct[:, :, n:n + 1].astype(jnp.float32))
    return total

  got = jax.jit(jax.grad(kernel_loss, argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(reference_loss, argnums=(0, 1, 2)))(q, k, v)
  _assert_close(got, want, TOL[dtype], f'per-head G={group}')


def _eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in its parameters."""
  for eqn in jaxpr.eqns:
    yield eqn
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        if isinstance(sub, jex_core.ClosedJaxpr):
          yield from _eqns(sub.jaxpr)
        elif isinstance(sub, jex_core.Jaxpr):
          yield from _eqns(sub)


def test_backward_has_no_per_query_head_dkv_and_no_group_sum():
  """bf16, G = 4: the dk/dv pallas_call returns [B, T, K, H] bf16 arrays; no pallas_call returns a float32
  [B, T, N, H] array, no array [B, T, K, G, H] exists and nothing reduces to [B, T, K, H] outside the kernels."""
  B, T, N, K, H = 1, 64, 8, 2, 16
  G = N // K
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  seg = jnp.ones((B, T), jnp.int32)
  q, k, v, ct = _inputs(B, T, N, K, H, jnp.bfloat16, seed=0)

  def loss(q, k, v):
    out = sparse_attention(q, k, v, pos, pos, seg, seg, window=24, num_global=2, block_q=16, block_k=16,
                           backend='gpu', interpret=True)
    return jnp.sum(out.astype(jnp.float32) * ct.astype(jnp.float32))

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr
  eqns = list(_eqns(jaxpr))
  calls = [e for e in eqns if e.primitive.name == 'pallas_call']
  outs = [[(tuple(o.aval.shape), o.aval.dtype) for o in e.outvars] for e in calls]
  assert len(calls) == 3, outs  # forward, dq, dk/dv
  assert [((B, T, K, H), jnp.dtype(jnp.bfloat16))] * 2 in outs, outs
  assert not any(s == (B, T, N, H) and d == jnp.float32 for o in outs for s, d in o), outs
  for e in eqns:
    shapes = [tuple(x.aval.shape) for x in (*e.invars, *e.outvars) if hasattr(x, 'aval')]
    assert (B, T, K, G, H) not in shapes, e
    if e.primitive.name.startswith('reduce'):
      assert tuple(e.outvars[0].aval.shape) != (B, T, K, H), e


def test_backward_lowers_to_triton_for_cuda():
  """On CPU, lowered for CUDA at the table's head_dim 128 bf16 tiles with G = 4, shared metadata (sparse) and per-head
  metadata (routed, G = 2): three Triton calls each, one of them returning dk and dv as [B, T, K, H] bf16, none a
  float32 [B, T, N, H] array, and no [B, T, K, G, H] array anywhere in the module."""
  B, T, K, H = 1, 512, 2, 128
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  seg = jnp.ones((B, T), jnp.int32)
  for G, routed in ((4, False), (2, True)):
    N = K * G
    x = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16)

    def f(q, k, v):
      if routed:
        gates = jnp.where(jnp.arange(N) % 2 == 0, 1.0, 0.0) * jnp.ones((B, T, N))
        return routed_attention(q, k, v, pos, pos, seg, seg, gates, window=128, num_global=4, backend='gpu',
                                interpret=False)
      return sparse_attention(q, k, v, pos, pos, seg, seg, window=128, num_global=4, backend='gpu', interpret=False)

    grads = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2))
    text = jax.jit(grads).trace(x, kv, kv).lower(lowering_platforms=('cuda',)).as_text()
    assert text.count('custom_call @__gpu$xla.gpu.triton') == 3, set(re.findall(r'custom_call @[^(]+', text))
    assert f'{B}x{T}x{K}x{G}x{H}x' not in text
    results = [line.rsplit('->', 1)[1] for line in text.splitlines() if 'custom_call @__gpu$xla.gpu.triton' in line]
    kv_grad = f'tensor<{B}x{T}x{K}x{H}xbf16>'
    assert any(r.count(kv_grad) == 2 for r in results), results  # dk, dv [B, T, K, H] bf16 from one call
    assert not any(f'tensor<{B}x{T}x{N}x{H}xf32>' in r for r in results), results
