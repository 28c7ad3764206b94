"""LoRA (dsjax/lora.py) against independent references: Hugging Face PEFT on the exported base (CPU, float32),
PEFT's own merge, hand-computed int8 quantization, and the real train step and training loop."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safetensors import safe_open
from safetensors.numpy import load_file

from flax import linen as nn

from dsjax import config as config_lib
from dsjax import lora
from dsjax import quant
from dsjax.convert import hf
from dsjax.model import Transformer
from dsjax import checkpoint
from dsjax.train import loop
from dsjax.train import optimizer as optimizer_lib
from dsjax.train import partition
from dsjax.train import state as state_lib
from dsjax.train import step as step_lib
from tests.model import helpers
from tests.lazy import peft, torch, transformers  # imported on first use (the `hf` extra)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 1e-4  # float32 on both sides
ALL = tuple(lora.TARGETS)
SPEC = lora.LoraSpec(rank=4, alpha=8.0, dropout=0.0, targets=ALL)  # scale 2


def full_config():
  cfg = helpers.base_config()
  cfg.model = helpers.tiny_config()  # vocab 64, hidden 32, 2 layers, 4 heads, 2 KV heads, mlp 48, float32
  cfg.data.seq_len = 32
  return cfg


def base_params(model_cfg, seed=0):
  tokens = jnp.zeros((1, 1), jnp.int32)
  return helpers.random_like(helpers.init_shapes(Transformer(model_cfg), tokens, tokens), seed=seed)


def random_adapters(model_cfg, spec, seed=1, std=0.1):
  """Non-zero A and B (a fresh adapter has B = 0, which would hide layout mistakes)."""
  shapes = lora.adapters_of(nn.meta.unbox(lora.abstract_params(model_cfg, spec)))
  return helpers.random_like(shapes, seed=seed, std=std)


def logits_of(model_cfg, params, tokens, spec=None):
  tokens = jnp.asarray(tokens)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  model = Transformer(model_cfg) if spec is None else lora.LoraModel(Transformer(model_cfg), spec)
  apply = helpers.jit(lambda p, t, pos: model.apply({'params': p}, t, pos)[0])
  return np.asarray(apply(params, tokens, positions))


TOKENS = np.random.default_rng(0).integers(0, 64, (2, 12))


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """The tiny base exported to HF, an adapter on all seven projections saved in PEFT format, and PEFT's model."""
  d = tmp_path_factory.mktemp('lora')
  cfg = full_config()
  base = base_params(cfg.model)
  params = lora.add_adapters(base, cfg.model, SPEC, adapters=random_adapters(cfg.model, SPEC))
  checkpoint.save_model(str(d / 'base'), cfg, base)
  hf.export_hf(str(d / 'base'), str(d / 'hf'))
  lora.save_peft(str(d / 'adapter'), params, cfg.model, SPEC)
  model = transformers.LlamaForCausalLM.from_pretrained(str(d / 'hf'), torch_dtype=torch.float32).eval()
  peft_model = peft.PeftModel.from_pretrained(model, str(d / 'adapter')).eval()
  with torch.no_grad():
    peft_logits = peft_model(torch.tensor(TOKENS)).logits.numpy()
  return dict(dir=d, cfg=cfg, base=base, params=params, peft_model=peft_model, peft_logits=peft_logits)


def test_peft_loaded_adapter_gives_the_dsjax_logits(setup):
  cfg, peft_logits = setup['cfg'], setup['peft_logits']
  ours = logits_of(cfg.model, setup['params'], TOKENS, SPEC)
  plain = logits_of(cfg.model, setup['base'], TOKENS)
  assert np.abs(peft_logits - plain).max() > 0.1  # the adapter matters ...
  np.testing.assert_allclose(ours, peft_logits, atol=ATOL, rtol=0)  # ... and both sides apply it alike


