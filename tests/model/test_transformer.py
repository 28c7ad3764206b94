"""The whole decoder: oracle logits, causality, packing, XL memory, remat, dtypes, parameter metadata."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.model import Transformer, init_memory
from tests.model import oracles
from tests.model.helpers import KINDS, init_shapes, jit, packed_row, random_like, tiny_config

T = 16
CHANGED = 9  # causality: token index changed between rows 2 and 3


def batch_for_checks():
  """Row 0: doc A (5) + doc B (7) + padding; row 1: doc B alone + padding; rows 2, 3: one document that
  differs only at token CHANGED."""
  rng = np.random.default_rng(0)
  doc_a, doc_b, doc_c = rng.integers(1, 64, 5), rng.integers(1, 64, 7), rng.integers(1, 64, T)
  doc_c2 = doc_c.copy()
  doc_c2[CHANGED] = (doc_c[CHANGED] + 1) % 64
  tokens = np.zeros((4, T), np.int32)
  tokens[0, :12] = np.concatenate([doc_a, doc_b])
  tokens[1, :7] = doc_b
  tokens[2], tokens[3] = doc_c, doc_c2
  rows = [packed_row([5, 7], T), packed_row([7], T), packed_row([T], T), packed_row([T], T)]
  return tokens, np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


@functools.cache
def forward(kind: str, **overrides):
  """(cfg, params, jitted apply -> logits) for a tiny model of `kind`."""
  cfg = tiny_config(kind, **overrides)
  model = Transformer(cfg)
  tokens, pos, seg = batch_for_checks()
  params = random_like(init_shapes(model, tokens, pos, seg), seed=1)
  return cfg, params, jit(lambda p, t, q, s: model.apply({'params': p}, t, q, s)[0])


@pytest.mark.parametrize('kind', list(KINDS))
def test_logits_match_numpy_oracle(kind):
  cfg, params, fwd = forward(kind)
  tokens, pos, seg = batch_for_checks()
  logits = fwd(params, tokens, pos, seg)
  assert logits.dtype == jnp.float32 and logits.shape == (4, T, cfg.vocab_size)
  np.testing.assert_allclose(logits, oracles.transformer(params, cfg, tokens, pos, seg), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('kind', list(KINDS))
def test_causal_and_packing_invariant(kind):
  _, params, fwd = forward(kind)
  tokens, pos, seg = batch_for_checks()
  logits = np.asarray(fwd(params, tokens, pos, seg))
  # Causality: changing token CHANGED leaves earlier logits unchanged, and changes later ones.
  np.testing.assert_allclose(logits[2, :CHANGED], logits[3, :CHANGED], rtol=1e-6, atol=1e-6)
  assert np.abs(logits[2, CHANGED:] - logits[3, CHANGED:]).max() > 1e-3
  # Packing: doc B after doc A (and before padding) gives the logits of doc B alone.
  np.testing.assert_allclose(logits[0, 5:12], logits[1, :7], rtol=1e-5, atol=1e-5)


def test_segment_ids_default_to_one_document_per_row():
  _, params, fwd = forward('full')
  tokens, pos, seg = batch_for_checks()
  model = Transformer(tiny_config('full'))
  no_seg = jit(lambda p, t, q: model.apply({'params': p}, t, q)[0])(params, tokens[2:], pos[2:])
  np.testing.assert_allclose(no_seg, fwd(params, tokens, pos, seg)[2:], rtol=1e-5, atol=1e-5)


def test_tied_embeddings_use_the_embedding_and_have_no_lm_head():
  cfg, params, fwd = forward('full', tie_embeddings=True)
  assert 'lm_head' not in params
  tokens, pos, seg = batch_for_checks()
  want = oracles.transformer(params, cfg, tokens, pos, seg)
  np.testing.assert_allclose(fwd(params, tokens, pos, seg), want, rtol=1e-4, atol=1e-4)


def xl_inputs():
  """Row 0: one document of 2T' tokens; row 1: doc A (5) then doc B crossing the segment boundary."""
  tokens = np.random.default_rng(3).integers(1, 64, (2, T)).astype(np.int32)
  rows = [packed_row([T], T), packed_row([5, T - 5], T)]
  return tokens, np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


def test_xl_memory_two_segments_equal_one_pass():
  cfg = tiny_config('xl', positions=dict(mem_len=10))  # mem_len >= first segment length (8)
  model = Transformer(cfg)
  tokens, pos, seg = xl_inputs()
  params = random_like(init_shapes(model, tokens, pos, seg), seed=2)
  apply = jit(lambda p, t, q, s, m: model.apply({'params': p}, t, q, s, memory=m))
  h = T // 2
  logits1, aux1 = apply(params, tokens[:, :h], pos[:, :h], seg[:, :h], init_memory(cfg, 2))
  logits2, aux2 = apply(params, tokens[:, h:], pos[:, h:], seg[:, h:], aux1['memory'])
  whole, _ = apply(params, tokens, pos, seg, init_memory(cfg, 2))
  np.testing.assert_allclose(logits1, whole[:, :h], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits2, whole[:, h:], rtol=1e-5, atol=1e-5)

  mem = aux2['memory']  # the last 10 of (2 empty + 8 + 8)
  assert mem['hidden'].shape == (cfg.num_layers, 2, 10, cfg.hidden_size)
  np.testing.assert_array_equal(mem['positions'], pos[:, -10:])
  np.testing.assert_array_equal(mem['segment_ids'], seg[:, -10:])
  np.testing.assert_array_equal(aux1['memory']['segment_ids'][:, :2], -1)
  # Layer 0's memory is its input: the token embeddings.
  np.testing.assert_allclose(mem['hidden'][0], np.asarray(params['embedder']['embedding'])[tokens[:, -10:]])


