"""The decode kernels never copy the KV cache (issue 23, item 3): the jaxpr of a jitted decode call, sub-jaxprs
included, moves no array as large as one layer's cache (no pad to a multiple of block_k x splits, no per-layer
slice, no concatenate / gather / copy / transpose / cast; a reshape is free and is allowed), for
both backends, one-layer [B, S, K, H] and stacked [L, B, S, K, H] caches, at S that is and is not a multiple of
the blocks; and the outputs at those S equal the reference."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import core as jax_core

from pallas_kernels.sparse_attention import sparse_attention_reference, sparse_decode_attention

# Primitives that move data: any of them making an array as large as one layer's cache would be a copy of it (a pad
# to a multiple of block_k x splits, a per-layer slice, ...). A reshape is a free bitcast ([B,S,K,H] ->
# [1,B,S,K,H] or [L,B,S,K*H]), and neither arithmetic on the split partials nor a broadcast (of metadata smaller
# than the cache, e.g. lane-replicated query rows of the TPU flash kernel) copies the cache, so none is listed.
COPIES = {'pad', 'concatenate', 'slice', 'dynamic_slice', 'gather', 'copy', 'copy_p', 'transpose', 'rev',
          'convert_element_type', 'dynamic_update_slice', 'scatter'}


def equations(jaxpr):
  """Every equation of `jaxpr` and of the jaxprs in its equations' parameters (jit, scan, cond, kernels)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax_core.jaxprs_in_params(eqn.params):
      yield from equations(sub)


def outputs(fn, *args):
  """(primitive, shape) of every output of every equation in the jaxpr of jit(fn)(*args), sub-jaxprs included."""
  closed = jax.make_jaxpr(jax.jit(fn))(*args)
  return [(eqn.primitive.name, tuple(getattr(var.aval, 'shape', ()))) for eqn in equations(closed.jaxpr)
          for var in eqn.outvars]


def cache_sized(found, elements):
  return [(name, shape) for name, shape in found if int(np.prod(shape, dtype=np.int64)) >= elements]


def assert_no_cache_copy(fn, *args, elements):
  found = outputs(fn, *args)
  assert any(name == 'pallas_call' for name, _ in found)  # the walk reaches the kernel call inside the jit
  copies = [(name, shape) for name, shape in cache_sized(found, elements) if name in COPIES]
  assert not copies, copies


def test_the_walk_finds_a_padded_cache():
  """The check fails on the copy this file guards against: a cache padded to 384 slots."""
  cache = jnp.zeros((2, 260, 2, 16))
  found = cache_sized(outputs(lambda c: jnp.pad(c, [(0, 0), (0, 124), (0, 0), (0, 0)]).sum(), cache),
                      cache.size)
  assert ('pad', (2, 384, 2, 16)) in found
  assert COPIES & {name for name, _ in found}


def inputs(S, *, L=None, B=2, Tq=2, N=4, K=2, H=16, seed=0):
  rng = np.random.default_rng(seed + S)
  shape = (B, S, K, H) if L is None else (L, B, S, K, H)
  q = jnp.asarray(rng.standard_normal((B, Tq, N, H)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
  k_pos = jnp.asarray(np.stack([rng.permutation(S) for _ in range(B)]), jnp.int32)  # a ring: any slot order
  k_seg = jnp.ones((B, S), jnp.int32).at[:, :7].set(-1)  # a few empty slots
  q_pos = jnp.asarray(np.tile(np.arange(S, S + Tq), (B, 1)), jnp.int32)
  return q, k, v, q_pos, k_pos, jnp.ones_like(q_pos), k_seg


@pytest.mark.parametrize('backend', ['gpu', 'tpu'])
@pytest.mark.parametrize('S', [260, 384, 1000])
@pytest.mark.parametrize('stacked', [False, True])
def test_decode_does_not_copy_the_cache_and_matches_reference(backend, S, stacked):
  q, k, v, q_pos, k_pos, q_seg, k_seg = inputs(S, L=3 if stacked else None)
  layer = jnp.int32(1) if stacked else None
  kw = dict(window=300, num_global=2, backend=backend, interpret=True)

  def decode(q, k, v, layer):
    return sparse_decode_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, layer=layer, **kw)

  one_layer = int(np.prod(k.shape[-4:]))
  assert_no_cache_copy(decode, q, k, v, layer, elements=one_layer)
  # The real-device trace (interpret=False) is the same graph around the kernel: checked too.
  assert_no_cache_copy(lambda *a: sparse_decode_attention(q, *a, q_pos, k_pos, q_seg, k_seg, layer=layer,
                                                          **{**kw, 'interpret': False}), k, v,
                       elements=one_layer)
  got = jax.jit(decode)(q, k, v, layer)
  k1, v1 = (k[1], v[1]) if stacked else (k, v)
  want = jax.jit(functools.partial(sparse_attention_reference, window=300, num_global=2))(
      q, k1, v1, q_pos, k_pos, q_seg, k_seg)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-5)
