"""LoRA on latent attention and DeepSeekMoE (dsjax/lora.py): adapters on the MLA projections, the dense MLP, the shared
experts and per-expert adapters on the routed experts (inside the grouped matmul); zero-B identity, train steps that
change only adapters, merging, decoding with the latent cache, expert parallelism, PEFT files and Hugging Face PEFT
loading them onto a transformers DeepseekV2 model exported from the same base."""
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from dsjax import checkpoint
from dsjax import config as config_lib
from dsjax import lora
from dsjax import quant
from dsjax.convert import hf
from dsjax.model import Transformer, layout
from dsjax.model import cache as cache_lib
from dsjax.model import moe as moe_lib
from dsjax.train import optimizer as optimizer_lib
from dsjax.train import partition
from dsjax.train import state as state_lib
from dsjax.train import step as step_lib
from tests.model import helpers
from tests.lazy import peft, torch, transformers  # imported on first use (the `hf` extra)
from tests.test_lora import base_params, random_adapters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LATENT = ('q_a_proj', 'q_b_proj', 'kv_a_proj_with_mqa', 'kv_b_proj', 'o_proj')
EXPERTS = ('experts.gate_proj', 'experts.up_proj', 'experts.down_proj')
ALL = LATENT + ('gate_proj', 'up_proj', 'down_proj') + EXPERTS
canonical = lambda names: tuple(t for t in lora.ALL_TARGETS if t in names)
SPEC = lora.LoraSpec(rank=2, alpha=4.0, dropout=0.0, targets=canonical(ALL))  # scale 2
TOKENS = np.random.default_rng(0).integers(0, 64, (2, 12))


def moe_config(v2=False):
  """configs/tiny_moe.py shrunk: vocab 64, hidden 32, 3 layers (one dense, then two MoE layers of 8 experts of 16,
  top-2 of 4 groups, one shared expert), latent attention (q latent 24, kv latent 16, RoPE dims 4), one MTP depth,
  float32. v2: DeepseekV2 routing (softmax, group-limited greedy, no correction bias) and no MTP, which transformers'
  DeepseekV2 has not."""
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny_moe.py'))
  m = cfg.model
  m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim = 64, 32, 3, 4, 4, 48
  m.max_positions = 64
  m.mla.kv_lora_rank, m.mla.q_lora_rank = 16, 24
  m.mla.qk_nope_head_dim, m.mla.qk_rope_head_dim, m.mla.v_head_dim = 8, 4, 8
  m.moe.expert_dim = 16
  if v2:
    m.moe.update(dict(scoring='softmax', topk_method='group_limited_greedy', norm_topk_prob=False,
                      bias_update_rate=0.0))
    m.mtp.num_layers = 0
  cfg.data.seq_len = 16
  return cfg


def logits_of(model_cfg, params, tokens=TOKENS, spec=None):
  tokens = jnp.asarray(tokens)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  model = Transformer(model_cfg) if spec is None else lora.LoraModel(Transformer(model_cfg), spec)
  return np.asarray(helpers.jit(lambda p: model.apply({'params': p}, tokens, positions)[0])(params))


def leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope='module')
def setup():
  cfg = moe_config()
  base = base_params(cfg.model)
  params = lora.add_adapters(base, cfg.model, SPEC, adapters=random_adapters(cfg.model, SPEC))
  return dict(cfg=cfg, base=base, params=params, logits=logits_of(cfg.model, params, spec=SPEC))