def test_merge_equals_peft_merge_and_the_adapter_logits(setup):
  cfg, d = setup['cfg'], setup['dir']
  merged = lora.merge(setup['params'], SPEC)
  assert not lora.adapters_of(merged)
  # The merged params are a plain model: they load into Transformer(cfg.model) and export to HF ...
  np.testing.assert_allclose(logits_of(cfg.model, merged, TOKENS), setup['peft_logits'], atol=ATOL, rtol=0)
  # serve.py --adapter: the PEFT directory merged into the base (read back from disk) gives PEFT's logits too.
  served = lora.merge_peft(setup['base'], cfg.model, str(d / 'adapter'))
  np.testing.assert_allclose(logits_of(cfg.model, served, TOKENS), setup['peft_logits'], atol=ATOL, rtol=0)
  checkpoint.save_model(str(d / 'merged'), cfg, merged)
  hf.export_hf(str(d / 'merged'), str(d / 'merged_hf'))
  exported = load_file(str(d / 'merged_hf' / hf.SINGLE_FILE))
  # ... tensor for tensor what PEFT's own merge_and_unload computes.
  reference = {k: v.numpy() for k, v in setup['peft_model'].merge_and_unload().state_dict().items()}
  assert set(exported) == set(reference)
  for name, value in reference.items():
    np.testing.assert_allclose(exported[name], value, atol=1e-5, rtol=0, err_msg=name)


def test_save_peft_files_and_load_round_trip(setup, tmp_path):
  cfg, params, d = setup['cfg'], setup['params'], setup['dir'] / 'adapter'
  old_umask = os.umask(0o022)
  try:  # the weights get the mode any new file gets (safetensors alone writes 0600), like the config beside them
    lora.save_peft(str(tmp_path / 'modes'), params, cfg.model, SPEC)
  finally:
    os.umask(old_umask)
  for name in (lora.ADAPTER_WEIGHTS, lora.ADAPTER_CONFIG):
    assert os.stat(tmp_path / 'modes' / name).st_mode & 0o777 == 0o644, name
  with open(d / lora.ADAPTER_CONFIG) as f:
    config = json.load(f)
  assert (config['peft_type'], config['r'], config['lora_alpha'], sorted(config['target_modules'])) == (
      'LORA', 4, 8.0, sorted(ALL))
  with safe_open(str(d / lora.ADAPTER_WEIGHTS), framework='numpy') as f:
    shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
  # HF Linear layout [out, in]: q 32 -> 4 heads x 8, k/v 32 -> 2 x 8, o 32 -> 32, gate/up 32 -> 48, down 48 -> 32.
  io = {'self_attn.q_proj': (32, 32), 'self_attn.k_proj': (32, 16), 'self_attn.v_proj': (32, 16),
        'self_attn.o_proj': (32, 32), 'mlp.gate_proj': (32, 48), 'mlp.up_proj': (32, 48), 'mlp.down_proj': (48, 32)}
  expected = {}
  for i in range(2):
    for module, (n_in, n_out) in io.items():
      expected[f'base_model.model.model.layers.{i}.{module}.lora_A.weight'] = (4, n_in)
      expected[f'base_model.model.model.layers.{i}.{module}.lora_B.weight'] = (n_out, 4)
  assert shapes == expected
  # Layer 1's q_proj A in torch layout is our [D, r] slice transposed.
  with safe_open(str(d / lora.ADAPTER_WEIGHTS), framework='numpy') as f:
    np.testing.assert_array_equal(f.get_tensor('base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight'),
                                  np.asarray(params['layers']['attention']['q_proj']['lora_a'][1]).T)

  spec, adapters = lora.load_peft(str(d), cfg.model)
  assert spec == SPEC
  jax.tree_util.tree_map(np.testing.assert_array_equal, adapters, lora.adapters_of(params))

  # Errors name the file.
  with pytest.raises(FileNotFoundError, match=lora.ADAPTER_CONFIG):
    lora.load_peft(str(tmp_path), cfg.model)
  os.makedirs(tmp_path / 'no_weights')
  with open(tmp_path / 'no_weights' / lora.ADAPTER_CONFIG, 'w') as f:
    json.dump(config, f)
  with pytest.raises(FileNotFoundError, match=lora.ADAPTER_WEIGHTS):
    lora.load_peft(str(tmp_path / 'no_weights'), cfg.model)
  deeper = helpers.tiny_config(num_layers=3)
  with pytest.raises(lora.AdapterError, match=lora.ADAPTER_WEIGHTS + '.*missing'):
    lora.load_peft(str(d), deeper)
  wider = helpers.tiny_config(mlp_dim=64)
  with pytest.raises(lora.AdapterError, match='gate_proj.lora_B.weight has shape'):
    lora.load_peft(str(d), wider)


@pytest.mark.parametrize('targets, field', [(('q_proj', 'lm_head'), 'config.lora.targets'),
                                            ((), 'config.lora.targets'),
                                            (('q_proj', 'q_proj', 'embed'), 'config.lora.targets')])
def test_bad_targets_name_the_config_field(targets, field):
  lora_cfg = helpers.base_config().lora
  lora_cfg.targets = targets
  with pytest.raises(config_lib.ConfigError, match=field):
    lora.spec_from_config(lora_cfg)


