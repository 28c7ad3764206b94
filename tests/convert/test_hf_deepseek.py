"""DeepseekV2ForCausalLM, DeepseekV3ForCausalLM and Qwen2ForCausalLM interop against transformers itself (CPU,
float32): tiny random models are saved, imported and exported, and logits are compared with the ones transformers
computes; DeepSeek-V3's block-quantized fp8 weights are dequantized on import."""
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from dsjax import checkpoint
from dsjax import config as config_lib
from dsjax.convert import architectures, hf
from tests.convert.test_hf import ATOL, dsjax_logits, hf_logits, imported
from tests.lazy import torch, transformers  # imported on first use (the `hf` extra)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_MLA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=64, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
            moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
            first_k_dense_replace=1, max_position_embeddings=64, initializer_range=0.1)
_QWEN2 = dict(hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
              vocab_size=97, max_position_embeddings=64, rope_theta=100000.0)
# YaRN past its pretraining context: 40-token rows against original_max_position_embeddings 16. mscale differs from
# mscale_all_dim, so both the cos/sin factor and the softmax-scale factor (mscale_all_dim^2) are not 1.
_YARN = dict(rope_type='yarn', rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16, mscale=0.9,
             mscale_all_dim=0.7, beta_fast=16.0, beta_slow=2.0)
VARIANTS = {
    # name: (model_type, config fields)
    'v2_greedy': ('deepseek_v2', dict(_MLA, q_lora_rank=None, topk_method='greedy', n_shared_experts=2)),
    'v2_group_limited': ('deepseek_v2', dict(_MLA, q_lora_rank=24, topk_method='group_limited_greedy', n_group=4,
                                             topk_group=2, routed_scaling_factor=1.5)),
    'v2_yarn': ('deepseek_v2', dict(_MLA, q_lora_rank=24, rope_parameters=_YARN)),
    'v3': ('deepseek_v3', dict(_MLA, num_hidden_layers=3, q_lora_rank=24, n_group=4, topk_group=2,
                               norm_topk_prob=True, routed_scaling_factor=2.5)),
    # mscale_all_dim without mscale: absent YaRN fields take transformers' defaults, not dsjax's base config values.
    'v2_yarn_partial': ('deepseek_v2', dict(_MLA, q_lora_rank=None, rope_parameters=dict(
        rope_type='yarn', rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16, mscale_all_dim=0.7))),
    'qwen2_untied': ('qwen2', dict(_QWEN2, tie_word_embeddings=False)),
    'qwen2_tied': ('qwen2', dict(_QWEN2, tie_word_embeddings=True)),
}
_CLASSES = {'deepseek_v2': ('DeepseekV2Config', 'DeepseekV2ForCausalLM'),
            'deepseek_v3': ('DeepseekV3Config', 'DeepseekV3ForCausalLM'),
            'qwen2': ('Qwen2Config', 'Qwen2ForCausalLM')}


