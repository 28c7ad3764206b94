"""Decoding with the attention kernels (impl='pallas', interpret mode): `Sampler`, `speculative_generate` (prompt
lookup and a draft model) and the `Engine` give the greedy tokens of the reference path, for a full and a ring cache,
on one device and on a (data 2, fsdp 1, tensor 4) mesh, where the kernels run per shard in shard_map. One-token
steps and verification chunks run the decode kernel over the cache in place; prompts run the flash kernel merged
with the decode kernel over the cache they join."""
import functools

import jax
import jax.numpy as jnp
import pytest

from dsjax import sharding as sharding_lib
from dsjax.model import Transformer
from dsjax.model import cache as cache_lib
from dsjax.sample import engine as engine_lib
from dsjax.sample.paged_engine import PagedEngine
from dsjax.sample import sampler as sampler_lib
from dsjax.sample import speculative
from tests.model import helpers

MAX_LEN = 32
GAMMA = 3
NEW = 6
# Ragged, repetitive (prompt lookup finds drafts), longer than the 5-slot ring, and all in the engine's 8-token bucket.
PROMPTS = [[5, 9, 14, 3, 9, 14, 3, 9], [7, 2], [11, 4, 11, 4, 11, 20]]
CACHES = {'full': 'full', 'ring': 'sparse'}  # a sparse model keeps a num_global + window ring


def config(cache, impl):
  # 8 query heads on 4 kv heads: every head count divides the tensor axis of 4.
  return helpers.tiny_config(CACHES[cache], hidden_size=32, num_heads=8, num_kv_heads=4, attention=dict(impl=impl))


@functools.cache
def params_for(cache, seed):
  model = Transformer(config(cache, 'reference'))
  tokens = jnp.zeros((1, 8), jnp.int32)
  return helpers.random_like(helpers.init_shapes(model, tokens, tokens), seed=seed, std=0.5)


@functools.cache
def placement():
  mesh_cfg = helpers.base_config().mesh
  mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = 2, 1, 4
  return sharding_lib.Placement.of(sharding_lib.make_mesh(mesh_cfg), mesh_cfg)


def placed(cache, seed, on_mesh):
  """(params, placement): on the mesh, the params sharded by the logical-axis rules."""
  params = params_for(cache, seed)
  if not on_mesh:
    return params, None
  place = placement()
  model = Transformer(config(cache, 'reference'))
  tokens = jnp.zeros((1, 8), jnp.int32)
  shardings = sharding_lib.param_shardings(helpers.init_shapes(model, tokens, tokens), place.mesh,
                                           helpers.base_config().mesh)
  return jax.device_put(params, shardings), place


@functools.cache
def reference_tokens(cache):
  """Plain greedy decoding of each prompt with the reference path on one device."""
  model = Transformer(config(cache, 'reference'))
  sampler = sampler_lib.Sampler(model, max_len=MAX_LEN)
  return sampler.generate(params_for(cache, 1), PROMPTS, jax.random.key(0), max_new_tokens=NEW)


def extra_slots(cache):
  return GAMMA + 1 if cache == 'ring' else 0


MESH_IDS = {False: 'one_device', True: 'mesh_2x1x4'}


@pytest.mark.parametrize('on_mesh', [False, True], ids=MESH_IDS.get)
@pytest.mark.parametrize('cache', list(CACHES))
def test_sampler_with_kernels_matches_reference(cache, on_mesh):
  model = Transformer(config(cache, 'pallas'))
  params, place = placed(cache, 1, on_mesh)
  sampler = sampler_lib.Sampler(model, max_len=MAX_LEN, placement=place)
  if cache == 'ring':
    assert cache_lib.cache_length(model.cfg, MAX_LEN) < MAX_LEN  # the ring really wraps
  assert sampler.generate(params, PROMPTS, jax.random.key(0), max_new_tokens=NEW) == reference_tokens(cache)


@pytest.mark.parametrize('drafter', ['lookup', 'model'])
@pytest.mark.parametrize('on_mesh', [False, True], ids=MESH_IDS.get)
@pytest.mark.parametrize('cache', list(CACHES))
def test_speculative_with_kernels_matches_reference(cache, on_mesh, drafter):
  model = Transformer(config(cache, 'pallas'))
  params, place = placed(cache, 1, on_mesh)
  target = sampler_lib.Sampler(model, max_len=MAX_LEN, extra_slots=extra_slots(cache), placement=place)
  if drafter == 'lookup':
    draft = speculative.PromptLookupDrafter()
  else:  # another random model of the same shape: few drafts are accepted, so rows commit different counts
    draft_params, _ = placed(cache, 2, on_mesh)
    draft = speculative.ModelDrafter(
        sampler_lib.Sampler(model, max_len=MAX_LEN, extra_slots=extra_slots(cache), placement=place), draft_params)
  got, stats = speculative.speculative_generate(target, params, draft, PROMPTS, jax.random.key(0),
                                                max_new_tokens=NEW, gamma=GAMMA)
  assert got == reference_tokens(cache)
  assert stats['proposed'] > 0  # verification chunks of GAMMA + 1 tokens ran


@pytest.mark.parametrize('on_mesh', [False, True], ids=MESH_IDS.get)
@pytest.mark.parametrize('cache', list(CACHES))
def test_engine_with_kernels_matches_reference(cache, on_mesh):
  model = Transformer(config(cache, 'pallas'))
  params, place = placed(cache, 1, on_mesh)
  engine = engine_lib.Engine(model, params, num_slots=2, max_len=MAX_LEN, max_queue=4, placement=place)
  try:  # three requests on two slots: a slot is refilled while the other decodes
    requests = [engine.submit(prompt, NEW) for prompt in PROMPTS]
    assert [r.result(timeout=300) for r in requests] == reference_tokens(cache)
  finally:
    engine.shutdown(cancel=True)


