"""YaRN RoPE scaling (dsjax/model/positions.py) against transformers' DeepSeek-V2/V3 rotary embeddings, and q/k/v
biases (model.qkv_bias, Linear.use_bias) against transformers' Qwen2 attention, through the decoding layout,
int8 quantization and LoRA."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import config as config_lib
from dsjax import lora
from dsjax import quant
from dsjax.model import Attention, Transformer
from dsjax.model import layout
from dsjax.model.layers import Linear
from dsjax.model.positions import (YarnParams, apply_rope, rope_angles, rope_frequencies, rope_kwargs, yarn_params,
                                   yarn_softmax_scale_multiplier)
from tests.lazy import torch, transformers  # imported on first use (the `hf` extra)
from tests.model import helpers

# Positions inside and far beyond the original 4096-token context (factor 40 reaches 163840).
POSITIONS = np.array([[0, 1, 7, 100, 2047, 4095, 4096, 5000, 20000, 65535, 100000, 163839]], np.int32)

YARN_CASES = {  # name: (factor, mscale, mscale_all_dim, truncate, head_dim, theta); None: unset in HF's config
    'factor4_unset': (4.0, None, None, True, 64, 10000.0),
    'factor40_unset': (40.0, None, None, True, 64, 10000.0),
    'factor40_v3': (40.0, 1.0, 1.0, True, 64, 10000.0),            # DeepSeek-V3: attention factor 1
    'factor40_v2': (40.0, 0.707, 0.707, True, 64, 10000.0),        # DeepSeek-V2
    'factor4_mscales_differ': (4.0, 1.0, 0.5, True, 32, 50000.0),  # attention factor != 1 and a softmax multiplier
    'factor40_all_dim_only': (40.0, None, 1.0, True, 64, 10000.0),  # HF ignores mscale_all_dim without mscale
    'factor40_no_truncate': (40.0, 1.0, 1.0, False, 64, 10000.0),
    'factor4_beta': (4.0, None, None, True, 128, 1e6),
}


def hf_deepseek_config(version, factor, mscale, mscale_all_dim, truncate, head_dim, theta):
  rope = dict(rope_type='yarn', factor=factor, original_max_position_embeddings=4096, rope_theta=theta)
  rope.update({k: v for k, v in (('mscale', mscale), ('mscale_all_dim', mscale_all_dim)) if v is not None})
  if not truncate:
    rope['truncate'] = False
  config_class = transformers.DeepseekV2Config if version == 2 else transformers.DeepseekV3Config
  return config_class(hidden_size=256, num_attention_heads=4, qk_rope_head_dim=head_dim, head_dim=head_dim,
                      max_position_embeddings=int(4096 * factor), rope_parameters=rope)


def assert_within(got, want, atol):
  """|got - want| <= atol elementwise (atol broadcast), naming the worst element otherwise."""
  err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
  excess = err - np.broadcast_to(atol, err.shape)
  worst = np.unravel_index(np.argmax(excess), err.shape)
  assert excess[worst] <= 0, f'at {worst}: |{got[worst]} - {want[worst]}| > {np.broadcast_to(atol, err.shape)[worst]}'


def yarn_of(mscale, mscale_all_dim, truncate):
  """The YarnParams for HF's rope_parameters (an unset mscale or mscale_all_dim is 0)."""
  return YarnParams(4096, mscale=mscale or 0.0, mscale_all_dim=mscale_all_dim or 0.0, truncate=truncate)