def make_model(variant, directory, seed=0):
  """A random transformers model of `variant` (float32, eager attention), saved to `directory`. Norm scales,
  q/k/v biases and V3's expert-correction bias are random too: an import that dropped them would still pass with
  their default ones and zeros."""
  model_type, fields = VARIANTS[variant]
  config_cls, model_cls = (getattr(transformers, name) for name in _CLASSES[model_type])
  torch.manual_seed(seed)
  model = model_cls(config_cls(attn_implementation='eager', **fields)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith('_proj.bias'):
        p.copy_(0.5 * torch.randn_like(p))
    for name, b in model.named_buffers():
      if name.endswith('e_score_correction_bias'):
        b.copy_(0.1 * torch.randn_like(b))
  model.save_pretrained(directory)
  return model


def tokens_for(variant, shape=(2, 40), seed=1):
  return np.random.default_rng(seed).integers(0, VARIANTS[variant][1]['vocab_size'], shape)


def legacy_rope_scaling(directory):
  """Rewrites config.json's rope as DeepSeek-V2's published config.json has it (transformers 4: rope_theta and
  rope_scaling with 'type')."""
  path = os.path.join(directory, 'config.json')
  with open(path) as f:
    config = json.load(f)
  parameters = config.pop('rope_parameters')
  config['rope_theta'] = parameters.pop('rope_theta')
  parameters.pop('rope_type')
  config['rope_scaling'] = {'type': 'yarn', **parameters}
  with open(path, 'w') as f:
    json.dump(config, f)


@pytest.mark.parametrize('variant', [*(v if v != 'v2_yarn_partial' else pytest.param(v, marks=pytest.mark.slow)
                                      for v in VARIANTS), 'v2_yarn_legacy_config'])
def test_imported_logits_match_transformers(variant, tmp_path):
  legacy = variant == 'v2_yarn_legacy_config'
  variant = 'v2_yarn' if legacy else variant
  model = make_model(variant, tmp_path / 'hf')
  if legacy:
    legacy_rope_scaling(tmp_path / 'hf')
  cfg, params = imported(tmp_path / 'hf', tmp_path / 'ckpt')
  model_type, fields = VARIANTS[variant]
  m = cfg.model
  assert architectures.architecture(m) == model_type
  if model_type == 'qwen2':
    assert m.qkv_bias and m.num_kv_heads == 2 and m.tie_embeddings == fields['tie_word_embeddings']
  else:
    assert m.mla.q_lora_rank == (fields['q_lora_rank'] or 0)
    assert m.moe.topk_method == fields.get('topk_method', 'greedy' if model_type == 'deepseek_v2' else 'noaux_tc')
  if variant == 'v2_yarn':
    assert (m.positions.rope_scaling, m.positions.yarn_original_max_positions) == ('yarn', 16)
    assert (m.positions.yarn_beta_fast, m.positions.yarn_mscale_all_dim) == (16.0, 0.7)
  tokens = tokens_for(variant)
  theirs = hf_logits(model, tokens)
  np.testing.assert_allclose(dsjax_logits(cfg, params, tokens), theirs, atol=ATOL, rtol=ATOL)
  if variant == 'v3':  # the correction bias changes which experts are chosen, so the check above covers it
    with torch.no_grad():
      for name, b in model.named_buffers():
        if name.endswith('e_score_correction_bias'):
          b.zero_()
    assert np.abs(hf_logits(model, tokens) - theirs).max() > 1e-3


SLOW = pytest.mark.slow  # kept out of the default suite for time (pytest -m slow runs them)


@pytest.mark.parametrize('variant', ['v3', pytest.param('qwen2_tied', marks=SLOW)])
def test_packed_rows_match_transformers_per_document(variant, tmp_path):
  """Several documents in one row (positions restarting, segment ids) give each document's logits run alone."""
  model = make_model(variant, tmp_path / 'hf')
  cfg, params = imported(tmp_path / 'hf', tmp_path / 'ckpt')
  docs = [tokens_for(variant, (n,), seed=n) for n in (7, 11, 5)]
  tokens = np.concatenate([*docs, np.zeros(3, np.int64)])[None]
  positions = np.concatenate([*(np.arange(len(d)) for d in docs), np.zeros(3, np.int64)])[None]
  segments = np.concatenate([*(np.full(len(d), i + 1) for i, d in enumerate(docs)), np.zeros(3, np.int64)])[None]
  ours = dsjax_logits(cfg, params, tokens, positions, segments)[0]
  start = 0
  for doc in docs:
    np.testing.assert_allclose(ours[start:start + len(doc)], hf_logits(model, doc[None])[0], atol=ATOL, rtol=ATOL)
    start += len(doc)


@pytest.mark.parametrize('variant', ['v3', 'qwen2_untied', pytest.param('v2_yarn', marks=SLOW)])
def test_export_loads_in_transformers_and_reimports_bit_identical(variant, tmp_path):
  model = make_model(variant, tmp_path / 'hf')
  cfg, params = imported(tmp_path / 'hf', tmp_path / 'ckpt')
  hf.export_hf(str(tmp_path / 'ckpt'), str(tmp_path / 'exported'))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'exported'),
                                                               attn_implementation='eager').eval()
  assert type(reloaded) is type(model)
  tokens = tokens_for(variant, seed=3)
  np.testing.assert_allclose(hf_logits(reloaded, tokens), hf_logits(model, tokens), atol=1e-6, rtol=1e-6)
  _, again = imported(tmp_path / 'exported', tmp_path / 'ckpt2')
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------------------------------------ config.json