def test_xl_gradients_do_not_flow_into_memory():
  cfg = tiny_config('xl', positions=dict(mem_len=8))
  model = Transformer(cfg)
  tokens, pos, seg = xl_inputs()
  params = random_like(init_shapes(model, tokens, pos, seg), seed=2)
  memory = init_memory(cfg, 2)
  memory['hidden'] = jnp.asarray(np.random.default_rng(0).normal(size=memory['hidden'].shape), jnp.float32)
  memory['segment_ids'] = jnp.ones_like(memory['segment_ids'])  # visible, so it does affect the logits

  def losses(p, hidden):
    logits, aux = model.apply({'params': p}, tokens, pos + 8, seg, memory=dict(memory, hidden=hidden))
    return jnp.sum(aux['memory']['hidden'] ** 2), jnp.sum(logits ** 2)

  grads_mem = jit(jax.grad(lambda p, h: losses(p, h)[0], argnums=(0, 1)))(params, memory['hidden'])
  for g in jax.tree_util.tree_leaves(grads_mem):
    np.testing.assert_array_equal(g, 0.0)
  # The logits do depend on the memory (so the zero above is the stop_gradient, not a disconnected input).
  grad_logits = jit(jax.grad(lambda h: losses(params, h)[1]))(memory['hidden'])
  assert np.abs(np.asarray(grad_logits)).max() > 0


def test_remat_policies_give_same_loss_and_grads():
  tokens, pos, seg = batch_for_checks()
  results = {}
  for remat in ('none', 'full', 'dots'):
    model = Transformer(tiny_config('full', remat=remat))
    params = random_like(init_shapes(model, tokens, pos, seg), seed=4)

    def loss(p):
      logits, aux = model.apply({'params': p}, tokens, pos, seg)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    results[remat] = jit(jax.value_and_grad(loss))(params)
  for remat in ('full', 'dots'):
    np.testing.assert_allclose(results[remat][0], results['none'][0], rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                           results[remat][1], results['none'][1])


def test_bfloat16_compute_close_to_float32_and_params_stay_float32():
  tokens, pos, seg = batch_for_checks()
  cfg, params, fwd = forward('full')
  bf16 = Transformer(tiny_config('full', dtype='bfloat16'))
  shapes = nn.meta.unbox(init_shapes(bf16, tokens, pos, seg))
  assert {s.dtype for s in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype('float32')}
  logits = jit(lambda p: bf16.apply({'params': p}, tokens, pos, seg)[0])(params)
  assert logits.dtype == jnp.float32
  want = np.asarray(fwd(params, tokens, pos, seg))
  # bf16 keeps 8 significant bits (relative rounding 2^-9 per op). Through ~10 rounded matmuls/adds per
  # layer the errors add up to a few percent of the logit scale, far below the effect of any real bug
  # (which changes logits by O(their scale)).
  scale = np.abs(want).max()
  assert np.abs(np.asarray(logits) - want).max() < 0.05 * scale
  assert np.abs(np.asarray(logits) - want).mean() < 0.01 * scale
  shapes = nn.meta.unbox(init_shapes(Transformer(tiny_config('full', param_dtype='bfloat16')), tokens, pos))
  assert {s.dtype for s in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype('bfloat16')}


def test_dropout_only_when_not_deterministic():
  tokens, pos, seg = batch_for_checks()
  _, params, fwd_no_dropout = forward('full')
  cfg, params_again, fwd = forward('full', dropout_rate=0.5)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, params_again)
  np.testing.assert_array_equal(fwd(params, tokens, pos, seg), fwd_no_dropout(params, tokens, pos, seg))
  model = Transformer(cfg)
  noisy = jit(lambda p, key: model.apply({'params': p}, tokens, pos, seg, deterministic=False,
                                         rngs={'dropout': key})[0])
  a, b = noisy(params, jax.random.key(0)), noisy(params, jax.random.key(1))
  np.testing.assert_array_equal(a, noisy(params, jax.random.key(0)))
  assert np.abs(np.asarray(a - b)).max() > 1e-3

