"""Config helpers: load a `configs/*.py` file and validate a ConfigDict with errors that name the field.

The schema is `configs/base.py`: every field lives there with its default. Configs are locked after loading, so
assigning a field that does not exist raises at once instead of being silently ignored.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import jax.numpy as jnp
import ml_collections

ATTENTION_KINDS = ('full', 'sparse', 'routed')
ATTENTION_IMPLS = ('auto', 'reference', 'pallas', 'cudnn')  # see dsjax/model/dispatch.py
ATTENTION_PLATFORMS = ('', 'cpu', 'gpu', 'tpu')
POSITION_KINDS = ('rope', 'xl')
REMAT_POLICIES = ('none', 'full', 'dots')
ROPE_SCALINGS = ('linear', 'yarn')
MOE_SCORINGS = ('softmax', 'sigmoid')
MOE_TOPK_METHODS = ('greedy', 'group_limited_greedy', 'noaux_tc')
DTYPES = ('float32', 'bfloat16', 'float16')


class ConfigError(ValueError):
  """A config value (or what it points to: a file, a data source) that cannot work. Its message names the field."""


def import_config_file(path: str, module_prefix: str = ''):
  """Imports a Python config (or study) file as a module. Config files import their parents as a package
  (`from configs import base`): the directory that holds the outermost package around the file goes on sys.path,
  as running a script from the repo root would."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file not found: {path}')
  root = os.path.dirname(os.path.abspath(path))
  while os.path.isfile(os.path.join(root, '__init__.py')):
    root = os.path.dirname(root)
  if root not in sys.path:
    sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location(module_prefix + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(path: str) -> ml_collections.ConfigDict:
  """Loads `get_config()` from a Python config file (as `--config=path` does) and validates it."""
  cfg = import_config_file(path).get_config()
  validate(cfg)
  cfg.lock()
  return cfg


def fail(field: str, value, why: str) -> None:
  raise ConfigError(f'config.{field}={value!r}: {why}')


def check_choice(cfg: ml_collections.ConfigDict, field: str, choices, prefix: str = '') -> None:
  value = _get(cfg, field)
  if value not in choices:
    fail(prefix + '.' + field if prefix else field, value, f'must be one of {", ".join(map(str, choices))}')


def _check_positive(cfg: ml_collections.ConfigDict, field: str, allow_zero: bool = False, prefix: str = '') -> None:
  value = _get(cfg, field)
  if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (value == 0 and not allow_zero):
    fail(prefix + '.' + field if prefix else field, value, 'must be >= 0' if allow_zero else 'must be > 0')


def _get(cfg: ml_collections.ConfigDict, field: str):
  node = cfg
  for part in field.split('.'):
    node = node[part]
  return node


def head_dim(model_cfg: ml_collections.ConfigDict) -> int:
  """The per-head size: `head_dim` if set, else hidden_size // num_heads."""
  return model_cfg.head_dim or model_cfg.hidden_size // model_cfg.num_heads


def validate_model(m: ml_collections.ConfigDict, prefix: str = 'model') -> None:
  """Raises ConfigError naming the first impossible field of the `model` section (also used by Transformer)."""
  def check_positive(field, allow_zero=False):
    _check_positive(m, field, allow_zero, prefix)

  for field in ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'num_kv_heads', 'mlp_dim', 'norm_eps',
                'max_positions', 'init_std', 'positions.rope_theta', 'positions.rope_scaling_factor',
                'attention.window', 'attention.top_k'):
    check_positive(field)
  for field in ('head_dim', 'dropout_rate', 'positions.mem_len', 'attention.num_global',
                'attention.num_shared_heads', 'attention.router_aux_weight'):
    check_positive(field, allow_zero=True)
  for field in ('positions.yarn_original_max_positions', 'positions.yarn_beta_fast', 'positions.yarn_beta_slow'):
    check_positive(field)
  for field in ('positions.yarn_mscale', 'positions.yarn_mscale_all_dim', 'mla.kv_lora_rank', 'mla.q_lora_rank',
                'moe.num_experts', 'moe.num_shared_experts', 'moe.first_dense_layers', 'moe.aux_loss_weight',
                'moe.bias_update_rate', 'mtp.num_layers', 'mtp.loss_weight'):
    check_positive(field, allow_zero=True)
  for field, choices in (('dtype', DTYPES), ('param_dtype', DTYPES), ('remat', REMAT_POLICIES),
                         ('positions.kind', POSITION_KINDS), ('attention.kind', ATTENTION_KINDS),
                         ('positions.rope_scaling', ROPE_SCALINGS), ('moe.scoring', MOE_SCORINGS),
                         ('moe.topk_method', MOE_TOPK_METHODS),
                         ('attention.impl', ATTENTION_IMPLS), ('attention.platform', ATTENTION_PLATFORMS)):
    check_choice(m, field, choices, prefix)

  def fail_model(field, why):
    fail(f'{prefix}.{field}', _get(m, field), why)

  if m.hidden_size % m.num_heads and not m.head_dim:
    fail_model('num_heads', f'must divide {prefix}.hidden_size={m.hidden_size} (or set {prefix}.head_dim)')
  if m.num_heads % m.num_kv_heads:
    fail_model('num_kv_heads', f'must divide {prefix}.num_heads={m.num_heads}')
  if head_dim(m) % 2 and m.positions.kind == 'rope':
    fail_model('head_dim', 'must be even (rotary embeddings rotate pairs of dimensions)')
  if m.dropout_rate >= 1:
    fail_model('dropout_rate', 'must be < 1')
  if m.positions.mem_len and m.positions.kind != 'xl':
    fail_model('positions.mem_len', f"segment memory needs {prefix}.positions.kind='xl'")
  if m.positions.kind == 'xl' and m.hidden_size % 2:
    fail_model('hidden_size', 'must be even for the sinusoidal relative encoding')
  a = m.attention
  if a.impl in ('pallas', 'cudnn') and m.positions.kind != 'rope':
    fail_model('attention.impl', f"the {a.impl} kernels need {prefix}.positions.kind='rope' (xl adds relative-position "
         'scores and memory, which only the reference implements; impl=auto picks it)')
  if a.impl == 'cudnn':  # what cuDNN can never express for this model (per-call limits: dsjax/model/dispatch.py)
    limits = []
    if a.kind == 'routed':
      limits.append('routed heads')
    if a.kind == 'sparse' and a.num_global:
      limits.append(f'global tokens ({prefix}.attention.num_global={a.num_global})')
    if m.dtype not in ('bfloat16', 'float16'):
      limits.append(f'{prefix}.dtype={m.dtype} (it takes bfloat16 or float16)')
    if limits:
      fail_model('attention.impl', f'cuDNN cannot express {"; ".join(limits)}; impl=auto uses the Pallas kernels there')
  if a.kind == 'routed':
    routed = m.num_heads - a.num_shared_heads
    if routed < 1:
      fail_model('attention.num_shared_heads',
                 f'must be < {prefix}.num_heads={m.num_heads} so that some heads are routed')
    if a.top_k > routed:
      fail_model('attention.top_k', f'must be <= the {routed} routed heads')
  _validate_mla(m, fail_model)
  _validate_moe(m, fail_model)