# Every config.json field dsjax reads for a DeepseekV3ForCausalLM, and the dsjax `model` field it becomes.
V3_CONFIG_FIELDS = {
    'vocab_size': 'vocab_size', 'hidden_size': 'hidden_size', 'intermediate_size': 'mlp_dim',
    'num_hidden_layers': 'num_layers', 'num_attention_heads': 'num_heads', 'rms_norm_eps': 'norm_eps',
    'max_position_embeddings': 'max_positions', 'tie_word_embeddings': 'tie_embeddings',
    'rope_theta': 'positions.rope_theta', 'rope_scaling.factor': 'positions.rope_scaling_factor',
    'rope_scaling.original_max_position_embeddings': 'positions.yarn_original_max_positions',
    'rope_scaling.beta_fast': 'positions.yarn_beta_fast', 'rope_scaling.beta_slow': 'positions.yarn_beta_slow',
    'rope_scaling.mscale': 'positions.yarn_mscale', 'rope_scaling.mscale_all_dim': 'positions.yarn_mscale_all_dim',
    'kv_lora_rank': 'mla.kv_lora_rank', 'q_lora_rank': 'mla.q_lora_rank', 'qk_nope_head_dim': 'mla.qk_nope_head_dim',
    'qk_rope_head_dim': 'mla.qk_rope_head_dim', 'v_head_dim': 'mla.v_head_dim',
    'n_routed_experts': 'moe.num_experts', 'n_shared_experts': 'moe.num_shared_experts',
    'moe_intermediate_size': 'moe.expert_dim', 'num_experts_per_tok': 'moe.top_k', 'n_group': 'moe.num_groups',
    'topk_group': 'moe.topk_groups', 'norm_topk_prob': 'moe.norm_topk_prob',
    'routed_scaling_factor': 'moe.routed_scaling_factor', 'first_k_dense_replace': 'moe.first_dense_layers',
    'moe_layer_freq': 'moe.layer_freq', 'aux_loss_alpha': 'moe.aux_loss_weight',
}
# dsjax fields that follow from the architecture, not from a config.json value (num_key_value_heads is ignored:
# latent attention gives every head its own key and value; topk_method/scoring_func are implied by DeepseekV3).
V3_DERIVED = {'num_kv_heads': 'num_heads', 'head_dim': 0, 'qkv_bias': False, 'positions.kind': 'rope',
              'positions.rope_scaling': 'yarn', 'attention.kind': 'full', 'moe.scoring': 'sigmoid',
              'moe.topk_method': 'noaux_tc'}


def _get(tree, dotted):
  for key in dotted.split('.'):
    tree = tree[key]
  return tree


def test_config_json_fields_map_onto_dsjax_fields():
  """DeepSeek-V3's published config.json (transformers-4 style), with every number made distinct so a swapped
  mapping cannot pass: each field lands in its dsjax field, and the export writes it back."""
  published = {
      'architectures': ['DeepseekV3ForCausalLM'], 'model_type': 'deepseek_v3', 'attention_bias': False,
      'attention_dropout': 0.0, 'aux_loss_alpha': 0.003, 'bos_token_id': 0, 'eos_token_id': 1, 'ep_size': 1,
      'first_k_dense_replace': 3, 'hidden_act': 'silu', 'hidden_size': 7168, 'initializer_range': 0.02,
      'intermediate_size': 18432, 'kv_lora_rank': 512, 'max_position_embeddings': 163840,
      'moe_intermediate_size': 2048, 'moe_layer_freq': 1, 'n_group': 8, 'n_routed_experts': 256,
      'n_shared_experts': 2, 'norm_topk_prob': True, 'num_attention_heads': 128, 'num_experts_per_tok': 6,
      'num_hidden_layers': 61, 'num_key_value_heads': 128, 'num_nextn_predict_layers': 1, 'pretraining_tp': 1,
      'q_lora_rank': 1536, 'qk_nope_head_dim': 160, 'qk_rope_head_dim': 64, 'v_head_dim': 96,
      'quantization_config': {'activation_scheme': 'dynamic', 'fmt': 'e4m3', 'quant_method': 'fp8',
                              'weight_block_size': [128, 128]},
      'rms_norm_eps': 1e-05, 'rope_scaling': {'beta_fast': 24, 'beta_slow': 3, 'factor': 40, 'mscale': 0.9,
                                              'mscale_all_dim': 0.8, 'original_max_position_embeddings': 4096,
                                              'type': 'yarn'},
      'rope_theta': 50000, 'routed_scaling_factor': 2.5, 'scoring_func': 'sigmoid', 'seq_aux': True,
      'tie_word_embeddings': False, 'topk_group': 4, 'topk_method': 'noaux_tc', 'torch_dtype': 'bfloat16',
      'transformers_version': '4.33.1', 'use_cache': True, 'vocab_size': 129280}
  base = config_lib.load_config(os.path.join(ROOT, 'configs', 'base.py')).model
  m = hf.model_config_from_hf(published, base)
  for source, field in V3_CONFIG_FIELDS.items():
    assert _get(m, field) == _get(published, source), (source, field)
  for field, value in V3_DERIVED.items():
    assert _get(m, field) == (_get(m, value) if value == 'num_heads' else value), field
  exported = hf.hf_config_from_model(m, dtype='bfloat16', bos_token_id=0, eos_token_id=1, pad_token_id=None)
  for source in V3_CONFIG_FIELDS:
    assert _get(exported, source) == _get(published, source), source
  assert (exported['model_type'], exported['scoring_func'], exported['topk_method']) == ('deepseek_v3', 'sigmoid',
                                                                                          'noaux_tc')
  # Qwen2: grouped-query heads from num_key_value_heads, q/k/v biases from the architecture.
  qwen = dict(VARIANTS['qwen2_untied'][1], model_type='qwen2', architectures=['Qwen2ForCausalLM'])
  m = hf.model_config_from_hf(qwen, base)
  assert (m.num_heads, m.num_kv_heads, m.qkv_bias, m.mla.kv_lora_rank, m.moe.num_experts) == (6, 2, True, 0, 0)