def test_adapters_sit_where_the_targets_are_and_zero_b_changes_nothing(setup):
  cfg, base = setup['cfg'], setup['base']
  fresh = lora.add_adapters(base, cfg.model, SPEC, rng=jax.random.key(0))
  shapes = {k: v.shape for k, v in leaves(lora.adapters_of(fresh)).items()}
  r, e, d, f = 2, 8, 32, 16
  assert shapes["['layers']['mlp']['experts']['gate_proj_lora']['lora_a']"] == (2, e, d, r)  # 2 MoE layers
  assert shapes["['layers']['mlp']['experts']['down_proj_lora']['lora_b']"] == (2, e, r, d)
  assert shapes["['layers']['mlp']['shared_experts']['up_proj']['lora_b']"] == (2, r, f)
  assert shapes["['dense_layers']['mlp']['down_proj']['lora_a']"] == (1, 48, r)  # the dense prefix
  assert shapes["['dense_layers']['attention']['kv_b_proj']['lora_b']"] == (1, r, 4, 16)
  assert shapes["['layers']['attention']['q_a_proj']['lora_a']"] == (2, d, r)
  assert not [k for k in shapes if 'mtp' in k]  # the MTP depth gets no adapters
  assert len(shapes) == 2 * (len(LATENT) + 3 + len(LATENT) + 3 + 3)  # latent + dense MLP; latent + shared + routed
  a = np.asarray(fresh['layers']['mlp']['experts']['up_proj_lora']['lora_a'])
  assert 0 < np.abs(a).max() <= 1 / np.sqrt(d)  # PEFT's kaiming-uniform bound, fan-in D per expert
  np.testing.assert_array_equal(logits_of(cfg.model, fresh, spec=SPEC), logits_of(cfg.model, base))
  assert np.abs(setup['logits'] - logits_of(cfg.model, base)).max() > 0.1  # random adapters matter


def test_unknown_or_absent_targets_name_the_config_field(setup):
  cfg = setup['cfg']
  with pytest.raises(config_lib.ConfigError, match=r"config\.lora\.targets.*\['q_proj', 'v_proj'\] are not"):
    lora.init_adapters(cfg.model, lora.LoraSpec(targets=('q_proj', 'v_proj', 'q_a_proj')), jax.random.key(0))
  dense = helpers.tiny_config()
  with pytest.raises(config_lib.ConfigError, match=r"\['experts\.up_proj'\] are not projections"):
    lora.init_adapters(dense, lora.LoraSpec(targets=('q_proj', 'experts.up_proj')), jax.random.key(0))
  lora_cfg = helpers.base_config().lora
  lora_cfg.targets = ('kv_b_proj', 'experts.down_proj', 'q_a_proj')
  assert lora.spec_from_config(lora_cfg).targets == ('q_a_proj', 'kv_b_proj', 'experts.down_proj')


@pytest.mark.parametrize('base_int8', [False, True])
def test_merge_gives_the_adapter_logits(setup, base_int8):
  """Merged (kernel + alpha / r * A @ B, per expert for routed experts; an int8 base dequantized first) equals the
  unmerged adapters, also with an int8 base (its routed experts int8 QTensors under the adapters)."""
  cfg, params = setup['cfg'], setup['params']
  spec = lora.LoraSpec(rank=2, alpha=4.0, targets=SPEC.targets, base_int8=base_int8)
  want = setup['logits']
  if base_int8:
    params = lora.quantize_base(params, cfg.model)
    experts = params['layers']['mlp']['experts']
    assert quant.is_qtensor(experts['gate_proj']) and experts['gate_proj'].bits == 8
    assert quant.is_qtensor(params['layers']['attention']['kv_b_proj']['kernel'])
    assert not quant.is_qtensor(params['lm_head']['kernel']) and not quant.is_qtensor(params['mtp_0']['eh_proj'])
    want = logits_of(cfg.model, params, spec=spec)
    assert np.abs(want - setup['logits']).max() < 0.05 * np.abs(want).max()
  merged = lora.merge(params, spec)
  assert not lora.adapters_of(merged) and not any(quant.is_qtensor(x) for x in
                                                  jax.tree_util.tree_leaves(merged, is_leaf=quant.is_qtensor))
  assert merged['layers']['mlp']['experts']['gate_proj'].shape == (2, 8, 32, 16)
  np.testing.assert_allclose(logits_of(cfg.model, merged), want, atol=1e-4, rtol=0)
  model, plain = lora.plain_model(lora.LoraModel(Transformer(cfg.model), spec), params)
  assert isinstance(model, Transformer)
  np.testing.assert_allclose(logits_of(cfg.model, plain), want, atol=1e-4, rtol=0)


