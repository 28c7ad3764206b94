"""int8 / int4 weight-only quantization of latent attention and DeepSeekMoE (dsjax/quant.py, dsjax/model/moe.py): the
routed experts quantized per expert, their grouped matmuls against numpy, a tiny_moe-shaped model against the float
and the dequantized model, decoding with the latent cache, expert parallelism, and the bytes saved."""
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import config as config_lib
from dsjax import quant
from dsjax.model import Transformer, layout
from dsjax.model import cache as cache_lib
from dsjax.model import moe as moe_lib
from dsjax.model.mla import UpProjection
from tests.model import helpers
from tests.test_quant import numpy_dequant

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERT_WEIGHTS = ('gate_proj', 'up_proj', 'down_proj')


def moe_config(mode='none', group_size=32):
  """configs/tiny_moe.py shrunk: vocab 128, hidden 64, 3 layers (a dense one, then 2 MoE layers of 8 experts of 32,
  top-2 of 4 groups, 1 shared expert), latent attention (q latent 64, kv latent 32), one MTP depth, float32."""
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny_moe.py'))
  m = cfg.model
  m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim = 128, 64, 3, 4, 4, 128
  m.max_positions = 64
  m.mla.kv_lora_rank, m.mla.q_lora_rank = 32, 64
  m.mla.qk_nope_head_dim, m.mla.qk_rope_head_dim, m.mla.v_head_dim = 16, 8, 16
  m.moe.expert_dim = 32
  cfg.quant.mode, cfg.quant.group_size = mode, group_size
  return cfg


TOKENS = jax.random.randint(jax.random.key(4), (2, 12), 0, 128)
POSITIONS = jnp.broadcast_to(jnp.arange(12), TOKENS.shape)


@pytest.fixture(scope='module')
def tiny():
  """Random float params (std 0.05, as tests/test_quant.py's init) and a jitted forward -> (logits, mtp_logits)."""
  cfg = moe_config()
  model = Transformer(cfg.model)
  tokens = jnp.zeros((1, 1), jnp.int32)
  params = helpers.random_like(helpers.init_shapes(model, tokens, tokens), seed=0, std=0.05)

  @jax.jit
  def forward(p):
    logits, aux = model.apply({'params': p}, TOKENS, POSITIONS)
    return logits, aux['mtp_logits']
  quantized = {mode: quant.quantize_params(params, cfg.model, moe_config(mode).quant) for mode in ('int8', 'int4')}
  return cfg, params, forward, quantized