EXPECTED_NAMES = {
    'embedder/embedding': ('vocab', 'embed'),
    'final_norm/scale': ('embed',),
    'lm_head/kernel': ('embed', 'vocab'),
    'layers/attn_norm/scale': ('layers', 'embed'),
    'layers/mlp_norm/scale': ('layers', 'embed'),
    'layers/attention/q_proj/kernel': ('layers', 'embed', 'heads', 'head_dim'),
    'layers/attention/k_proj/kernel': ('layers', 'embed', 'kv_heads', 'head_dim'),
    'layers/attention/v_proj/kernel': ('layers', 'embed', 'kv_heads', 'head_dim'),
    'layers/attention/o_proj/kernel': ('layers', 'heads', 'head_dim', 'embed'),
    'layers/attention/router/kernel': ('layers', 'embed', None),  # whole rows of head scores on every shard
    'layers/attention/r_proj/kernel': ('layers', 'embed', 'heads', 'head_dim'),
    'layers/attention/u_bias': ('layers', 'heads', 'head_dim'),
    'layers/attention/v_bias': ('layers', 'heads', 'head_dim'),
    'layers/mlp/gate_proj/kernel': ('layers', 'embed', 'mlp'),
    'layers/mlp/up_proj/kernel': ('layers', 'embed', 'mlp'),
    'layers/mlp/down_proj/kernel': ('layers', 'mlp', 'embed'),
}
COMMON = {k for k in EXPECTED_NAMES if 'router' not in k and k.split('/')[-1] not in ('u_bias', 'v_bias')
          and 'r_proj' not in k}


def boxed_leaves(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  return {'/'.join(k.key for k in path): leaf for path, leaf in flat}


@pytest.mark.parametrize('kind,extra', [('full', set()), ('routed', {'layers/attention/router/kernel'}),
                                        ('xl', {'layers/attention/r_proj/kernel', 'layers/attention/u_bias',
                                                'layers/attention/v_bias'})])
def test_every_parameter_has_its_logical_axis_names(kind, extra):
  cfg = tiny_config(kind)
  tokens, pos, _ = batch_for_checks()
  leaves = boxed_leaves(init_shapes(Transformer(cfg), tokens, pos))
  assert set(leaves) == COMMON | extra
  for path, leaf in leaves.items():
    assert isinstance(leaf, nn.Partitioned), path
    assert leaf.names == EXPECTED_NAMES[path], path
    assert len(leaf.names) == leaf.value.ndim, path
  assert leaves['layers/attention/k_proj/kernel'].value.shape == (2, 32, 2, 8)
  assert leaves['lm_head/kernel'].value.shape == (32, 64)
  if kind == 'routed':
    assert leaves['layers/attention/router/kernel'].value.shape == (2, 32, 3)  # 4 heads - 1 shared


def test_init_values():
  cfg = tiny_config('routed', positions=dict(kind='xl'), init_std=0.05, vocab_size=256)
  model = Transformer(cfg)
  tokens, pos, _ = batch_for_checks()
  boxed = jit(model.init)(jax.random.key(0), tokens[:1, :4], pos[:1, :4])['params']
  assert isinstance(boxed['embedder']['embedding'], nn.Partitioned)
  params = nn.meta.unbox(boxed)
  for path, value in boxed_leaves(params).items():
    value = np.asarray(value)
    if path.endswith('scale'):
      np.testing.assert_array_equal(value, 1.0)
    elif path.endswith('_bias'):
      np.testing.assert_array_equal(value, 0.0)
    else:
      assert abs(value.std() - 0.05) < 0.1 * 0.05 and abs(value.mean()) < 0.01, path
  # Different layers get different initial values.
  q = np.asarray(params['layers']['attention']['q_proj']['kernel'])
  assert not np.allclose(q[0], q[1])

def test_big_config_shapes_without_allocating():
  cfg = tiny_config('full', vocab_size=32256, hidden_size=2048, num_layers=24, num_heads=16, num_kv_heads=16,
                    mlp_dim=5504, dtype='bfloat16')
  tokens = jax.ShapeDtypeStruct((1, 2048), jnp.int32)
  shapes = nn.meta.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens, tokens)['params'])
  d, f, v, layers = 2048, 5504, 32256, 24
  expected = 2 * v * d + d + layers * (4 * d * d + 3 * d * f + 2 * d)
  assert sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes)) == expected
  assert shapes['layers']['mlp']['gate_proj']['kernel'].shape == (24, 2048, 5504)


def test_invalid_config_raises_with_field_name():
  tokens, pos, _ = batch_for_checks()
  with pytest.raises(ValueError, match='num_kv_heads'):
    init_shapes(Transformer(tiny_config('full', num_kv_heads=3)), tokens, pos)
  with pytest.raises(ValueError, match='attention.kind'):
    init_shapes(Transformer(tiny_config('full', attention=dict(kind='nope'))), tokens, pos)
  with pytest.raises(ValueError, match='memory'):
    memory = init_memory(tiny_config('xl', positions=dict(mem_len=4)), 4)
    Transformer(tiny_config('full')).apply({'params': {}}, tokens, pos, memory=memory)