@pytest.mark.parametrize('case', list(YARN_CASES))
def test_yarn_frequencies_angles_cos_sin_match_deepseek_rotary_embeddings(case):
  factor, mscale, mscale_all_dim, truncate, head_dim, theta = YARN_CASES[case]
  yarn = yarn_of(mscale, mscale_all_dim, truncate)
  inv_freq, attention_factor = rope_frequencies(head_dim, theta, factor, yarn)
  hf2 = hf_deepseek_config(2, *YARN_CASES[case])
  hf_inv_freq, hf_factor = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS['yarn'](hf2)
  assert inv_freq.dtype == np.float32 and inv_freq.shape == (head_dim // 2,)
  # At most an ulp apart: numpy's powf is correctly rounded, torch's vectorised pow is not always (theta 1e6).
  np.testing.assert_array_max_ulp(inv_freq, hf_inv_freq.numpy(), maxulp=1)
  assert attention_factor == pytest.approx(hf_factor, abs=1e-12)

  angles = np.asarray(helpers.jit(lambda p: rope_angles(p, head_dim, theta, factor, yarn))(POSITIONS))
  cos, sin = np.cos(angles) * attention_factor, np.sin(angles) * attention_factor
  # cos/sin to 1e-6, plus the angle difference that a frequency an ulp apart makes (position * the difference; 0
  # where the frequencies are equal, which here they are but for theta 1e6). At 1.6e5 rad an ulp of the angle is
  # 0.016, so this holds only with the same float32 angles as transformers computes.
  atol = 1e-6 + POSITIONS[..., None] * np.abs(inv_freq - hf_inv_freq.numpy()).astype(np.float64)
  pos = torch.tensor(POSITIONS, dtype=torch.long)
  with torch.no_grad():
    rotary2 = transformers.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2RotaryEmbedding(hf2)
    freqs_cis = rotary2(torch.zeros(1), pos).numpy()  # complex [B, T, H/2]: (cos + i sin) * attention factor
    rotary3 = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3RotaryEmbedding(
        hf_deepseek_config(3, *YARN_CASES[case]))
    cos3, sin3 = (t.numpy() for t in rotary3(torch.zeros(1), pos))  # [B, T, H]: both halves the same
  np.testing.assert_array_max_ulp(angles, POSITIONS[..., None].astype(np.float32) * hf_inv_freq.numpy(), maxulp=2)
  assert_within(cos, freqs_cis.real, atol)
  assert_within(sin, freqs_cis.imag, atol)
  atol_h = np.concatenate([atol, atol], -1)  # [B, T, H]
  assert_within(np.concatenate([cos, cos], -1), cos3, atol_h)
  assert_within(np.concatenate([sin, sin], -1), sin3, atol_h)

  # apply_rope (rotate_half pairing, as LLaMA / Qwen2 and DeepSeek-V3's cos/sin) with the attention factor on cos
  # and sin, against transformers' apply_rotary_pos_emb with DeepSeek-V3's cos/sin.
  x = np.random.default_rng(0).normal(size=(1, POSITIONS.shape[1], 3, head_dim)).astype(np.float32)
  rope = helpers.jit(apply_rope, static_argnames=('theta', 'scaling_factor', 'yarn'))
  got = rope(jnp.asarray(x), jnp.asarray(POSITIONS), theta=theta, scaling_factor=factor, yarn=yarn)
  xt = torch.tensor(x).transpose(1, 2)  # HF: [B, N, T, H]
  want, _ = transformers.models.qwen2.modeling_qwen2.apply_rotary_pos_emb(xt, xt, torch.tensor(cos3),
                                                                          torch.tensor(sin3))
  # two products of |x| < 5 with cos or sin: 10 times their tolerance, plus float32 rounding
  assert_within(np.asarray(got), want.transpose(1, 2).numpy(), 10 * atol_h[:, :, None] + 1e-5)


def test_rope_kwargs_from_the_positions_config():
  p = helpers.tiny_config().positions
  assert rope_kwargs(p) == dict(theta=10000.0, scaling_factor=1.0, yarn=None)
  p.update(dict(rope_theta=100000.0, rope_scaling_factor=4.0))
  assert rope_kwargs(p) == dict(theta=100000.0, scaling_factor=4.0, yarn=None) and yarn_params(p) is None
  p.update(dict(rope_scaling='yarn', rope_scaling_factor=40.0, yarn_original_max_positions=4096, yarn_beta_fast=32.0,
                yarn_beta_slow=1.0, yarn_mscale=0.707, yarn_mscale_all_dim=0.707))
  assert rope_kwargs(p) == dict(theta=100000.0, scaling_factor=40.0,
                                yarn=YarnParams(4096, 32.0, 1.0, 0.707, 0.707, True))


def test_linear_scaling_unchanged_and_equal_to_transformers_linear():
  """Linear scaling keeps dsjax's (position / factor) * inv_freq angles; rope_frequencies gives HF's linear
  frequencies theta^(-2i/H) / factor."""
  inv_freq, attention_factor = rope_frequencies(16, 10000.0, 4.0)
  hf = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16,
                                rope_parameters=dict(rope_type='linear', factor=4.0, rope_theta=10000.0))
  hf_inv_freq, hf_factor = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS['linear'](hf)
  np.testing.assert_allclose(inv_freq, hf_inv_freq.numpy(), rtol=1e-6)
  assert attention_factor == hf_factor == 1.0
  pos = jnp.asarray(POSITIONS[:, :6])
  base = 1.0 / (10000.0 ** (jnp.arange(0, 16, 2, dtype=jnp.float32) / 16))
  np.testing.assert_array_equal(rope_angles(pos, 16, 10000.0, 4.0), (pos.astype(jnp.float32) / 4.0)[..., None] * base)


