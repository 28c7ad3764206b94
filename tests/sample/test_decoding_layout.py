"""The decoding layout (dsjax/model/layout.py): conversions both ways, the same model in both layouts, and greedy
decoding over it against independent references: a naive loop of full forward passes over the training layout
(no cache, nn.scan; quantized models through their dequantized weights) and transformers' generate()."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import quant
from dsjax.convert import hf
from dsjax.model import Transformer
from dsjax.model import cache as cache_lib
from dsjax.model import layout
from dsjax.sample import sampler as sampler_lib
from dsjax.sample import speculative
from dsjax import checkpoint
from tests.lazy import torch, transformers  # imported on first use (the `hf` extra)
from tests.model import helpers
from tests.test_quant import with_quant


def model_and_params(kind='full', seed=1, **overrides):
  cfg = helpers.tiny_config(kind, **overrides)
  model = Transformer(cfg)
  tokens = jnp.zeros((1, 8), jnp.int32)
  shapes = helpers.init_shapes(model, tokens, jnp.arange(8, dtype=jnp.int32)[None])
  return cfg, model, shapes, helpers.random_like(shapes, seed=seed, std=0.5)


def naive_greedy(model, params, prompt, steps):
  """One growing sequence, a full forward pass per new token, training layout (nn.scan, no cache)."""
  assert not layout.is_decoding(params)
  forward = helpers.jit(lambda p, x: model.apply({'params': p}, x, jnp.arange(x.shape[1], dtype=jnp.int32)[None]))
  tokens = list(prompt)
  for _ in range(steps):
    logits, _ = forward(params, jnp.asarray([tokens], jnp.int32))
    tokens.append(int(np.argmax(np.asarray(logits[0, -1]))))
  return tokens[len(prompt):]


def test_round_trips_and_the_decoding_shapes():
  cfg, model, shapes, params = model_and_params('routed', num_layers=3)
  decoding = layout.for_decoding(params)
  assert layout.is_decoding(decoding) and not layout.is_decoding(params)
  assert sorted(k for k in decoding if k.startswith('layers')) == ['layers_0', 'layers_1', 'layers_2']
  attention = decoding['layers_1']['attention']
  assert attention['q_proj']['kernel_t'].shape == (4, 8, 32)  # [N, H, D]: [out..., in...]
  assert attention['o_proj']['kernel_t'].shape == (32, 4, 8)  # [D, N, H]
  np.testing.assert_array_equal(attention['o_proj']['kernel_t'],
                                np.transpose(params['layers']['attention']['o_proj']['kernel'][1], (2, 0, 1)))
  np.testing.assert_array_equal(decoding['layers_2']['attention']['router']['kernel'],
                                params['layers']['attention']['router']['kernel'][2])  # not a projection: as is
  assert layout.for_decoding(decoding) is decoding and layout.for_training(params) is params
  back = layout.for_training(decoding)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  # Boxed (logically partitioned) and abstract params: axis names follow the axes.
  boxed = jax.eval_shape(layout.for_decoding, shapes)
  box = boxed['layers_0']['attention']['o_proj']['kernel_t']
  assert box.names == ('embed', 'heads', 'head_dim') and box.value.shape == (32, 4, 8)
  assert boxed['layers_0']['mlp_norm']['scale'].names == ('embed',)
  again = jax.eval_shape(layout.for_training, boxed)
  assert jax.tree.map(lambda b: (b.names, b.value.shape), again, is_leaf=lambda x: hasattr(x, 'names')) == \
      jax.tree.map(lambda b: (b.names, b.value.shape), shapes, is_leaf=lambda x: hasattr(x, 'names'))
  with pytest.raises(ValueError, match='without gaps'):
    layout.for_training({k: v for k, v in decoding.items() if k != 'layers_1'})
  with pytest.raises(ValueError, match="neither 'layers' nor 'layers_0'"):
    layout.for_decoding({'embedder': {}})


@pytest.mark.parametrize('kind', ['full', 'sparse', 'routed', 'xl_mem_sparse'])
def test_both_layouts_compute_the_same_logits(kind):
  cfg, model, _, params = model_and_params(kind)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, 64, (2, 12)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
  forward = lambda p: model.apply({'params': p}, tokens, positions)
  want, want_aux = forward(params)
  got, got_aux = forward(layout.for_decoding(params))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  if want_aux['memory'] is not None:  # Transformer-XL memory: the same per-layer states
    np.testing.assert_allclose(got_aux['memory']['hidden'], want_aux['memory']['hidden'], rtol=1e-5, atol=1e-5)


def test_a_cache_needs_the_decoding_layout_and_the_per_layer_structure():
  cfg, model, _, params = model_and_params()
  tokens, positions = jnp.ones((1, 2), jnp.int32), jnp.arange(2, dtype=jnp.int32)[None]
  cache = cache_lib.init_cache(cfg, 1, 8)
  with pytest.raises(ValueError, match='decoding layout.*for_decoding'):
    model.apply({'params': params}, tokens, positions, cache=cache)
  stacked = {**cache, 'k': jnp.stack(cache['k']), 'v': jnp.stack(cache['v'])}  # the old [L, B, S, K, H] form
  with pytest.raises(ValueError, match=r"cache\['k'\] must hold one \[B, S, K, H\] array per layer"):
    model.apply({'params': layout.for_decoding(params)}, tokens, positions, cache=stacked)


CASES = {  # name: (attention kind, quantization mode)
    'full': ('full', 'none'),
    'sparse_ring': ('sparse', 'none'),
    'routed': ('routed', 'none'),
    'int8': ('full', 'int8'),
    'int4': ('full', 'int4'),
}


# Kept out of the 10-minute default suite (pytest -m slow runs them): the sparse ring and routed caches are also
# decoded against full forward passes in tests/sample/test_sampler.py; int8 shares int4's chunked path.
SLOW_CASES = ('sparse_ring', 'routed', 'int8')


@pytest.mark.parametrize('case', [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES])
def test_greedy_decoding_equals_full_forward_passes(case):
  """Sampler (decoding layout, per-layer cache; quantized kernels chunk by chunk) against the training-layout model
  run from scratch per token. Training-layout params given to the sampler are converted inside the call."""
  kind, mode = CASES[case]
  cfg, model, _, params = model_and_params(kind)
  reference = params
  if mode != 'none':
    quant_cfg = with_quant(helpers.base_config(), mode, group_size=16).quant
    params = quant.quantize_params(params, cfg, quant_cfg)
    reference = quant.dequantize_params(params)
  prompts = [[1, 2, 3, 4, 5, 6, 7], [9], [11, 12]]
  sampler = sampler_lib.Sampler(model, max_len=20)
  want = [naive_greedy(model, reference, p, 8) for p in prompts]
  got = sampler.generate(layout.for_decoding(params), prompts, jax.random.key(0), max_new_tokens=8)
  assert got == want
  assert sampler.generate(params, prompts, jax.random.key(0), max_new_tokens=8) == want


def test_speculative_decoding_in_the_decoding_layout_equals_greedy():
  """The speculative loop (a drafter model with its own cache; verification chunks) over decoding-layout params."""
  cfg, model, _, params = model_and_params('sparse')
  _, _, _, draft_params = model_and_params('sparse', seed=7)
  prompts = [[1, 2, 3, 4, 5], [8, 9]]
  drafter = speculative.ModelDrafter(sampler_lib.Sampler(model, max_len=24, extra_slots=4), draft_params)
  assert layout.is_decoding(drafter.params)
  target = sampler_lib.Sampler(model, max_len=24, extra_slots=4)
  got, _ = speculative.speculative_generate(target, params, drafter, prompts, jax.random.key(0),
                                            max_new_tokens=8, gamma=3)
  assert got == [naive_greedy(model, params, p, 8) for p in prompts]


# float32 and int8 against transformers run with -m slow (float greedy parity through sample.py is also in
# tests/convert/test_hf.py); int4 stays in the default suite.
@pytest.mark.parametrize('mode', [pytest.param('none', marks=pytest.mark.slow),
                                  pytest.param('int8', marks=pytest.mark.slow), 'int4'])
def test_greedy_decoding_equals_transformers_generate(mode, tmp_path):
  """A random LlamaForCausalLM imported; quantized: transformers runs the dequantized weights, exported back."""
  torch.manual_seed(0)
  config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=97, max_position_embeddings=64,
                                    tie_word_embeddings=False)
  hf_model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():  # weights large enough that greedy decoding is not a constant
    for p in hf_model.parameters():
      p.mul_(8.0)
  hf_model.save_pretrained(tmp_path / 'hf')
  cfg = hf.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'ckpt'))
  cfg.model.dtype = 'float32'
  params = checkpoint.load_params(str(tmp_path / 'ckpt'), cfg.model)
  if mode != 'none':
    params = quant.quantize_params(params, cfg.model, with_quant(cfg, mode, group_size=32).quant)
    checkpoint.save_model(str(tmp_path / 'dequantized_ckpt'), cfg, quant.dequantize_params(params))
    hf.export_hf(str(tmp_path / 'dequantized_ckpt'), str(tmp_path / 'dequantized'), dtype='float32')
    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / 'dequantized', torch_dtype=torch.float32).eval()
  prompts = [[5, 17, 3, 88, 41, 2], [60, 7, 7]]
  model = Transformer(cfg.model)
  got = sampler_lib.Sampler(model, max_len=24).generate(layout.for_decoding(params), prompts, jax.random.key(0),
                                                        max_new_tokens=10)
  for prompt, tokens in zip(prompts, got):
    with torch.no_grad():
      out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    assert tokens == out[0, len(prompt):].tolist()
