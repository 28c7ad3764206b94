"""Weight-only int8 / int4 quantization (dsjax/quant.py): error bounds, matmuls, logits, memory, sampling, errors."""
import functools
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from dsjax import config as config_lib
from dsjax import quant
from dsjax.model import Transformer
from dsjax.model.layers import Linear
from dsjax.sample import engine as engine_lib
from dsjax.sample.sampler import Sampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_cfg(**model):
  cfg = base.get_config()
  m = cfg.model
  m.update(dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128,
                max_positions=64, dtype='float32', init_std=0.05))
  m.update(model)
  cfg.data.seq_len = 32
  return cfg


def with_quant(cfg, mode, group_size=32):
  cfg.quant.mode, cfg.quant.group_size = mode, group_size
  return cfg


def init_params(cfg, seed=0):
  tokens = jnp.zeros((1, 8), jnp.int32)
  init = jax.jit(lambda key: Transformer(cfg.model).init(key, tokens, tokens)['params'])
  return nn.unbox(init(jax.random.key(seed)))


def numpy_dequant(t: quant.QTensor) -> np.ndarray:
  """Independent numpy reference: unpack nibbles by hand, scale per (group, column), reshape to the kernel."""
  v = np.asarray(t.values).astype(np.int32)
  if t.bits == 4:
    lo, hi = v & 0xF, (v >> 4) & 0xF
    lo, hi = np.where(lo > 7, lo - 16, lo), np.where(hi > 7, hi - 16, hi)
    q = np.empty(v.shape[:-2] + (2 * v.shape[-2], v.shape[-1]), np.int32)
    q[..., 0::2, :], q[..., 1::2, :] = lo, hi
  else:
    q = v
  s = np.asarray(t.scales, np.float32)
  g = q.shape[-2] // s.shape[-2]
  w = q.astype(np.float32) * np.repeat(s, g, axis=-2)
  return w.reshape(*q.shape[:-2], *t.shape)