@pytest.mark.parametrize('factor', [1.0, 4.0, 40.0])
@pytest.mark.parametrize('mscale_all_dim', [0.0, 0.707, 1.0])
def test_yarn_softmax_scale_multiplier(factor, mscale_all_dim):
  """mscale(factor, mscale_all_dim)^2 with mscale = 0.1 * mscale_all_dim * ln(factor) + 1 under YaRN with
  mscale_all_dim set (and factor > 1), else 1; equal to what DeepseekV2Attention multiplies its scaling by."""
  p = helpers.tiny_config().positions
  p.update(dict(rope_scaling_factor=factor, yarn_mscale=1.0, yarn_mscale_all_dim=mscale_all_dim))
  assert yarn_softmax_scale_multiplier(p) == 1.0  # linear scaling
  p.rope_scaling = 'yarn'
  expected = (0.1 * mscale_all_dim * math.log(factor) + 1.0) ** 2 if mscale_all_dim and factor > 1 else 1.0
  assert yarn_softmax_scale_multiplier(p) == pytest.approx(expected, rel=1e-12)
  rope_parameters = dict(rope_type='yarn', factor=factor, mscale_all_dim=mscale_all_dim)
  apply_mscale = transformers.models.deepseek_v2.modeling_deepseek_v2.yarn_apply_mscale
  assert yarn_softmax_scale_multiplier(p) == pytest.approx(apply_mscale(rope_parameters, 1.0), rel=1e-12)


# ------------------------------------------------------------------------------------------------ q/k/v biases

QWEN_ROPE = {  # name: (HF rope_parameters, dsjax positions overrides, first position)
    'default': (dict(rope_type='default', rope_theta=10000.0), {}, 0),
    # YaRN in standard attention (cos/sin times the attention factor), positions beyond the original 16.
    'yarn': (dict(rope_type='yarn', rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16),
             dict(rope_scaling='yarn', rope_scaling_factor=4.0, yarn_original_max_positions=16), 40),
}


def dsjax_attention_params(hf_attention, d, n, kh, h):
  """dsjax Attention params from a transformers Qwen2Attention: kernels [in..., out...], biases [out...]."""
  w = lambda name: getattr(hf_attention, name).weight.detach().numpy()
  b = lambda name: getattr(hf_attention, name).bias.detach().numpy()
  return {
      'q_proj': {'kernel': w('q_proj').T.reshape(d, n, h), 'bias': b('q_proj').reshape(n, h)},
      'k_proj': {'kernel': w('k_proj').T.reshape(d, kh, h), 'bias': b('k_proj').reshape(kh, h)},
      'v_proj': {'kernel': w('v_proj').T.reshape(d, kh, h), 'bias': b('v_proj').reshape(kh, h)},
      'o_proj': {'kernel': w('o_proj').T.reshape(n, h, d)},
  }