@pytest.mark.parametrize('cache', list(CACHES))
def test_generation_lowers_for_tpu_on_the_mesh(cache):
  """The whole generation loop built for TPU (impl='auto', platform='tpu') on the 8-device mesh: Mosaic kernels per
  shard, the decode kernel for the prompt (with the flash kernel where the prompt wraps the ring) and in the decode
  loop."""
  cfg = helpers.tiny_config(CACHES[cache], hidden_size=32, num_heads=8, num_kv_heads=4,
                            attention=dict(impl='auto', platform='tpu'))
  params, place = placed(cache, 1, on_mesh=True)
  sampler = sampler_lib.Sampler(Transformer(cfg), max_len=MAX_LEN, placement=place)
  tokens, lengths, max_new = sampler_lib.pad_prompts(PROMPTS, NEW, MAX_LEN, 0)
  batch = len(PROMPTS)
  args = (params, tokens, lengths, jax.random.split(jax.random.key(0), batch), max_new, jnp.zeros(batch),
          jnp.zeros(batch, jnp.int32), jnp.ones(batch), jnp.asarray([-1], jnp.int32), jnp.int32(0))
  generate = jax.jit(sampler._generate_loop, static_argnames=('max_new_tokens', 'vocab_limit', 'all_greedy'))
  with sharding_lib.activate(place):
    traced = generate.trace(*args, max_new_tokens=NEW, vocab_limit=None, all_greedy=True)
    text = traced.lower(lowering_platforms=('tpu',)).as_text()
  layers = cfg.num_layers  # the decoding model runs its layers unrolled: a kernel call per layer
  assert text.count('sparse_decode_attention_tpu') == 2 * layers
  assert text.count('sparse_attention_fwd') == (layers if cache == 'ring' else 0)


@pytest.mark.parametrize('on_mesh', [False, True], ids=MESH_IDS.get)
@pytest.mark.parametrize('cache', list(CACHES))
def test_paged_engine_with_kernels_matches_reference(cache, on_mesh):
  """The paged engine with impl='pallas': prefill chunks attend to the gathered blocks with the flash + decode
  kernels, decode steps go through dsjax.model.paged_attention, per shard on the mesh; a tiny pool preempts."""
  model = Transformer(config(cache, 'pallas'))
  params, place = placed(cache, 1, on_mesh)
  engine = PagedEngine(model, params, num_blocks=10, block_size=4, max_len=MAX_LEN, max_running=3, prefill_budget=4,
                       placement=place)
  try:
    requests = [engine.submit(prompt, NEW) for prompt in PROMPTS]
    assert [r.result(timeout=300) for r in requests] == reference_tokens(cache)
  finally:
    engine.shutdown(cancel=True)


def test_paged_decode_step_lowers_for_tpu_on_the_mesh():
  """A paged decode step built for TPU (impl='auto', platform='tpu', bf16, head_dim 128) on the 8-device mesh: JAX's
  Mosaic paged-attention kernel per layer, inside shard_map (kv heads split over the tensor axis)."""
  cfg = helpers.tiny_config('full', hidden_size=1024, num_heads=8, num_kv_heads=4, dtype='bfloat16',
                            param_dtype='bfloat16', attention=dict(impl='auto', platform='tpu'))
  model = Transformer(cfg)
  tokens = jnp.zeros((1, 8), jnp.int32)
  shapes = helpers.init_shapes(model, tokens, tokens)
  mesh_cfg = helpers.base_config().mesh
  mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = 2, 1, 4
  place = sharding_lib.Placement.of(sharding_lib.make_mesh(mesh_cfg), mesh_cfg)
  params = jax.device_put(helpers.random_like(shapes, seed=0), sharding_lib.param_shardings(shapes, place.mesh,
                                                                                             mesh_cfg))
  engine = PagedEngine(model, params, num_blocks=16, block_size=16, max_len=128, max_running=4, placement=place)
  try:
    rows = 4
    args = (engine.params, engine._pools, jnp.zeros((rows, 1), jnp.int32),  # pylint: disable=protected-access
            jnp.arange(rows, dtype=jnp.int32) * 7, jnp.ones(rows, jnp.int32),
            jnp.arange(rows * 8, dtype=jnp.int32).reshape(rows, 8) % 16 + 1,
            jax.random.key_data(jax.random.split(jax.random.key(0), rows)), jnp.zeros(rows), jnp.zeros(rows, jnp.int32),
            jnp.ones(rows))
    with sharding_lib.activate(place):
      feed = engine._feed_and_draw  # pylint: disable=protected-access
      traced = jax.jit(feed, static_argnames=('all_greedy',)).trace(*args, all_greedy=True)
      text = traced.lower(lowering_platforms=('tpu',)).as_text()
  finally:
    engine.shutdown(cancel=True)
  # One call of JAX's paged-attention function per layer, each inside a per-shard computation whose pools are split
  # over the tensor axis on their kv-head axis; the Mosaic kernel itself is a tpu_custom_call.
  assert text.count('call @paged_attention(') == cfg.num_layers
  assert text.count('sdy.manual_computation') >= cfg.num_layers
  assert '<@mesh, [{"tensor"}, {}, {}, {}]>' in text and 'paged_flash_attention_kernel' in text