# ------------------------------------------------------------------------------------------------ fp8 weights

# A V3 wide enough for 128 x 128 blocks: hidden 136 = one full block + an 8-wide edge.
_FP8_V3 = dict(_MLA, hidden_size=136, intermediate_size=144, moe_intermediate_size=40, num_hidden_layers=3,
               n_routed_experts=4, n_group=2, topk_group=1, q_lora_rank=24, norm_topk_prob=True,
               routed_scaling_factor=2.5)
_FP8_MAX = 448.0  # largest float8_e4m3fn


def _is_quantized(name):
  """The published checkpoint's fp8 tensors: every Linear weight but the router and the head."""
  return name.endswith('_proj.weight') or name.endswith('_proj_with_mqa.weight')


def _quantize(w, block):
  """fp8 blocks and their float32 scales, as DeepSeek-V3's bf16_cast_fp8 makes them: scale = amax / 448."""
  rows, cols = w.shape
  grid = (-(-rows // block[0]), -(-cols // block[1]))
  scale = np.empty(grid, np.float32)
  q = np.empty(w.shape, ml_dtypes.float8_e4m3fn)
  for i in range(grid[0]):
    for j in range(grid[1]):
      part = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
      scale[i, j] = max(np.abs(w[part]).max(), 1e-12) / _FP8_MAX
      q[part] = (w[part] / scale[i, j]).astype(ml_dtypes.float8_e4m3fn)
  return q, scale


def _dequantize(q, scale, block):
  """The reference dequantization: the scales expanded to a full-size matrix (ragged edges cut off)."""
  full = np.kron(scale, np.ones(block, np.float32))[:q.shape[0], :q.shape[1]]
  return q.astype(np.float32) * full


def _to_torch(x):
  if x.dtype == ml_dtypes.float8_e4m3fn:
    return torch.from_numpy(x.view(np.uint8).copy()).view(torch.float8_e4m3fn)
  if x.dtype == ml_dtypes.bfloat16:
    return torch.from_numpy(x.view(np.uint16).copy()).view(torch.bfloat16)
  return torch.from_numpy(np.ascontiguousarray(x))


def fp8_checkpoint(directory, block, config_block=True):
  """A tiny DeepSeek-V3 stored as the published one is: Linear weights float8_e4m3fn with `_scale_inv` block
  scales (all in a second shard, so weight and scale are in different files), the rest bfloat16 except the float32
  correction bias, config.json with torch_dtype bfloat16 and quantization_config. Returns {HF name: the float32
  tensor the checkpoint stands for (dequantized, or bfloat16-rounded)}."""
  torch.manual_seed(0)
  model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**_FP8_V3))
  model.save_pretrained(_float_dir(directory))
  with safe_open(str(_float_dir(directory) / 'model.safetensors'), 'np') as f:
    tensors = {name: f.get_tensor(name) for name in f.keys()}
  rng = np.random.default_rng(0)
  stored, scales, reference = {}, {}, {}
  for name, w in tensors.items():
    if 'norm' in name:
      w = 1.0 + 0.1 * rng.standard_normal(w.shape).astype(np.float32)
    elif name.endswith('e_score_correction_bias'):
      w = 0.1 * rng.standard_normal(w.shape).astype(np.float32)
    elif _is_quantized(name):
      w = w * np.exp(rng.standard_normal((w.shape[0], 1))).astype(np.float32)  # rows of unequal size: scales vary
    if _is_quantized(name):
      stored[name], scales[name + '_scale_inv'] = _quantize(w, block)
      reference[name] = _dequantize(stored[name], scales[name + '_scale_inv'], block)
    elif name.endswith('e_score_correction_bias'):
      stored[name] = reference[name] = w
    else:
      stored[name] = w.astype(ml_dtypes.bfloat16)
      reference[name] = stored[name].astype(np.float32)
  config = json.loads((_float_dir(directory) / 'config.json').read_text())
  config.update(torch_dtype='bfloat16', dtype='bfloat16', quantization_config={
      'activation_scheme': 'dynamic', 'fmt': 'e4m3', 'quant_method': 'fp8',
      **({'weight_block_size': list(block)} if config_block else {})})
  _write(directory, stored, scales, config)
  return reference