def test_config_spec_defaults_and_other_fields():
  lora_cfg = helpers.base_config().lora
  assert lora.spec_from_config(lora_cfg) == lora.LoraSpec(16, 32.0, 0.1, ('q_proj', 'v_proj'), False)
  lora_cfg.targets = ('v_proj', 'q_proj', 'down_proj', 'q_proj')  # canonical order, no duplicates
  assert lora.spec_from_config(lora_cfg).targets == ('q_proj', 'v_proj', 'down_proj')
  lora_cfg.rank = 0
  with pytest.raises(config_lib.ConfigError, match='config.lora.rank'):
    lora.spec_from_config(lora_cfg)


def test_plain_model_params_are_unchanged_by_the_lora_plumbing():
  m = helpers.tiny_config()
  tokens = jnp.zeros((1, 1), jnp.int32)
  plain = jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), helpers.init_shapes(Transformer(m), tokens, tokens))
  names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(plain)}
  assert not any('lora' in n or 'int8' in n for n in names)


def _quantized_by_hand(base):
  """Per-output-channel symmetric int8 of the seven projection kernels, in numpy (stacked [L, in..., out...])."""
  ref = jax.tree_util.tree_map(np.asarray, base)
  num_in = {'q_proj': 1, 'k_proj': 1, 'v_proj': 1, 'o_proj': 2, 'gate_proj': 1, 'up_proj': 1, 'down_proj': 1}
  for name, (module, _) in lora.TARGETS.items():
    w = ref['layers'][module][name]['kernel'].astype(np.float64)
    axes = tuple(range(1, 1 + num_in[name]))
    scale = np.abs(w).max(axis=axes, keepdims=True) / 127.0
    ref['layers'][module][name]['kernel'] = (np.round(w / scale) * scale).astype(np.float32)
  return ref


def test_int8_base_matches_hand_quantization_and_stays_close_to_float(setup):
  cfg, base = setup['cfg'], setup['base']
  spec = lora.LoraSpec(rank=4, alpha=8.0, targets=('q_proj', 'v_proj'), base_int8=True)
  params = lora.add_adapters(base, cfg.model, spec, rng=jax.random.key(0))  # fresh: B = 0
  gate = params['layers']['mlp']['gate_proj']['kernel']
  assert quant.is_qtensor(gate) and gate.values.dtype == jnp.int8  # native int8, one byte per weight
  assert gate.values.nbytes == base['layers']['mlp']['gate_proj']['kernel'].size
  ours = logits_of(cfg.model, params, TOKENS, spec)
  by_hand = logits_of(cfg.model, _quantized_by_hand(base), TOKENS)
  np.testing.assert_allclose(ours, by_hand, atol=ATOL, rtol=0)
  float_logits = logits_of(cfg.model, base, TOKENS)
  assert np.abs(ours - float_logits).max() < 0.05 * np.abs(float_logits).max()


def _batch(rows=4, length=16):
  pattern = np.arange(length + 1) * 5 % 64  # a deterministic sequence the model can learn
  seq = np.stack([np.roll(pattern, r) for r in range(rows)]).astype(np.int32)
  return {'inputs': jnp.asarray(seq[:, :-1]), 'targets': jnp.asarray(seq[:, 1:]),
          'positions': jnp.asarray(np.broadcast_to(np.arange(length), (rows, length)).astype(np.int32)),
          'segment_ids': jnp.ones((rows, length), jnp.int32)}


def _bits(x):
  x = np.asarray(x)
  return x.view(f'u{x.dtype.itemsize}')