def test_experts_are_quantized_per_expert_and_the_router_stays_float(tiny):
  cfg, params, _, quantized = tiny
  e, d, f = 8, 64, 32
  for mode, bits in (('int8', 8), ('int4', 4)):
    q = quantized[mode]
    for stack, lead in (('layers', (2,)), ('mtp_0', ())):  # 2 stacked MoE layers; the MTP block is not stacked
      experts = q[stack]['mlp']['experts'] if stack == 'layers' else q[stack]['block']['mlp']['experts']
      for name in EXPERT_WEIGHTS:
        t = experts[name]
        k, m = (f, d) if name == 'down_proj' else (d, f)
        assert quant.is_qtensor(t) and t.bits == bits and t.shape == (k, m) and t.num_input_axes == 1
        assert t.values.dtype == jnp.int8 and t.values.shape == (*lead, e, k if bits == 8 else k // 2, m)
        assert t.scales.shape == (*lead, e, 1 if bits == 8 else k // 32, m)
      gate = q[stack]['mlp']['gate'] if stack == 'layers' else q[stack]['block']['mlp']['gate']
      assert not quant.is_qtensor(gate['kernel']) and gate[moe_lib.BIAS_NAME].dtype == jnp.float32
    attention = q['layers']['attention']
    for name in ('q_a_proj', 'q_b_proj', 'kv_a_proj_with_mqa', 'kv_b_proj', 'o_proj'):
      assert quant.is_qtensor(attention[name]['kernel']), name
    assert quant.is_qtensor(q['layers']['mlp']['shared_experts']['gate_proj']['kernel'])
    assert quant.is_qtensor(q['dense_layers']['mlp']['down_proj']['kernel'])
    assert quant.is_qtensor(q['mtp_0']['eh_proj']['kernel'])
  # int8: one scale per (layer, expert, output channel) = that column's absmax / 127, by hand.
  w = np.asarray(params['layers']['mlp']['experts']['down_proj'])  # [L, E, F, D]
  t = quantized['int8']['layers']['mlp']['experts']['down_proj']
  np.testing.assert_allclose(np.asarray(t.scales)[:, :, 0], np.abs(w).max(axis=2) / 127, rtol=1e-6)
  for mode in ('int8', 'int4'):
    t = quantized[mode]['layers']['mlp']['experts']['up_proj']
    step = numpy_dequant(t) - np.asarray(params['layers']['mlp']['experts']['up_proj'])
    scale = np.repeat(np.asarray(t.scales, np.float32), t.shape[0] // t.scales.shape[-2], axis=-2)
    assert np.all(np.abs(step) <= scale / 2 * (1 + 1e-6) + 1e-7), mode


@pytest.mark.parametrize('bits', [8, 4])
def test_grouped_matmul_of_quantized_experts_equals_numpy(bits):
  """`QTensor.ragged_dot` (through moe.grouped_matmul): rows grouped by expert, an empty expert, rows past the groups
  (zeros), against numpy with the dequantized weights; and `routed_experts` with quantized weights equals it with
  the dequantized ones."""
  rng = np.random.default_rng(0)
  e, k, m = 4, 32, 24
  w = rng.normal(size=(e, k, m)).astype(np.float32)
  t = quant.quantize_kernel(jnp.asarray(w), 1, 1, bits=bits, group_size=16, dtype='float32')
  sizes = np.array([3, 0, 5, 2], np.int32)
  x = rng.normal(size=(12, k)).astype(np.float32)  # 10 grouped rows, 2 past the groups
  got = np.asarray(moe_lib.grouped_matmul(jnp.asarray(x), t, jnp.asarray(sizes), jnp.float32))
  w_dq = numpy_dequant(t)
  expert = np.repeat(np.arange(e), sizes)
  want = np.concatenate([np.einsum('rk,rkm->rm', x[:10], w_dq[expert]), np.zeros((2, m), np.float32)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  d, f, n, top = 32, 16, 10, 2
  ws = {name: jnp.asarray(rng.normal(size=(e, f, d) if name == 'down_proj' else (e, d, f)), jnp.float32)
        for name in EXPERT_WEIGHTS}
  qs = [quant.quantize_kernel(ws[name], 1, 1, bits=bits, group_size=8, dtype='float32') for name in EXPERT_WEIGHTS]
  x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  idx = jnp.asarray(rng.permuted(np.tile(np.arange(e), (n, 1)), axis=1)[:, :top], jnp.int32)
  weights = jnp.asarray(rng.uniform(size=(n, top)), jnp.float32)
  want = np.asarray(moe_lib.routed_experts(x, idx, weights, *[quant.dequantize(q) for q in qs]))
  np.testing.assert_allclose(moe_lib.routed_experts(x, idx, weights, *qs), want, rtol=1e-5,
                             atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize('mode,rtol', [('int8', 0.02), ('int4', 0.3)])
def test_quantized_moe_logits_close_to_float_and_equal_to_dequantized(tiny, mode, rtol):
  """||logits_q - logits|| / ||logits|| below rtol (int8 2%, int4 30% at group 32 on random Gaussian weights, where
  int4 also flips some routing choices), and the quantized model computes exactly the dequantized weights' function
  (logits and the MTP depth's)."""
  _, params, forward, quantized = tiny
  ref, _ = forward(params)
  out, mtp = forward(quantized[mode])
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert rel < rtol, rel
  dq_out, dq_mtp = forward(quant.dequantize_params(quantized[mode]))
  np.testing.assert_allclose(out, dq_out, rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(mtp, dq_mtp, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize('mode', ['int8', 'int4'])
def test_decoding_with_the_latent_cache_matches_the_quantized_forward(tiny, mode):
  """The decoding layout (layout.for_decoding keeps quantized kernels, kv_b_proj's included, in their stored layout)
  with the latent cache, in chunks of 5, 1, 1, 3 and 2 tokens, gives the full forward's logits."""
  cfg, _, forward, quantized = tiny
  qparams = quantized[mode]
  want, _ = forward(qparams)
  decoding = layout.for_decoding(qparams)
  assert quant.is_qtensor(decoding['layers_1']['attention']['kv_b_proj']['kernel'])
  assert quant.is_qtensor(decoding['layers_1']['mlp']['experts']['gate_proj'])
  model = Transformer(cfg.model)
  step = jax.jit(lambda p, t, q, c: model.apply({'params': p}, t, q, cache=c))
  cache = cache_lib.init_cache(cfg.model, 2, 16)
  got, start = [], 0
  for n in (5, 1, 1, 3, 2):
    logits, aux = step(decoding, TOKENS[:, start:start + n], POSITIONS[:, start:start + n], cache)
    cache, start = aux['cache'], start + n
    got.append(logits)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(got, axis=1)), np.asarray(want), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('mode', ['int8', 'int4'])
def test_kv_b_proj_per_head_weight_of_a_quantized_kernel_in_both_layouts(tiny, mode):
  """UpProjection.per_head_weight (the absorbed decode path's weight) of a QTensor: the dequantized kernel as
  [N, qk_nope + v, R], from the training layout's layer slice and from the decoding layout alike."""
  cfg, _, _, quantized = tiny
  la, n = cfg.model.mla, cfg.model.num_heads
  r, h = la.kv_lora_rank, la.qk_nope_head_dim + la.v_head_dim
  stacked = quantized[mode]['layers']['attention']['kv_b_proj']['kernel']
  per_layer = jax.tree_util.tree_map(lambda a: a[1], stacked)  # what nn.scan hands layer 1 (MoE layer index 1)
  decoding = layout.for_decoding(quantized[mode])['layers_2']['attention']['kv_b_proj']  # model layer 2
  up = UpProjection((r, n, h), ('kv_lora', 'heads', 'head_dim'), 'BTR,RNH->BTNH')
  want = np.transpose(numpy_dequant(stacked)[1], (1, 2, 0))
  for params in ({'kernel': per_layer}, decoding):
    got = up.apply({'params': params}, method=UpProjection.per_head_weight)
    assert got.shape == (n, h, r)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('bits', [8, 4, None])
@pytest.mark.parametrize('axes', [dict(data=2, expert=4), dict(expert=4, tensor=2)])
def test_expert_parallel_runs_quantized_experts_as_one_device(bits, axes):
  """`expert_parallel` over 8 fake devices (experts split over 'expert'; with 'tensor', each expert's inner dimension
  split too, so down_proj's K rows and int4 groups are split and int8's one scale row is replicated) with quantized
  experts (None: float ones) gives the one-device result."""
  rng = np.random.default_rng(1)
  e, d, f, n, top = 8, 32, 32, 16, 2
  qs = [jnp.asarray(rng.normal(size=(e, f, d) if name == 'down_proj' else (e, d, f)), jnp.float32)
        for name in EXPERT_WEIGHTS]
  if bits:
    qs = [quant.quantize_kernel(w, 1, 1, bits=bits, group_size=8, dtype='float32') for w in qs]
  x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  idx = jnp.asarray(rng.permuted(np.tile(np.arange(e), (n, 1)), axis=1)[:, :top], jnp.int32)
  weights = jnp.asarray(rng.uniform(size=(n, top)), jnp.float32)
  want = moe_lib.routed_experts(x, idx, weights, *qs)
  names = tuple(axes)
  mesh = jax.make_mesh(tuple(axes.values()), names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))
  plan = moe_lib.ExpertPlan(batch=('data',) if 'data' in axes else (), expert=('expert',),
                            mlp=('tensor',) if 'tensor' in axes else ())
  with jax.set_mesh(mesh):
    got = jax.jit(moe_lib.expert_parallel(plan))(x, idx, weights, *qs)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_weight_bytes_fall_about_4x_int8_and_7x_int4():
  """configs/tiny_moe.py at full size (float32 params; abstract shapes only): the routed experts are quantized too,
  so int8 stores ~1/4 of the float32 bytes and int4 (group 128, bf16 scales) ~1/7."""
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny_moe.py'))
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  abstract = nn.unbox(jax.eval_shape(lambda t: Transformer(cfg.model).init(jax.random.key(0), t, t), tokens)['params'])
  float_bytes = quant.weight_bytes(abstract)
  ratio = {}
  for mode in ('int8', 'int4'):
    cfg.quant.mode = mode
    q = jax.eval_shape(functools.partial(quant.quantize_params, model_cfg=cfg.model, quant_cfg=cfg.quant), abstract)
    assert all(quant.is_qtensor(q['layers']['mlp']['experts'][name]) for name in EXPERT_WEIGHTS)
    ratio[mode] = float_bytes / quant.weight_bytes(q)
  assert 3.6 <= ratio['int8'] <= 4.0 and 6.5 <= ratio['int4'] <= 8.0, ratio