def _float_dir(directory):
  return directory.parent / (directory.name + '_float')


def _write(directory, weights, scales, config):
  """The weights in shard 1, the scales in shard 2, the index, config.json."""
  from safetensors.torch import save_file
  directory.mkdir(exist_ok=True)
  shards = {'model-00001-of-00002.safetensors': weights, 'model-00002-of-00002.safetensors': scales}
  for file, part in shards.items():
    save_file({k: _to_torch(v) for k, v in part.items()}, str(directory / file), metadata={'format': 'pt'})
  with open(directory / hf.INDEX_FILE, 'w') as f:
    json.dump({'metadata': {}, 'weight_map': {k: file for file, part in shards.items() for k in part}}, f)
  (directory / 'config.json').write_text(json.dumps(config))


@pytest.mark.parametrize('block, config_block', [
    ((128, 128), True), ((32, 16), True), pytest.param((128, 128), False, marks=SLOW),
], ids=['128x128', '32x16_rows_by_columns', 'default_128x128'])
def test_fp8_block_quantized_v3_imports_dequantized(block, config_block, tmp_path):
  reference = fp8_checkpoint(tmp_path / 'hf', block, config_block)
  with safe_open(str(tmp_path / 'hf' / 'model-00001-of-00002.safetensors'), 'np') as f:
    assert f.get_slice('model.layers.2.mlp.experts.3.down_proj.weight').get_dtype() == 'F8_E4M3'
  assert reference['model.layers.0.mlp.gate_proj.weight'].shape == (144, 136)  # ragged blocks on both axes
  cfg, params = imported(tmp_path / 'hf', tmp_path / 'ckpt')
  checked = 0
  for t in architectures.tensor_maps(cfg.model):  # every parameter equals the reference dequantization
    value = np.asarray(_get(params, '.'.join(t.path)))
    rows = value.reshape(-1, *value.shape[len(t.lead):])
    for row, name in enumerate(t.names()):
      np.testing.assert_array_equal(rows[row], t.to_dsjax(reference[name]), err_msg=name)
      checked += _is_quantized(name)
  assert checked == sum(map(_is_quantized, reference))
  model = transformers.DeepseekV3ForCausalLM.from_pretrained(str(_float_dir(tmp_path / 'hf')),
                                                             attn_implementation='eager').eval()
  model.load_state_dict({**model.state_dict(), **_fused(reference, model)})
  tokens = np.random.default_rng(1).integers(0, 64, (2, 24))
  np.testing.assert_allclose(dsjax_logits(cfg, params, tokens), hf_logits(model, tokens), atol=ATOL, rtol=ATOL)