@pytest.mark.parametrize('bits,group', [(8, 0), (4, 16), (4, 64)])
def test_round_trip_error_within_half_a_step(bits, group):
  w = jax.random.normal(jax.random.key(1), (3, 64, 4, 8)) * jnp.linspace(0.01, 2.0, 32).reshape(4, 8)
  w = w.at[0, 5, 1, 2].set(0.0).at[1, :, 0, 0].set(0.0)  # a zero column: scale must stay finite
  t = quant.quantize_kernel(w, 1, 1, bits=bits, group_size=group, dtype='float32')
  assert t.values.dtype == jnp.int8
  assert t.values.shape == ((3, 64, 32) if bits == 8 else (3, 32, 32))
  assert t.scales.shape == ((3, 1, 32) if bits == 8 else (3, 64 // group, 32))
  q = np.asarray(quant.unpack_int4(t.values) if bits == 4 else t.values)
  assert q.min() >= (-127 if bits == 8 else -8) and q.max() <= (127 if bits == 8 else 7)
  # Hand-computed scale: absmax over the column (int8) or the group of rows (int4) / qmax.
  wk = np.asarray(w).reshape(3, 64, 32)
  rows = 64 if bits == 8 else group
  absmax = np.abs(wk.reshape(3, 64 // rows, rows, 32)).max(axis=2)
  expected = absmax / (127 if bits == 8 else 7)
  scale = np.asarray(t.scales, np.float32)
  nonzero = absmax > 0
  np.testing.assert_allclose(scale[nonzero], expected[nonzero], rtol=2 ** -7 + 2 ** -8)
  dq = np.asarray(quant.dequantize(t))
  assert dq.shape == w.shape
  err = np.abs(np.asarray(w) - dq).reshape(3, 64 // rows, rows, 32)
  assert np.all(err <= scale[:, :, None, :] / 2 * (1 + 1e-6) + 1e-7)
  np.testing.assert_allclose(dq, numpy_dequant(t), rtol=1e-6, atol=1e-7)


def test_pack_unpack_int4_round_trip():
  q = jnp.asarray(np.arange(-8, 8, dtype=np.int8).reshape(16, 1).repeat(3, axis=1))
  packed = quant.pack_int4(q)
  assert packed.shape == (8, 3) and packed.dtype == jnp.int8
  np.testing.assert_array_equal(quant.unpack_int4(packed), q)


@pytest.mark.parametrize('mode', ['int8', 'int4'])
def test_quantized_linear_equals_numpy_matmul_with_dequantized_weights(mode):
  """o_proj-like kernel [N, H, D] (two input axes), contracted as in the model (`QTensor.project`, chunk by chunk
  on CPU), equals x @ W_dq computed in numpy."""
  n, h, d = 4, 16, 32
  layer = Linear((n, h, d), ('heads', 'head_dim', 'embed'), 'BTNH,NHD->BTD')
  w = jax.random.normal(jax.random.key(2), (n, h, d))
  t = quant.quantize_kernel(w, 2, 0, bits=8 if mode == 'int8' else 4, group_size=16, dtype='float32')
  x = jax.random.normal(jax.random.key(3), (2, 5, n, h))
  y = layer.apply({'params': {'kernel': t}}, x)
  w_dq = numpy_dequant(t)
  expected = np.asarray(x).reshape(10, n * h) @ w_dq.reshape(n * h, d)
  np.testing.assert_allclose(np.asarray(y).reshape(10, d), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('bits, group, k, m, chunk', [
    (8, 0, 64, 24, 1 << 19), (8, 0, 64, 24, 96), (8, 0, 6, 10, 4),  # one chunk; 4 rows a chunk; 1 row a chunk
    (4, 16, 64, 24, 1 << 19), (4, 16, 64, 24, 16 * 24 * 2),  # whole groups: all of them; two per chunk
    (4, 32, 128, 40, 64)])  # a wide kernel: 2 rows of a group per chunk
def test_chunked_matmul_equals_numpy_with_the_dequantized_weight(bits, group, k, m, chunk, monkeypatch):
  """`chunked_matmul` (the CPU path for decode steps) for every chunking it chooses, against numpy."""
  monkeypatch.setattr(quant, 'CHUNK_ELEMENTS', chunk)
  rng = np.random.default_rng(0)
  t = quant.quantize_kernel(jnp.asarray(rng.normal(size=(k, m)), jnp.float32), 1, 0, bits=bits,
                            group_size=group or k, dtype='float32')
  x = rng.normal(size=(3, k)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(quant.chunked_matmul(jnp.asarray(x), t)), x @ numpy_dequant(t),
                             rtol=1e-5, atol=1e-5)
  y = Linear((k, m), ('embed', 'mlp'), '...D,DF->...F').apply({'params': {'kernel': t}}, jnp.asarray(x)[None])
  np.testing.assert_allclose(np.asarray(y)[0], x @ numpy_dequant(t), rtol=1e-5, atol=1e-5)  # Linear's call


@pytest.fixture(scope='module')
def tiny():
  """A random 2-layer model, its float params, a batch and a jitted forward (one compile per param structure)."""
  cfg = small_cfg()
  model = Transformer(cfg.model)
  tokens = jax.random.randint(jax.random.key(4), (2, 12), 0, 128)
  positions = jnp.broadcast_to(jnp.arange(12), tokens.shape)
  forward = jax.jit(lambda params: model.apply({'params': params}, tokens, positions)[0])
  return cfg, model, init_params(cfg), forward


@pytest.mark.parametrize('mode,rtol', [('int8', 0.02), ('int4', 0.3)])
def test_quantized_logits_close_to_float(tiny, mode, rtol):
  """Random tiny model: ||logits_q - logits|| / ||logits|| below rtol (int8 2%, int4 30%: random Gaussian weights
  at group 32 are a worst case; trained models fare far better, see bench/quant.py). Dequantized-weight logits
  equal the quantized model's."""
  cfg, _, params, forward = tiny
  ref = forward(params)
  qparams = quant.quantize_params(params, cfg.model, with_quant(cfg.copy_and_resolve_references(), mode).quant)
  assert isinstance(qparams['layers']['attention']['q_proj']['kernel'], quant.QTensor)
  assert isinstance(qparams['lm_head']['kernel'], quant.QTensor)
  assert not isinstance(qparams['embedder']['embedding'], quant.QTensor)
  out = forward(qparams)
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert rel < rtol, rel
  np.testing.assert_allclose(out, forward(quant.dequantize_params(qparams)), rtol=1e-5, atol=1e-5)


def test_int8_activations_matmul_and_model(tiny):
  """W8A8: Linear under QuantizedModel's interceptor equals a numpy int8 x int8 matmul with per-token x scales;
  model logits stay within 3% of float (random tiny model)."""
  w = jax.random.normal(jax.random.key(5), (32, 24))
  t = quant.quantize_kernel(w, 1, 0, bits=8, group_size=0, dtype='float32')
  x = jax.random.normal(jax.random.key(6), (3, 32))
  layer = Linear((32, 24), ('embed', 'mlp'), 'BD,DF->BF')
  y = np.asarray(quant.QuantizedModel(layer).apply({'params': {'kernel': t}}, x))
  xs = np.abs(np.asarray(x)).max(axis=-1, keepdims=True) / 127
  xq = np.clip(np.round(np.asarray(x) / xs), -127, 127).astype(np.int64)
  expected = (xq @ np.asarray(t.values, np.int64)) * xs * np.asarray(t.scales)[0]
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)

  cfg, model, params, forward = tiny
  cfg = with_quant(cfg.copy_and_resolve_references(), 'int8')
  cfg.quant.activations = True
  qmodel = quant.quantize_model(model, cfg.quant)
  qparams = quant.quantize_params(params, cfg.model, cfg.quant)
  tokens = jax.random.randint(jax.random.key(4), (2, 12), 0, 128)
  positions = jnp.broadcast_to(jnp.arange(12), tokens.shape)
  ref = forward(params)
  out = jax.jit(lambda p: qmodel.apply({'params': p}, tokens, positions)[0])(qparams)
  assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 0.03
  assert not np.allclose(out, forward(qparams))  # the int8 x int8 path really ran


def test_weight_bytes_int4_under_30_percent_of_bf16():
  """Matrices dominate (hidden 512, MLP 2048, vocab 256): int4 (group 128, bf16 scales) <= 30% of bf16, int8
  <= 55%. Abstract shapes only."""
  cfg = small_cfg(vocab_size=256, hidden_size=512, num_heads=8, num_kv_heads=8, mlp_dim=2048, num_layers=2,
                  dtype='bfloat16')
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  abstract = nn.unbox(jax.eval_shape(lambda t: Transformer(cfg.model).init(jax.random.key(0), t, t), tokens)['params'])
  bf16 = quant.weight_bytes(abstract, as_dtype='bfloat16')
  assert quant.weight_bytes(abstract) == 2 * bf16  # float32 master params
  ratio = {}
  for mode in ('int8', 'int4'):
    with_quant(cfg, mode, 128)
    q = jax.eval_shape(functools.partial(quant.quantize_params, model_cfg=cfg.model, quant_cfg=cfg.quant), abstract)
    ratio[mode] = quant.weight_bytes(q) / bf16
  assert ratio['int4'] <= 0.30 and ratio['int8'] <= 0.55, ratio


def test_sampler_and_engine_run_quantized_params(tiny):
  """Greedy output with quantized params equals the float model with the dequantized weights plugged in."""
  cfg, model, params, _ = tiny
  cfg = with_quant(cfg.copy_and_resolve_references(), 'int4')
  qparams = quant.quantize_params(params, cfg.model, cfg.quant)
  dq = quant.dequantize_params(qparams)
  prompts = [[1, 5, 9, 11], [2, 7, 3, 4]]
  sampler = Sampler(model, max_len=16)
  got = sampler.generate(qparams, prompts, jax.random.key(0), max_new_tokens=8, temperature=0.0)
  want = sampler.generate(dq, prompts, jax.random.key(0), max_new_tokens=8, temperature=0.0)
  assert got == want and all(len(g) == 8 for g in got)
  engine = engine_lib.Engine(model, qparams, num_slots=2, max_len=16)
  try:
    results = [r.result(timeout=120) for r in [engine.submit(p, max_new_tokens=8) for p in prompts]]
  finally:
    engine.shutdown()
  assert results == want


def test_mode_none_is_identity_and_requantizing_fails(tiny):
  cfg, _, params, _ = tiny
  cfg = cfg.copy_and_resolve_references()
  assert quant.quantize_params(params, cfg.model, cfg.quant) is params
  qparams = quant.quantize_params(params, cfg.model, with_quant(cfg, 'int8').quant)
  with pytest.raises(ValueError, match='quantized already'):
    quant.quantize_params(qparams, cfg.model, cfg.quant)


def test_bad_mode_and_group_size_errors(tiny):
  cfg, _, params, _ = tiny
  cfg = cfg.copy_and_resolve_references()
  cfg.quant.mode = 'int3'
  with pytest.raises(config_lib.ConfigError, match=r'config\.quant\.mode'):
    quant.quantize_params(params, cfg.model, cfg.quant)
  with pytest.raises(config_lib.ConfigError, match=r'quant\.mode'):
    config_lib.validate(cfg)
  with_quant(cfg, 'int4', 47)  # int4 packs rows in pairs: odd groups are impossible
  with pytest.raises(config_lib.ConfigError, match=r'config\.quant\.group_size=47: must be even'):
    quant.quantize_params(params, cfg.model, cfg.quant)
  with pytest.raises(config_lib.ConfigError, match=r'input size 63 of w.*odd'):
    quant.quantize_kernel(jnp.ones((63, 4)), 1, 0, bits=4, group_size=32, dtype='float32', name='w')
  cfg.quant.group_size = 0
  with pytest.raises(config_lib.ConfigError, match=r'quant\.group_size'):
    config_lib.validate(cfg)
  cfg.quant.group_size, cfg.quant.activations = 32, True  # int8 activations need int8 weights
  with pytest.raises(config_lib.ConfigError, match=r'config\.quant\.activations=True needs config\.quant\.mode'):
    quant.quantize_params(params, cfg.model, cfg.quant)


def test_int4_on_the_default_tiny_model_picks_a_group_size_dividing_each_kernel(caplog):
  """configs/tiny.py with the default quant.group_size=128: down_proj's input size 704 = 11 * 64 is no multiple of
  128, so it gets 88 (the largest even divisor of 704 below 128), said once per quantization; the others keep 128."""
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny.py'))
  assert cfg.quant.group_size == 128 and cfg.model.mlp_dim == 704
  cfg.quant.mode = 'int4'
  params = init_params(cfg)
  with caplog.at_level(logging.WARNING):
    qparams = quant.quantize_params(params, cfg.model, cfg.quant)
  said = [r.getMessage() for r in caplog.records if 'group_size=128' in r.getMessage()]
  assert len(said) == 1 and 'input size 704 of layers/mlp/down_proj/kernel' in said[0] and 'group size 88' in said[0]
  groups = {name: qparams['layers'][part][name]['kernel'].scales.shape[-2]
            for part, names in (('attention', ('q_proj', 'o_proj')), ('mlp', ('up_proj', 'down_proj')))
            for name in names}
  assert groups == {'q_proj': 256 // 128, 'o_proj': 256 // 128, 'up_proj': 256 // 128, 'down_proj': 704 // 88}
  w = np.asarray(params['layers']['mlp']['down_proj']['kernel'])
  t = qparams['layers']['mlp']['down_proj']['kernel']
  step = np.repeat(np.asarray(t.scales, np.float32), 88, axis=-2)
  assert np.all(np.abs(numpy_dequant(t) - w) <= step / 2 + 1e-6)
