"""What a decode step writes, read from XLA's optimized HLO for a model of realistic width (hidden 1024, head_dim
128, abstract params from `jax.eval_shape`: nothing allocated): the decode loop reads every weight where it lies
and writes no weight-sized buffer (no slice of stacked layers, no transposed kernel, no dequantized kernel), and
the KV cache is updated in place (no copy of a layer's cache). These are the facts that make decoding
memory-bound on the weights alone; they hold on any backend XLA fuses at least as well as XLA:CPU."""
import math

import jax
import jax.numpy as jnp
import pytest

from dsjax import hlo
from dsjax import quant
from dsjax.model import Transformer
from dsjax.model import cache as cache_lib
from dsjax.model import layout
from dsjax.sample import sampler as sampler_lib
from tests.model import helpers
from tests.test_quant import with_quant

BATCH, PROMPT, MAX_LEN, NEW = 4, 16, 64, 8
S = jax.ShapeDtypeStruct


def realistic(kind: str):
  cfg = helpers.tiny_config(kind, vocab_size=4096, hidden_size=1024, num_layers=3, num_heads=8, num_kv_heads=8,
                            mlp_dim=2816, max_positions=256)
  model = Transformer(cfg)
  shapes = helpers.init_shapes(model, jnp.zeros((1, 8), jnp.int32), jnp.arange(8, dtype=jnp.int32)[None])
  return cfg, model, jax.tree.map(lambda x: x.value, shapes, is_leaf=lambda x: hasattr(x, 'value'))


def smallest_kernel(params) -> int:
  """Elements of the smallest projection kernel of one layer (1024 x 1024 here)."""
  sizes = [math.prod(leaf.shape[1:]) for path, leaf in jax.tree_util.tree_leaves_with_path(params['layers'])
           if any(getattr(p, 'key', None) in layout.INPUT_AXES for p in path)]
  return min(sizes)


def generate_hlo(model, params, all_greedy=True) -> str:
  sampler = sampler_lib.Sampler(model, max_len=MAX_LEN)
  b = BATCH
  args = (params, S((b, PROMPT), jnp.int32), S((b,), jnp.int32), jax.random.split(jax.random.key(0), b),
          S((b,), jnp.int32), S((b,), jnp.float32), S((b,), jnp.int32), S((b,), jnp.float32), S((1,), jnp.int32),
          S((), jnp.int32))
  jitted = jax.jit(sampler._generate_loop, static_argnames=('max_new_tokens', 'vocab_limit', 'all_greedy'))
  return jitted.trace(*args, max_new_tokens=NEW, vocab_limit=None, all_greedy=all_greedy).lower().compile().as_text()


def cache_layer_elements(cfg) -> int:
  return BATCH * cache_lib.cache_length(cfg, MAX_LEN) * cfg.num_kv_heads * cfg.hidden_size // cfg.num_heads


def describe(ops) -> list[str]:
  return [f'{op.opcode} {op.dtype}{list(op.shape)} {op.name}' for op in ops]


def copies(ops, elements: int) -> list[str]:
  return describe([op for op in ops if op.elements >= elements
                   and (op.opcode in ('copy', 'transpose') or 'copy' in op.name or 'transpose' in op.name)])


@pytest.mark.parametrize('kind, mode, converted', [
    ('full', 'none', False),  # training-layout params: converted inside the call, once, before the loop
    ('full', 'none', True),
    ('sparse', 'none', True),  # the ring cache
    ('routed', 'none', True),
    ('full', 'int8', True),
    ('full', 'int4', True),
], ids=['full-training-layout', 'full', 'sparse-ring', 'routed', 'int8', 'int4'])
def test_the_decode_loop_writes_no_weight_sized_buffer(kind, mode, converted):
  cfg, model, params = realistic(kind)
  weight = smallest_kernel(params)
  assert weight >= 1024 * 1024
  if mode != 'none':
    quant_cfg = with_quant(helpers.base_config(), mode, group_size=128).quant
    params = jax.eval_shape(lambda p: quant.quantize_params(p, cfg, quant_cfg), params)
  if converted:
    params = jax.eval_shape(layout.for_decoding, params)
  text = generate_hlo(model, params)
  loop = hlo.loop_buffers(text)
  assert len(loop) > 10 * cfg.num_layers  # the decode loop was found and read
  assert describe(op for op in loop if op.elements >= weight) == []
  assert copies(loop, cache_layer_elements(cfg)) == []
  if converted:  # nothing in the whole program (prefill included) writes a weight-sized buffer
    assert describe(op for op in hlo.top_level_ops(text) if op.elements >= weight) == []


@pytest.mark.parametrize('tokens', [1, 5], ids=['step', 'verification_chunk'])
def test_a_cached_forward_writes_the_cache_in_place_and_no_weight(tokens):
  """`Sampler.forward` as the engine's decode step (one token) and speculative verification (gamma + 1 tokens)
  call it, the cache donated: every output buffer but the small ones is the cache itself, updated in place."""
  cfg, model, params = realistic('full')
  weight = smallest_kernel(params)
  params = jax.eval_shape(layout.for_decoding, params)
  sampler = sampler_lib.Sampler(model, max_len=MAX_LEN)
  cache = jax.eval_shape(lambda: sampler.init_cache(BATCH))
  row = S((BATCH, tokens), jnp.int32)
  forward = jax.jit(sampler._forward, donate_argnums=1)
  text = forward.trace(params, cache, row, row, row).lower().compile().as_text()
  ops = hlo.top_level_ops(text)
  assert describe(op for op in ops if op.elements >= weight) == []
  assert copies(ops, cache_layer_elements(cfg)) == []
  updates = [op for op in ops if op.elements == cache_layer_elements(cfg)]
  assert len(updates) == 2 * cfg.num_layers  # k and v of each layer, one in-place update each