def _validate_mla(m: ml_collections.ConfigDict, fail_model) -> None:
  la = m.mla
  if not la.kv_lora_rank:
    if la.q_lora_rank:
      fail_model('mla.q_lora_rank', 'query compression is part of latent attention: set mla.kv_lora_rank too')
    return
  for field in ('qk_nope_head_dim', 'qk_rope_head_dim', 'v_head_dim'):
    if not isinstance(la[field], int) or la[field] < 1:
      fail_model(f'mla.{field}', 'must be > 0 with latent attention (mla.kv_lora_rank > 0)')
  if la.qk_rope_head_dim % 2:
    fail_model('mla.qk_rope_head_dim', 'must be even (rotary embeddings rotate pairs of dimensions)')
  if m.positions.kind != 'rope':
    fail_model('positions.kind', "latent attention uses decoupled RoPE: set positions.kind='rope'")
  if m.attention.kind == 'routed':
    fail_model('attention.kind', 'routed heads are not defined for latent attention; use full or sparse')
  if m.qkv_bias:
    fail_model('qkv_bias', 'latent attention has no q/k/v projections to put biases on')


def _validate_moe(m: ml_collections.ConfigDict, fail_model) -> None:
  mo = m.moe
  if not mo.num_experts:
    return
  for field in ('expert_dim', 'top_k', 'num_groups', 'topk_groups', 'layer_freq', 'routed_scaling_factor'):
    if not isinstance(mo[field], (int, float)) or mo[field] <= 0:
      fail_model(f'moe.{field}', 'must be > 0 with routed experts (moe.num_experts > 0)')
  if mo.top_k > mo.num_experts:
    fail_model('moe.top_k', f'must be <= moe.num_experts={mo.num_experts}')
  if mo.num_experts % mo.num_groups:
    fail_model('moe.num_groups', f'must divide moe.num_experts={mo.num_experts}')
  if mo.topk_groups > mo.num_groups:
    fail_model('moe.topk_groups', f'must be <= moe.num_groups={mo.num_groups}')
  if mo.topk_method != 'greedy' and mo.top_k > mo.topk_groups * (mo.num_experts // mo.num_groups):
    fail_model('moe.top_k', f'must be <= the {mo.topk_groups * (mo.num_experts // mo.num_groups)} experts of '
               'the groups a token may use (moe.topk_groups x experts per group)')
  if mo.topk_method == 'noaux_tc' and mo.scoring != 'sigmoid':
    fail_model('moe.topk_method', "noaux_tc (DeepSeek-V3) scores experts with moe.scoring='sigmoid'")
  if mo.bias_update_rate and mo.topk_method != 'noaux_tc':
    fail_model('moe.bias_update_rate', "the correction bias exists with moe.topk_method='noaux_tc' only")
  if mo.layer_freq != 1:
    fail_model('moe.layer_freq', 'only 1 is supported (every layer after moe.first_dense_layers is MoE, as in '
               'every published DeepSeek-V2/V3 model)')
  if mo.first_dense_layers >= m.num_layers:
    fail_model('moe.first_dense_layers', f'must be < model.num_layers={m.num_layers} (else set moe.num_experts=0)')


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (a ValueError) naming the first field whose value is impossible."""
  validate_model(cfg.model)
  for field in ('data.seq_len', 'data.eval_batches', 'train.steps', 'train.batch_size', 'train.log_every',
                'train.eval_every', 'optim.learning_rate', 'sample.max_new_tokens', 'train.grad_accum_steps',
                'train.max_nonfinite_steps'):
    _check_positive(cfg, field)
  for field in ('optim.warmup_steps', 'optim.min_lr_ratio', 'optim.weight_decay', 'optim.clip_norm', 'optim.eps',
                'train.z_loss_weight', 'train.num_samples', 'sample.temperature', 'sample.top_k', 'data.num_shards',
                'train.checkpoint_every', 'train.keep_checkpoints', 'train.keep_best', 'train.peak_flops_per_device'):
    _check_positive(cfg, field, allow_zero=True)
  if cfg.train.batch_size % cfg.train.grad_accum_steps:
    fail('train.grad_accum_steps', cfg.train.grad_accum_steps,
          f'must divide train.batch_size={cfg.train.batch_size}')
  if cfg.data.num_shards and cfg.train.batch_size % cfg.data.num_shards:
    fail('data.num_shards', cfg.data.num_shards, f'must divide train.batch_size={cfg.train.batch_size}')
  if cfg.data.seq_len > cfg.model.max_positions and cfg.model.positions.kind == 'rope':
    fail('data.seq_len', cfg.data.seq_len, f'exceeds model.max_positions={cfg.model.max_positions}')
  if not 0 < cfg.sample.top_p <= 1:
    fail('sample.top_p', cfg.sample.top_p, 'must be in (0, 1]')
  if cfg.optim.min_lr_ratio > 1:
    fail('optim.min_lr_ratio', cfg.optim.min_lr_ratio, 'must be <= 1')
  if not 0 < cfg.data.validation_fraction < 1:
    fail('data.validation_fraction', cfg.data.validation_fraction, 'must be in (0, 1)')
  if cfg.train.init_from and not os.path.isdir(cfg.train.init_from):
    fail('train.init_from', cfg.train.init_from, 'must be a dsjax checkpoint directory')
  if cfg.data.tokenizer != 'byte' and not os.path.exists(cfg.data.tokenizer):
    fail('data.tokenizer', cfg.data.tokenizer, "must be 'byte' or the path of a tokenizer.json file")
  if 'distill' in cfg:
    _check_positive(cfg, 'distill.temperature')
    for field in ('distill.kl_weight', 'distill.hard_weight', 'distill.top_k'):
      _check_positive(cfg, field, allow_zero=True)
  if 'privacy' in cfg:
    _check_positive(cfg, 'privacy.l2_clip')
    _check_positive(cfg, 'privacy.noise_multiplier', allow_zero=True)
    if not 0 < cfg.privacy.delta < 1:
      fail('privacy.delta', cfg.privacy.delta, 'must be in (0, 1)')
  if 'quant' in cfg:
    check_choice(cfg, 'quant.mode', ('none', 'int8', 'int4'))
    _check_positive(cfg, 'quant.group_size')


def dtype(name: str) -> jnp.dtype:
  """Maps a config dtype name ('bfloat16', ...) to a jnp dtype."""
  return jnp.dtype(name)