def _fused(tensors, model):
  """A checkpoint's per-expert tensors as transformers 5 holds them: experts.gate_up_proj [E, 2F, D] and
  experts.down_proj [E, D, F] per layer; other tensors by name."""
  out = {}
  for name in model.state_dict():
    if name in tensors:
      out[name] = torch.from_numpy(tensors[name])
    elif name.endswith('experts.gate_up_proj') or name.endswith('experts.down_proj'):
      prefix, experts = name.rsplit('.', 1)[0], model.config.n_routed_experts
      parts = ['gate_proj', 'up_proj'] if name.endswith('gate_up_proj') else ['down_proj']
      out[name] = torch.from_numpy(np.stack([
          np.concatenate([tensors[f'{prefix}.{e}.{part}.weight'] for part in parts]) for e in range(experts)]))
  return out


@pytest.fixture(scope='module')
def fp8_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp('fp8') / 'hf'
  fp8_checkpoint(directory, (32, 16))
  return directory


def _read_shard(path):
  with safe_open(str(path), 'np') as f:
    return {name: hf._read_raw(str(path), name, hf._FP8_DTYPES[f.get_slice(name).get_dtype()])
            if f.get_slice(name).get_dtype() in hf._FP8_DTYPES else f.get_tensor(name) for name in f.keys()}


_O_PROJ = 'model.layers.1.self_attn.o_proj.weight'


@pytest.mark.parametrize('scales, config, fragment', [
    ({}, {'quantization_config': {'quant_method': 'fp8', 'weight_block_size': [16, 16]}}, 'weight_block_size'),
    ({}, {'quantization_config': {'quant_method': 'gptq', 'bits': 4}}, "quant_method='gptq'"),
    ({'model.norm.weight_scale_inv': np.ones((1, 1), np.float32)}, {}, 'is stored as bfloat16, not fp8'),
    ({_O_PROJ + '_scale_inv': None}, {}, f'{_O_PROJ}: stored as float8_e4m3fn without the {_O_PROJ}_scale_inv'),
], ids=['scale_shape_vs_block_size', 'other_quantization', 'scale_of_a_bf16_tensor', 'fp8_without_scale'])
def test_inconsistent_fp8_checkpoints_name_the_problem(scales, config, fragment, fp8_dir, tmp_path):
  weights = _read_shard(fp8_dir / 'model-00001-of-00002.safetensors')
  edited = {**_read_shard(fp8_dir / 'model-00002-of-00002.safetensors'), **scales}
  hf_config = {**json.loads((fp8_dir / 'config.json').read_text()), **config}
  _write(tmp_path / 'hf', weights, {k: v for k, v in edited.items() if v is not None}, hf_config)
  with pytest.raises(hf.ConversionError, match=fragment):
    hf.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'ckpt'))


def test_transformers_bfloat16_checkpoint_keeps_float32_router(tmp_path):
  """transformers keeps DeepSeek routers in float32 in a bfloat16 model (and the published V3 stores its correction
  bias so): config.json's torch_dtype bfloat16 does not make those tensors a dtype mismatch."""
  make_model('v3', tmp_path / 'hf')
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'hf'), dtype=torch.bfloat16,
                                                            attn_implementation='eager').eval()
  model.save_pretrained(tmp_path / 'bf16')
  with safe_open(str(tmp_path / 'bf16' / 'model.safetensors'), 'np') as f:
    dtypes = {f.get_slice(name).get_dtype() for name in ('model.layers.1.mlp.gate.weight',
                                                          'model.layers.1.mlp.gate.e_score_correction_bias')}
    assert dtypes == {'F32'} and f.get_slice('model.embed_tokens.weight').get_dtype() == 'BF16'
  cfg, params = imported(tmp_path / 'bf16', tmp_path / 'ckpt')
  tokens = tokens_for('v3')
  np.testing.assert_allclose(dsjax_logits(cfg, params, tokens), hf_logits(model.float(), tokens), atol=ATOL,
                             rtol=ATOL)


@pytest.mark.parametrize('variant, edit, fragment', [
    ('v2_greedy', dict(norm_topk_prob=True), 'norm_topk_prob'),  # transformers' V2 router ignores it
    ('v3', dict(rope_interleave=False), 'rope_interleave'),
])
def test_deepseek_configs_dsjax_cannot_match_name_the_field(variant, edit, fragment, tmp_path):
  make_model(variant, tmp_path / 'hf')
  path = tmp_path / 'hf' / 'config.json'
  config = json.loads(path.read_text())
  config.update(edit)
  path.write_text(json.dumps(config))
  with pytest.raises(hf.ConversionError, match=fragment):
    hf.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'ckpt'))
