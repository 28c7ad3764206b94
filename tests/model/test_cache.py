"""KV-cached decoding equals recomputing the full forward pass, for every attention kind and position encoding,
with chunks shorter and longer than the ring cache of sparse attention, on the reference path and the kernels."""
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.model import Transformer
from dsjax.model import attention
from dsjax.model import attention_kernels
from dsjax.model import cache as cache_lib
from dsjax.model import layout
from tests.model.helpers import init_shapes, jit, random_like, tiny_config

KINDS = ['full', 'sparse', 'routed', 'routed_sparse', 'xl', 'xl_mem_sparse']


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('chunks', [(5, 1, 1, 1, 1, 1, 1, 1), (2, 7, 1, 4)])
def test_cached_chunks_equal_the_full_forward(kind, chunks):
  cfg = tiny_config(kind)  # sparse kinds: window 3 + 2 global tokens -> a 5-slot ring for rope
  model = Transformer(cfg)
  rng = np.random.default_rng(0)
  B, T = 2, sum(chunks)
  tokens = jnp.asarray(rng.integers(1, 64, (B, T)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  params = random_like(init_shapes(model, tokens, pos, jnp.ones_like(pos)), seed=1)
  forward = jit(lambda p, t, q, c: model.apply({'params': layout.for_decoding(p)}, t, q, cache=c))
  want, _ = model.apply({'params': params}, tokens, pos)
  cache = cache_lib.init_cache(cfg, B, 32)
  ring = kind in ('sparse', 'routed_sparse')
  assert len(cache['k']) == cfg.num_layers and cache['k'][0].shape[1] == (5 if ring else 32)
  got, start = [], 0
  for n in chunks:  # a 7-token chunk wraps the 3-slot window part of the ring
    logits, aux = forward(params, tokens[:, start:start + n], pos[:, start:start + n], cache)
    cache, start = aux['cache'], start + n
    got.append(logits)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(got, axis=1)), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_padding_is_not_cached_and_truncate_forgets():
  cfg = tiny_config('sparse')
  cache = cache_lib.init_cache(cfg, 2, 32, extra_slots=2)
  assert cache['k'][0].shape[1] == 2 + 3 + 2
  positions = jnp.asarray([[0, 1, 2, 3], [0, 1, 2, 3]], jnp.int32)
  segments = jnp.asarray([[1, 1, 1, 1], [1, 1, 0, 0]], jnp.int32)
  slots = np.asarray(cache_lib.write_slots(cfg, cache, positions, segments))
  assert slots[0].tolist() == [0, 1, 2, 3] and slots[1].tolist() == [0, 1, 7, 7]  # 7 = S: not written
  cache = {**cache, 'positions': jnp.asarray(np.tile(np.arange(7), (2, 1)), jnp.int32),
           'segment_ids': jnp.ones((2, 7), jnp.int32)}
  cut = cache_lib.truncate(cache, jnp.asarray([3, 5]))
  assert np.asarray(cut['segment_ids']).tolist() == [[1, 1, 1, -1, -1, -1, -1], [1, 1, 1, 1, 1, -1, -1]]


def kernels_in(jitted, *args) -> set[str]:
  """The Pallas kernels (by name) a jitted call runs."""
  text = str(jitted.trace(*args).jaxpr)
  return {name for name in ('sparse_decode_attention', 'sparse_attention_fwd') if name in text}


@pytest.mark.parametrize('max_rows', [64, 2], ids=['decode_kernel', 'flash_merged'])
@pytest.mark.parametrize('kind', ['full', 'routed_sparse'])
def test_kernels_in_cached_chunks_equal_the_full_forward(kind, max_rows, monkeypatch):
  """impl='pallas' on the cache: one-token steps and short chunks that attend in place run the decode kernel over
  the cache; other chunks (wrapping the ring, or longer than `DECODE_MAX_ROWS` query rows) run the flash kernel
  over the chunk merged with the decode kernel over the cache. max_rows=2 sends every chunk down the second path."""
  monkeypatch.setattr(attention_kernels, 'DECODE_MAX_ROWS', max_rows)
  cfg = tiny_config(kind, attention=dict(impl='pallas'))
  model = Transformer(cfg)
  rng = np.random.default_rng(0)
  chunks = (2, 7, 1)  # a short chunk, one that wraps the 5-slot ring, a decode step
  B, T = 2, sum(chunks)
  tokens = jnp.asarray(rng.integers(1, 64, (B, T)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  params = random_like(init_shapes(model, tokens, pos, jnp.ones_like(pos)), seed=1)
  reference = tiny_config(kind, attention=dict(impl='reference'))
  want, _ = Transformer(reference).apply({'params': params}, tokens, pos)
  forward = jit(lambda p, t, q, c: model.apply({'params': p}, t, q, cache=c))
  cache = cache_lib.init_cache(cfg, B, 32)
  params = layout.for_decoding(params)
  got, start = [], 0
  for n in chunks:
    args = (params, tokens[:, start:start + n], pos[:, start:start + n], cache)
    in_place = attention.attends_in_place(cfg, cache['k'][0].shape[1], n) and 2 * n <= max_rows  # 2 = heads per kv
    assert kernels_in(forward, *args) == ({'sparse_decode_attention'} if in_place else
                                          {'sparse_decode_attention', 'sparse_attention_fwd'}), n
    logits, aux = forward(*args)
    cache, start = aux['cache'], start + n
    got.append(logits)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(got, axis=1)), np.asarray(want), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('t, window, num_global, gated', [(1, None, 0, False), (3, 4, 2, True), (8, None, 0, True)])
def test_few_query_attention_equals_the_reference(t, window, num_global, gated):
  """The decode-step formulation (multiply-reduce over the cache) against the einsum reference, GQA, a cache with
  empty slots (-1) and a query row of padding."""
  rng = np.random.default_rng(0)
  b, s, n, kh, h = 2, 12, 6, 2, 8
  q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(b, s, kh, h)), jnp.float32) for _ in range(2))
  k_pos = jnp.asarray(np.tile(np.arange(s), (b, 1)), jnp.int32)
  k_seg = jnp.asarray(np.where(np.arange(s) < 9, 1, -1)[None].repeat(b, 0), jnp.int32)
  q_pos = jnp.asarray(np.tile(np.arange(9 - t, 9), (b, 1)), jnp.int32)
  q_seg = jnp.asarray([[1] * t, [1] * (t - 1) + [0]], jnp.int32)
  gates = jnp.asarray(rng.uniform(size=(b, t, n)), jnp.float32) if gated else None
  kw = dict(window=window, num_global=num_global, gates=gates)
  np.testing.assert_allclose(attention.few_query_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, **kw),
                             attention.reference_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, **kw),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('platform', ['cpu', 'tpu'])  # cpu: the Triton kernels interpreted; tpu: Mosaic