def test_decoding_with_the_latent_cache_applies_the_adapters(setup):
  """LoraModel over the decoding layout with the latent cache (kv_b_proj's adapter reaches the absorbed form through
  UpProjection.per_head_weight) gives the full forward's logits."""
  cfg, params = setup['cfg'], setup['params']
  model = lora.LoraModel(Transformer(cfg.model), SPEC)
  step = helpers.jit(lambda p, t, q, c: model.apply({'params': p}, t, q, cache=c))
  tokens = jnp.asarray(TOKENS)
  positions = jnp.broadcast_to(jnp.arange(12), tokens.shape)
  cache = cache_lib.init_cache(cfg.model, 2, 16)
  decoding = layout.for_decoding(params)
  got, start = [], 0
  for n in (5, 1, 1, 3, 2):
    logits, aux = step(decoding, tokens[:, start:start + n], positions[:, start:start + n], cache)
    cache, start = aux['cache'], start + n
    got.append(logits)
  np.testing.assert_allclose(np.concatenate(got, axis=1), setup['logits'], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('dropout', [0.0, 0.5])
def test_expert_parallel_adapted_experts_match_one_device(dropout):
  """Routed experts with adapters (AdaptedExperts, int8 base and float base) under expert_parallel on 8 fake devices
  (experts over 'expert', inner dimension over 'tensor') equal one device; with dropout, masks drawn per shard differ
  from one device's but drop about `rate` of the adapter inputs."""
  rng = np.random.default_rng(2)
  e, d, f, n, top, r = 8, 16, 16, 16, 2, 2
  arr = lambda *shape: jnp.asarray(rng.normal(0, 0.3, shape), jnp.float32)
  weights = {'gate_proj': arr(e, d, f), 'up_proj': arr(e, d, f), 'down_proj': arr(e, f, d)}
  x, idx = arr(n, d), jnp.asarray(rng.permuted(np.tile(np.arange(e), (n, 1)), axis=1)[:, :top], jnp.int32)
  w_nk = jnp.asarray(rng.uniform(size=(n, top)), jnp.float32)
  key = jax.random.key(3) if dropout else None
  mesh = jax.make_mesh((4, 2), ('expert', 'tensor'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  plan = moe_lib.ExpertPlan(batch=(), expert=('expert',), mlp=('tensor',))
  for int8 in (False, True):
    adapted = []
    for name, w in weights.items():
      k, m = w.shape[1:]
      base = quant.quantize_kernel(w, 1, 1, bits=8, group_size=0, dtype='float32') if int8 else w
      adapted.append(lora.AdaptedExperts(base, arr(e, k, r), arr(e, r, m), key, factor=2.0, rate=dropout,
                                         dtype='float32'))
    one = moe_lib.routed_experts(x, idx, w_nk, *adapted)
    with jax.set_mesh(mesh):
      sharded = jax.jit(moe_lib.expert_parallel(plan))(x, idx, w_nk, *adapted)
    no_adapter = moe_lib.routed_experts(x, idx, w_nk, *[a.base for a in adapted])
    assert np.abs(np.asarray(one) - np.asarray(no_adapter)).max() > 0.1
    if not dropout:
      np.testing.assert_allclose(np.asarray(sharded), np.asarray(one), rtol=1e-5, atol=1e-5)
    else:
      assert np.isfinite(np.asarray(sharded)).all() and not np.allclose(sharded, one)
  if dropout:  # the adapter path's input: about half its entries dropped, the rest scaled by 1 / (1 - rate)
    probe = lora.AdaptedExperts(jnp.zeros((1, 64, 64)), jnp.eye(64)[None], jnp.eye(64)[None], key, factor=1.0,
                                rate=dropout, dtype='float32')
    y = np.asarray(probe.ragged_dot(jnp.ones((64, 64)), jnp.asarray([64], jnp.int32)))
    assert set(np.unique(y)) <= {0.0, 2.0} and 0.4 < (y == 0).mean() < 0.6


def _batch(rows=4, length=16):
  pattern = np.arange(length + 1) * 5 % 64
  seq = np.stack([np.roll(pattern, r) for r in range(rows)]).astype(np.int32)
  return {'inputs': jnp.asarray(seq[:, :-1]), 'targets': jnp.asarray(seq[:, 1:]),
          'positions': jnp.asarray(np.broadcast_to(np.arange(length), (rows, length)).astype(np.int32)),
          'segment_ids': jnp.ones((rows, length), jnp.int32)}


def _bits(x):
  x = np.asarray(x)
  return x.view(f'u{x.dtype.itemsize}')


def test_train_steps_change_only_the_adapters(setup):
  """Three train steps of the real step (LM loss + MTP + balance terms, adapter dropout on) from fresh adapters:
  every adapter (latent attention, dense MLP, shared and routed experts) moves; every base param, the routers'
  correction biases and the MTP depth included, keeps its bits."""
  cfg, base = moe_config(), setup['base']
  cfg.optim.learning_rate, cfg.optim.warmup_steps = 3e-2, 0
  cfg.model.dropout_rate = 0.0
  spec = lora.LoraSpec(rank=2, alpha=4.0, dropout=0.1, targets=SPEC.targets)
  step_cfg = moe_config()
  step_cfg.model.dropout_rate = spec.dropout  # what dsjax.train.loop does: the step passes a dropout rng
  model = lora.LoraModel(Transformer(cfg.model), spec)
  optimizer = optimizer_lib.make_optimizer(cfg.optim, 20, cfg.model.moe.bias_update_rate)
  params = lora.add_adapters(base, cfg.model, spec, rng=jax.random.key(3))
  mask = partition.trainable_mask(params, partition.ADAPTERS)
  start = state_lib.train_state_from_params(params, optimizer, mask=mask)
  before = jax.tree_util.tree_map(np.asarray, start.params)
  train_step = helpers.jit(step_lib.make_train_step(model, optimizer, step_cfg, mask=mask))
  state, losses = start, []
  for _ in range(3):
    state, metrics = train_step(state, _batch(), jax.random.key(7))
    losses.append(float(metrics['loss']))
  assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
  after = jax.tree_util.tree_map(np.asarray, state.params)
  (old_adapters, old_base), (new_adapters, new_base) = partition.split(before, mask), partition.split(after, mask)
  moved = leaves(old_adapters)
  assert any('experts' in k and 'gate_proj_lora' in k for k in moved)
  for (name, old), new in zip(moved.items(), leaves(new_adapters).values()):
    assert not np.array_equal(old, new), name
  for (name, old), new in zip(leaves(old_base).items(), leaves(new_base).values()):
    np.testing.assert_array_equal(_bits(old), _bits(new), err_msg=name)


def test_peft_files_round_trip_with_deepseek_names(setup, tmp_path, caplog):
  """save_peft -> load_peft is the identity; tensors carry transformers' DeepseekV2/V3 module names (per-expert
  routed adapters, shared experts, the dense layer's MLP), torch [out, in] layout, and B rows of the RoPE outputs
  in HF's interleaved order; the MoE caveat for PEFT with transformers 5 is logged."""
  cfg, params = setup['cfg'], setup['params']
  with caplog.at_level(logging.WARNING):
    lora.save_peft(str(tmp_path), params, cfg.model, SPEC)
  assert any('shared experts are dropped' in r.getMessage() for r in caplog.records)
  with open(tmp_path / lora.ADAPTER_CONFIG) as f:
    config = json.load(f)
  assert config['target_modules'] == ['o_proj', 'gate_proj', 'up_proj', 'down_proj', 'q_a_proj', 'q_b_proj',
                                      'kv_a_proj_with_mqa', 'kv_b_proj']
  prefix = 'base_model.model.model.layers.'
  with safe_open(str(tmp_path / lora.ADAPTER_WEIGHTS), framework='numpy') as f:
    shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    experts = params['layers']['mlp']['experts']
    np.testing.assert_array_equal(f.get_tensor(prefix + '2.mlp.experts.5.down_proj.lora_B.weight'),
                                  np.asarray(experts['down_proj_lora']['lora_b'][1, 5]).T)
    np.testing.assert_array_equal(f.get_tensor(prefix + '1.mlp.experts.0.gate_proj.lora_A.weight'),
                                  np.asarray(experts['gate_proj_lora']['lora_a'][0, 0]).T)
    # kv_a_proj_with_mqa's outputs: 16 latent, then 4 RoPE dims: dsjax's rotate-half order [0, 2, 1, 3] of HF's.
    b_hf = f.get_tensor(prefix + '0.self_attn.kv_a_proj_with_mqa.lora_B.weight')
    b = np.asarray(params['dense_layers']['attention']['kv_a_proj_with_mqa']['lora_b'][0]).T  # [20, r]
    np.testing.assert_array_equal(b_hf[:16], b[:16])
    np.testing.assert_array_equal(b_hf[16:][[0, 2, 1, 3]], b[16:])
  assert shapes[prefix + '1.mlp.experts.7.up_proj.lora_B.weight'] == (16, 2)
  assert shapes[prefix + '2.mlp.shared_experts.down_proj.lora_A.weight'] == (2, 16)
  assert shapes[prefix + '0.mlp.gate_proj.lora_B.weight'] == (48, 2)
  assert shapes[prefix + '1.self_attn.q_b_proj.lora_B.weight'] == (4 * 12, 2)
  assert not any('mtp' in k or 'layers.3.' in k for k in shapes)
  per_layer = {0: 5 + 3, 1: 5 + 3 + 3 * 8, 2: 5 + 3 + 3 * 8}
  assert len(shapes) == 2 * sum(per_layer.values())

  spec, adapters = lora.load_peft(str(tmp_path), cfg.model)
  assert spec == SPEC
  want = leaves(lora.adapters_of(params))
  got = leaves(adapters)
  assert set(got) == set(want)
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)
  merged = lora.merge_peft(setup['base'], cfg.model, str(tmp_path))
  np.testing.assert_allclose(logits_of(cfg.model, merged), setup['logits'], atol=1e-4, rtol=0)

  # Only routed experts under an MLP name: the file says gate_proj, its tensors say which.
  routed = lora.LoraSpec(rank=2, alpha=4.0, targets=('kv_b_proj',) + EXPERTS)
  lora.save_peft(str(tmp_path / 'routed'), lora.add_adapters(setup['base'], cfg.model, routed, rng=jax.random.key(1)),
                 cfg.model, routed)
  assert lora.read_peft_config(str(tmp_path / 'routed')).targets == routed.targets
  # PEFT's own format for transformers 5's fused experts is refused with a message that says so.
  config['target_parameters'] = ['gate_up_proj', 'down_proj']
  with open(tmp_path / lora.ADAPTER_CONFIG, 'w') as f:
    json.dump(config, f)
  with pytest.raises(lora.AdapterError, match='target_parameters.*fused expert parameters'):
    lora.load_peft(str(tmp_path), cfg.model)


def test_peft_loads_the_adapter_onto_transformers_deepseek_v2(tmp_path):
  """The base exported to HF (DeepseekV2ForCausalLM), the adapter on every latent-attention projection and the
  routed experts saved by save_peft, loaded by peft.PeftModel.from_pretrained (with transformers 5 it converts the
  per-expert adapters into adapters of the fused expert parameters): PEFT's logits equal dsjax's."""
  cfg = moe_config(v2=True)
  spec = lora.LoraSpec(rank=2, alpha=4.0, targets=canonical(LATENT + EXPERTS))
  base = base_params(cfg.model, seed=3)
  params = lora.add_adapters(base, cfg.model, spec, adapters=random_adapters(cfg.model, spec, seed=4))
  checkpoint.save_model(str(tmp_path / 'base'), cfg, base)
  hf.export_hf(str(tmp_path / 'base'), str(tmp_path / 'hf'))
  lora.save_peft(str(tmp_path / 'adapter'), params, cfg.model, spec)
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'hf'), dtype=torch.float32).eval()
  assert type(model).__name__ == 'DeepseekV2ForCausalLM'
  with torch.no_grad():
    plain = model(torch.tensor(TOKENS)).logits.numpy()
  peft_model = peft.PeftModel.from_pretrained(model, str(tmp_path / 'adapter')).eval()
  with torch.no_grad():
    theirs = peft_model(torch.tensor(TOKENS)).logits.numpy()
  ours = logits_of(cfg.model, params, spec=spec)
  np.testing.assert_allclose(logits_of(cfg.model, base), plain, atol=1e-4, rtol=0)
  assert np.abs(theirs - plain).max() > 0.1  # the adapter matters ...
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)  # ... and both sides apply it alike