@pytest.mark.parametrize('rope', list(QWEN_ROPE))
def test_qwen2_attention_with_biases_matches_transformers(rope):
  hf_rope, positions_cfg, start = QWEN_ROPE[rope]
  d, n, kh, t = 64, 4, 2, 24
  h = d // n
  torch.manual_seed(0)
  hf_cfg = transformers.Qwen2Config(hidden_size=d, num_attention_heads=n, num_key_value_heads=kh,
                                    intermediate_size=96, num_hidden_layers=1, vocab_size=64,
                                    max_position_embeddings=128, rope_parameters=hf_rope, dtype=torch.float32,
                                    attn_implementation='eager')
  hf_attention = transformers.models.qwen2.modeling_qwen2.Qwen2Attention(hf_cfg, layer_idx=0).eval()
  with torch.no_grad():
    for name in ('q_proj', 'k_proj', 'v_proj'):  # biases well away from zero
      getattr(hf_attention, name).bias.normal_(0.0, 0.5)
  rotary = transformers.models.qwen2.modeling_qwen2.Qwen2RotaryEmbedding(hf_cfg)
  x = np.random.default_rng(1).normal(size=(2, t, d)).astype(np.float32)
  positions = np.broadcast_to(np.arange(start, start + t, dtype=np.int32), (2, t))
  causal = np.triu(np.full((t, t), np.finfo(np.float32).min, np.float32), k=1)[None, None]
  with torch.no_grad():
    xt = torch.tensor(x)
    cos_sin = rotary(xt, torch.tensor(positions, dtype=torch.long))
    want = hf_attention(xt, cos_sin, torch.tensor(causal))[0].numpy()

  cfg = helpers.tiny_config(hidden_size=d, num_heads=n, num_kv_heads=kh, qkv_bias=True, max_positions=128,
                            positions=dict(positions_cfg))
  config_lib.validate_model(cfg)
  params = dsjax_attention_params(hf_attention, d, n, kh, h)
  shapes = helpers.init_shapes(Attention(cfg), jnp.asarray(x), jnp.asarray(positions), None)
  assert jax.tree.map(lambda s: s.shape, nn.meta.unbox(shapes)) == jax.tree.map(np.shape, params)
  got, _, _ = helpers.jit(lambda p, x, pos: Attention(cfg).apply({'params': p}, x, pos, None))(
      params, jnp.asarray(x), jnp.asarray(positions))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  without = dict(params, q_proj=dict(params['q_proj'], bias=np.zeros((n, h), np.float32)))
  assert not np.allclose(Attention(cfg).apply({'params': without}, x, positions, None)[0], want, atol=1e-3)


def test_linear_bias_params_in_every_layout():
  """use_bias: a zero-initialised 'bias' over the output axes (with their logical names), added after the float,
  decoding-layout (kernel_t), quantized and int8 x int8 projections."""
  layer = Linear((8, 2, 3), ('embed', 'kv_heads', 'head_dim'), 'BD,DKH->BKH', use_bias=True)
  x = jax.random.normal(jax.random.key(0), (5, 8))
  boxed = layer.init(jax.random.key(1), x)['params']
  assert boxed['bias'].names == ('kv_heads', 'head_dim') and boxed['kernel'].names == ('embed', 'kv_heads', 'head_dim')
  params = nn.meta.unbox(boxed)
  np.testing.assert_array_equal(params['bias'], np.zeros((2, 3)))
  bias = jax.random.normal(jax.random.key(2), (2, 3))
  params = dict(params, bias=bias)
  want = np.einsum('bd,dkh->bkh', x, params['kernel']) + np.asarray(bias)
  np.testing.assert_allclose(layer.apply({'params': params}, x), want, rtol=1e-5, atol=1e-5)
  transposed = {'kernel_t': jnp.transpose(params['kernel'], (1, 2, 0)), 'bias': bias}
  np.testing.assert_allclose(layer.apply({'params': transposed}, x), want, rtol=1e-5, atol=1e-5)
  t = quant.quantize_kernel(params['kernel'], 1, 0, bits=8, group_size=0, dtype='float32')
  dequantized = np.einsum('bd,dkh->bkh', x, quant.dequantize(t, jnp.float32)) + np.asarray(bias)
  np.testing.assert_allclose(layer.apply({'params': {'kernel': t, 'bias': bias}}, x), dequantized,
                             rtol=1e-5, atol=1e-5)
  w8a8 = quant.QuantizedModel(layer).apply({'params': {'kernel': t, 'bias': bias}}, x)
  no_bias = quant.QuantizedModel(layer).apply({'params': {'kernel': t, 'bias': jnp.zeros((2, 3))}}, x)
  np.testing.assert_allclose(w8a8 - no_bias, np.broadcast_to(bias, w8a8.shape), rtol=1e-5, atol=1e-5)
  assert not np.array_equal(w8a8, layer.apply({'params': {'kernel': t, 'bias': bias}}, x))  # int8 x int8 ran


