"""Multi-head latent attention (dsjax/model/mla.py) against a float64 oracle written from the DeepSeek-V2 paper
(section 2.1, uncompressed keys and values), and its decoding: the absorbed form over the latent cache equals the
uncompressed full forward, for full and ring (sparse) caches, and the cache holds kv_lora_rank + qk_rope_head_dim
numbers per token and layer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.model import Transformer, cache as cache_lib, layout
from dsjax.model.mla import LatentAttention
from tests.model import oracles
from tests.model.helpers import init_shapes, jit, random_like, random_packed, tiny_config


def mla_config(q_lora_rank=0, kind='full', **overrides):
  m = tiny_config(kind, num_kv_heads=4, **overrides)
  m.mla.update(dict(kv_lora_rank=8, q_lora_rank=q_lora_rank, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5))
  return m


def oracle(p, cfg, x, pos, seg):
  """Latent attention written out per head in float64: c = norm(x W_dkv), k_n = [c W_uk_n, rope(x W_kr)],
  v_n = c W_uv_n, q_n = [q_nope, rope(q_rope)], softmax(q.k * (nope + rope)^-1/2) over the visible keys."""
  la = cfg.mla
  hn, hr, r = la.qk_nope_head_dim, la.qk_rope_head_dim, la.kv_lora_rank
  f = lambda a: np.asarray(a, np.float64)
  x = f(x)
  if la.q_lora_rank:
    q = oracles.rmsnorm(x @ f(p['q_a_proj']['kernel']), f(p['q_a_layernorm']['scale']), cfg.norm_eps)
    q = np.einsum('btr,rnh->btnh', q, f(p['q_b_proj']['kernel']))
  else:
    q = np.einsum('btd,dnh->btnh', x, f(p['q_proj']['kernel']))
  compressed = x @ f(p['kv_a_proj_with_mqa']['kernel'])
  c = oracles.rmsnorm(compressed[..., :r], f(p['kv_a_layernorm']['scale']), cfg.norm_eps)
  k_rope = oracles.rope(compressed[..., None, r:], pos)
  kv = np.einsum('btr,rnh->btnh', c, f(p['kv_b_proj']['kernel']))
  n = q.shape[2]
  keys = np.concatenate([kv[..., :hn], np.repeat(k_rope, n, axis=2)], axis=-1)
  queries = np.concatenate([q[..., :hn], oracles.rope(q[..., hn:], pos)], axis=-1)
  window, num_global = oracles.mask_args(cfg)
  # oracles.attention scales by 1/sqrt(its head size), the query/key size here, as the paper's MLA does; it returns
  # outputs of the query size, so the values ride zero-padded.
  values = np.pad(kv[..., hn:], ((0, 0),) * 3 + ((0, hn + hr - la.v_head_dim),))
  out = oracles.attention(queries, keys, values, pos, pos, seg, seg, window, num_global)[..., :la.v_head_dim]
  return np.einsum('btnh,nhd->btd', out, f(p['o_proj']['kernel']))


@pytest.mark.parametrize('q_lora_rank, kind', [(0, 'full'), (6, 'full'), (0, 'sparse')])
def test_latent_attention_matches_the_uncompressed_oracle(q_lora_rank, kind):
  cfg = mla_config(q_lora_rank, kind)
  rng = np.random.default_rng(0)
  pos, seg = random_packed(rng, 2, 12)
  x = jnp.asarray(rng.normal(size=(2, 12, cfg.hidden_size)), jnp.float32)
  module = LatentAttention(cfg)
  params = random_like(init_shapes(module, x, jnp.asarray(pos), jnp.asarray(seg)), seed=1)
  out, _, _ = jit(module.apply)({'params': params}, x, jnp.asarray(pos), jnp.asarray(seg))
  want = oracle(jax.tree.map(np.asarray, params), cfg, np.asarray(x), pos, seg)
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-5)


def decode_step_by_step(model, params, tokens, prefill, cache):
  """Logits of a prefill of `prefill` tokens, then one token per call, all against the latent cache."""
  b, t = tokens.shape
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  apply = jit(model.apply)
  out, aux = apply({'params': params}, tokens[:, :prefill], pos[:, :prefill], cache=cache)
  logits = [out]
  for i in range(prefill, t):
    out, aux = apply({'params': params}, tokens[:, i:i + 1], pos[:, i:i + 1], cache=aux['cache'])
    logits.append(out)
  return jnp.concatenate(logits, axis=1), aux['cache']


@pytest.mark.parametrize('kind', ['full', 'sparse'])
def test_absorbed_decoding_equals_the_uncompressed_forward(kind):
  cfg = mla_config(6, kind)
  model = Transformer(cfg)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 14)))
  pos = jnp.broadcast_to(jnp.arange(14), (2, 14))
  params = random_like(init_shapes(model, tokens, pos), seed=3)
  full, _ = jit(model.apply)({'params': params}, tokens, pos)
  cache = cache_lib.init_cache(cfg, 2, 14)
  if kind == 'sparse':  # a ring of num_global + window slots, wrapped several times by 14 tokens
    assert cache['k'][0].shape[1] == cfg.attention.num_global + cfg.attention.window
  got, _ = decode_step_by_step(model, layout.for_decoding(params), tokens, 3, cache)
  np.testing.assert_allclose(np.asarray(got), np.asarray(full), rtol=1e-4, atol=1e-5)


def test_latent_cache_holds_the_latent_and_the_rope_key_per_token():
  cfg = mla_config()
  cache = cache_lib.init_cache(cfg, batch_size=3, max_len=10, dtype='bfloat16')
  assert cache['k'][0].shape == (3, 10, 1, cfg.mla.kv_lora_rank)
  assert cache['v'][0].shape == (3, 10, 1, cfg.mla.qk_rope_head_dim)
  per_token_layer = sum(c[0].nbytes for c in (cache['k'], cache['v'])) // (3 * 10)
  assert per_token_layer == (8 + 4) * 2  # (kv_lora_rank + qk_rope_head_dim) bfloat16 numbers
  # DeepSeek-V2-Lite: 512 + 64 = 576 numbers, against 2 x 16 heads x 128 = 4,096 uncompressed.
  lite = mla_config()
  lite.update(dict(hidden_size=2048, num_heads=16, num_kv_heads=16))
  lite.mla.update(dict(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128))
  shapes = cache_lib.cache_token_shape(lite)
  assert sum(int(np.prod(s)) for s in shapes) == 576


@pytest.mark.parametrize('kind', ['full', pytest.param('sparse', marks=pytest.mark.slow)])
def test_latent_attention_on_the_kernels_matches_the_reference(kind):
  """impl='pallas' (interpret mode): the kernels take one head size, so values ride zero-padded to the query/key
  size and the softmax scale is folded into the queries; logits and gradients equal impl='reference'."""
  rng = np.random.default_rng(0)
  pos, seg = random_packed(rng, 2, 24)
  tokens = jnp.asarray(rng.integers(1, 64, (2, 24)), jnp.int32)
  models = {impl: Transformer(mla_config(6, kind, attention=dict(impl=impl))) for impl in ('reference', 'pallas')}
  params = random_like(init_shapes(models['reference'], tokens, pos, seg), seed=3)
  valid = jnp.asarray(seg > 0)

  def loss(p, impl):
    logits, _ = models[impl].apply({'params': p}, tokens, jnp.asarray(pos), jnp.asarray(seg))
    return -jnp.sum(jnp.where(valid, jax.nn.log_softmax(logits)[..., 0], 0.0)), logits

  results = {impl: jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, impl) for impl in models}
  (_, ref_logits), ref_grads = results['reference']
  (_, pal_logits), pal_grads = results['pallas']
  np.testing.assert_allclose(np.asarray(pal_logits)[seg > 0], np.asarray(ref_logits)[seg > 0], atol=1e-4, rtol=1e-4)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref_grads), jax.tree_util.tree_leaves(pal_grads)):
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-3, err_msg=jax.tree_util.keystr(path))