@pytest.mark.parametrize('t', [1, 40])  # a decode step (decode kernel alone), a chunk (flash + decode, merged)
def test_cached_attention_does_not_copy_the_cache(platform, t):
  """dsjax's call of the decode kernels (attention_kernels.cached_attention) adds no copy of the stacked cache
  [L, B, S, K, H] (S = 260: not a multiple of any key block x splits): no pad, slice, gather, transpose or cast."""
  from tests.pallas_kernels.test_decode_no_copy import assert_no_cache_copy  # pylint: disable=g-import-not-at-top
  L, B, S, N, K, H = 3, 2, 260, 4, 2, 16
  rng = np.random.default_rng(t)
  q = jnp.asarray(rng.normal(size=(B, t, N, H)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(B, t, K, H)), jnp.float32) for _ in range(2))
  cache = tuple(jnp.asarray(rng.normal(size=(L, B, S, K, H)), jnp.float32) for _ in range(2))
  rows = (jnp.zeros((B, S), jnp.int32), jnp.ones((B, S), jnp.int32))
  pos = jnp.broadcast_to(jnp.arange(S, S + t, dtype=jnp.int32), (B, t))

  def call(q, k, v, cache_k, cache_v, layer):
    before = (cache_k, cache_v) + rows
    return attention_kernels.cached_attention(q, k, v, pos, jnp.ones_like(pos), before, before, layer, window=None,
                                              num_global=0, gates=None, platform=platform)

  assert_no_cache_copy(call, q, k, v, *cache, jnp.int32(1), elements=B * S * K * H)