@pytest.fixture(scope='module')
def biased_model():
  """A tiny Transformer with q/k/v biases, random params (biases included), a batch and a jitted forward."""
  cfg = helpers.tiny_config(qkv_bias=True)
  model = Transformer(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 12)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
  shapes = helpers.init_shapes(model, tokens, positions)
  params = helpers.random_like(shapes, seed=3, std=0.3)
  forward = jax.jit(lambda p: model.apply({'params': p}, tokens, positions)[0])
  return cfg, model, shapes, params, tokens, positions, forward


def test_biases_in_the_params_and_through_the_decoding_layout(biased_model):
  cfg, model, shapes, params, tokens, positions, forward = biased_model
  attention = shapes['layers']['attention']
  assert attention['q_proj']['bias'].names == ('layers', 'heads', 'head_dim')
  assert attention['k_proj']['bias'].names == ('layers', 'kv_heads', 'head_dim')
  assert attention['v_proj']['bias'].value.shape == (cfg.num_layers, cfg.num_kv_heads, 8)
  assert 'bias' not in attention['o_proj'] and 'bias' not in shapes['layers']['mlp']['up_proj']

  decoding = layout.for_decoding(params)
  for i in range(cfg.num_layers):
    for name in ('q_proj', 'k_proj', 'v_proj'):
      np.testing.assert_array_equal(decoding[f'layers_{i}']['attention'][name]['bias'],
                                    params['layers']['attention'][name]['bias'][i])
  jax.tree.map(np.testing.assert_array_equal, layout.for_training(decoding), params)
  boxed = jax.eval_shape(layout.for_decoding, shapes)
  assert boxed['layers_0']['attention']['q_proj']['bias'].names == ('heads', 'head_dim')

  want = forward(params)
  np.testing.assert_array_equal(forward(decoding), want)
  unbiased = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if jax.tree_util.keystr(path).endswith("['bias']") else x, params)
  assert not np.allclose(forward(unbiased), want, atol=1e-3)  # the biases matter


def test_int8_quantized_model_keeps_its_biases(biased_model):
  cfg, model, _, params, tokens, positions, forward = biased_model
  quant_cfg = helpers.base_config().quant
  quant_cfg.mode = 'int8'
  qparams = quant.quantize_params(params, cfg, quant_cfg)
  qkv = qparams['layers']['attention']
  assert quant.is_qtensor(qkv['q_proj']['kernel']) and not quant.is_qtensor(qkv['q_proj']['bias'])
  np.testing.assert_array_equal(qkv['k_proj']['bias'], params['layers']['attention']['k_proj']['bias'])
  want = forward(params)
  got = forward(qparams)
  assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 0.05  # 3% (random weights, std 0.3)
  np.testing.assert_allclose(got, forward(quant.dequantize_params(qparams)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(forward(layout.for_decoding(qparams)), got, rtol=1e-5, atol=1e-5)
  # int8 activations too (the w8a8 interceptor takes a Linear with a bias)
  quant_cfg.activations = True
  qmodel = quant.quantize_model(model, quant_cfg)
  w8a8 = jax.jit(lambda p: qmodel.apply({'params': p}, tokens, positions)[0])(qparams)
  assert float(jnp.linalg.norm(w8a8 - want) / jnp.linalg.norm(want)) < 0.08  # 4.8%
  assert not np.allclose(w8a8, got)  # the int8 x int8 path really ran


def test_lora_on_biased_projections_merges_into_the_same_model(biased_model):
  cfg, model, _, params, tokens, positions, forward = biased_model
  spec = lora.LoraSpec(rank=2, alpha=4.0, targets=('q_proj', 'k_proj', 'v_proj', 'o_proj'))
  adapters = lora.init_adapters(cfg, spec, jax.random.key(0))
  adapters = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), adapters)  # b != 0
  full = lora.add_adapters(params, cfg, spec, adapters=adapters)
  np.testing.assert_array_equal(full['layers']['attention']['v_proj']['bias'],
                                params['layers']['attention']['v_proj']['bias'])
  got = lora.LoraModel(model, spec).apply({'params': full}, tokens, positions)[0]
  merged = lora.merge(full, spec)
  assert 'bias' in merged['layers']['attention']['q_proj']
  np.testing.assert_allclose(got, forward(merged), rtol=1e-4, atol=1e-4)
  assert not np.allclose(got, forward(params), atol=1e-3)