@pytest.mark.parametrize('base_int8', [False, True])
def test_train_step_changes_only_adapters_and_lowers_the_loss(setup, base_int8):
  cfg, base = full_config(), setup['base']
  cfg.optim.learning_rate, cfg.optim.warmup_steps = 3e-2, 0
  spec = lora.LoraSpec(rank=4, alpha=8.0, dropout=0.1 if base_int8 else 0.0, targets=ALL, base_int8=base_int8)
  if spec.dropout:
    cfg.model.dropout_rate = 0.0
    step_cfg = full_config()
    step_cfg.model.dropout_rate = spec.dropout  # what dsjax.train.loop does: the step passes a dropout rng
  else:
    step_cfg = cfg
  model = lora.LoraModel(Transformer(cfg.model), spec)
  optimizer = optimizer_lib.make_optimizer(cfg.optim, 20)
  params = lora.add_adapters(base, cfg.model, spec, rng=jax.random.key(3))
  mask = partition.trainable_mask(params, partition.ADAPTERS)
  start = state_lib.train_state_from_params(params, optimizer, mask=mask)
  before = jax.tree_util.tree_map(np.asarray, start.params)
  # No optimizer state for frozen weights: the moments cover exactly the adapters.
  adapter_size = state_lib.param_count(lora.adapters_of(start.params))
  opt_leaves = [x for x in jax.tree_util.tree_leaves(start.opt_state) if x.ndim]
  assert sum(x.size for x in opt_leaves) == 2 * adapter_size
  # The int8 base counts its weights exactly (not its bytes), plus the adapters.
  assert state_lib.param_count(start.params) == state_lib.param_count(base) + adapter_size
  if base_int8:
    frozen = partition.split(start.params, mask)[1]
    kernels = [x for x in jax.tree_util.tree_leaves(frozen, is_leaf=quant.is_qtensor) if quant.is_qtensor(x)]
    assert len(kernels) == 7 and all(k.values.dtype == jnp.int8 for k in kernels)

  train_step = helpers.jit(step_lib.make_train_step(model, optimizer, step_cfg, mask=mask))
  state, losses = start, []
  for _ in range(6):
    state, metrics = train_step(state, _batch(), jax.random.key(7))
    losses.append(float(metrics['loss']))
  assert losses[-1] < losses[0] - 0.1, losses

  after = jax.tree_util.tree_map(np.asarray, state.params)
  (old_adapters, old_base), (new_adapters, new_base) = partition.split(before, mask), partition.split(after, mask)
  for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(old_adapters),
                              jax.tree_util.tree_leaves(new_adapters)):
    assert not np.array_equal(old, new), jax.tree_util.keystr(path)
  for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(old_base), jax.tree_util.tree_leaves(new_base)):
    assert old.dtype == new.dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(_bits(old), _bits(new), err_msg=jax.tree_util.keystr(path))


def _loop_config(workdir):
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny.py'))
  m = cfg.model
  m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim = 32, 2, 4, 2, 64
  cfg.data.seq_len, cfg.data.eval_batches = 32, 1
  t = cfg.train
  t.batch_size, t.steps, t.eval_every, t.log_every, t.checkpoint_every = 8, 3, 100, 1, 0
  t.progress_bar, t.tensorboard, t.num_samples, t.workdir = False, False, 0, str(workdir)
  cfg.lora.enabled, cfg.lora.rank, cfg.lora.base_int8 = True, 4, True  # dropout 0.1, targets q and v (defaults)
  return cfg


@pytest.mark.slow  # heavy end-to-end run: kept out of the 10-minute default suite (pytest -m slow runs it)
def test_training_loop_writes_a_loadable_adapter_and_resumes(tmp_path):
  cfg = _loop_config(tmp_path / 'run')
  base = base_params(cfg.model, seed=2)  # a random base "checkpoint" to fine-tune (no slow model.init compile)
  checkpoint.save_model(str(tmp_path / 'base'), cfg, base)
  cfg.train.init_from = str(tmp_path / 'base')
  summary = loop.train(cfg)
  adapter = os.path.join(cfg.train.workdir, 'adapter')
  assert summary['adapter'] == adapter
  spec, adapters = lora.load_peft(adapter, cfg.model)
  assert (spec.rank, spec.alpha, spec.targets) == (4, 32.0, ('q_proj', 'v_proj'))
  assert float(jnp.abs(adapters['layers']['attention']['v_proj']['lora_b']).max()) > 0  # trained from B = 0
  # The base stayed frozen: the int8 kernels in the final params dequantize to the hand-quantized base.
  expected = _quantized_by_hand(base)['layers']['mlp']['up_proj']['kernel']
  up = summary['params']['layers']['mlp']['up_proj']
  np.testing.assert_allclose(quant.dequantize(up['kernel'], jnp.float32), expected, atol=1e-6)
  # The merged model is a plain checkpoint.
  saved = checkpoint.load_config(summary['checkpoint'])
  assert not saved.lora.enabled
  merged = checkpoint.load_params(summary['checkpoint'], saved.model)
  np.testing.assert_allclose(merged['layers']['mlp']['up_proj']['kernel'], expected, atol=1e-6)  # no adapter there

  # Resume with LoRA on: a longer run continues from the final step-3 checkpoint.
  cfg.train.steps = 4
  again = loop.train(cfg)
  assert again['start_step'] == 3 and again['history'][-1]['step'] == 4
