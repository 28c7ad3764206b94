"""Config helpers: load a `configs/*.py` file and validate a ConfigDict with errors that name the field.

The schema is `configs/base.py`: every field lives there with its default. Configs are locked after loading, so
assigning a field that does not exist raises at once instead of being silently ignored.
"""
from __future__ import annotations

import importlib.util
import os

import jax.numpy as jnp
import ml_collections

ATTENTION_KINDS = ('full', 'sparse', 'routed')
ATTENTION_IMPLS = ('reference',)
POSITION_KINDS = ('rope', 'xl')
REMAT_POLICIES = ('none', 'full', 'dots')
DTYPES = ('float32', 'bfloat16', 'float16')


class ConfigError(ValueError):
  """A config value (or what it points to: a file, a data source) that cannot work. Its message names the field."""


def load_config(path: str) -> ml_collections.ConfigDict:
  """Loads `get_config()` from a Python config file (as `--config=path` does) and validates it."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file not found: {path}')
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  validate(cfg)
  cfg.lock()
  return cfg


def _fail(field: str, value, why: str) -> None:
  raise ConfigError(f'config.{field}={value!r}: {why}')


def _check_choice(cfg: ml_collections.ConfigDict, field: str, choices) -> None:
  value = _get(cfg, field)
  if value not in choices:
    _fail(field, value, f'must be one of {", ".join(map(str, choices))}')


def _check_positive(cfg: ml_collections.ConfigDict, field: str, allow_zero: bool = False) -> None:
  value = _get(cfg, field)
  if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (value == 0 and not allow_zero):
    _fail(field, value, 'must be >= 0' if allow_zero else 'must be > 0')


def _get(cfg: ml_collections.ConfigDict, field: str):
  node = cfg
  for part in field.split('.'):
    node = node[part]
  return node


def head_dim(model_cfg: ml_collections.ConfigDict) -> int:
  """The per-head size: `head_dim` if set, else hidden_size // num_heads."""
  return model_cfg.head_dim or model_cfg.hidden_size // model_cfg.num_heads


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (a ValueError) naming the first field whose value is impossible."""
  for field in ('model.vocab_size', 'model.hidden_size', 'model.num_layers', 'model.num_heads',
                'model.num_kv_heads', 'model.mlp_dim', 'model.norm_eps', 'model.max_positions',
                'model.init_std', 'model.positions.rope_theta', 'model.positions.rope_scaling_factor',
                'model.attention.window', 'model.attention.top_k', 'data.seq_len', 'data.eval_batches',
                'train.steps', 'train.batch_size', 'train.log_every', 'train.eval_every', 'optim.learning_rate',
                'sample.max_new_tokens'):
    _check_positive(cfg, field)
  for field in ('model.head_dim', 'model.dropout_rate', 'model.positions.mem_len', 'model.attention.num_global',
                'model.attention.num_shared_heads', 'model.attention.router_aux_weight', 'optim.warmup_steps',
                'optim.min_lr_ratio', 'optim.weight_decay', 'optim.clip_norm', 'optim.eps',
                'train.z_loss_weight', 'train.num_samples', 'sample.temperature', 'sample.top_k'):
    _check_positive(cfg, field, allow_zero=True)
  _check_choice(cfg, 'model.dtype', DTYPES)
  _check_choice(cfg, 'model.param_dtype', DTYPES)
  _check_choice(cfg, 'model.remat', REMAT_POLICIES)
  _check_choice(cfg, 'model.positions.kind', POSITION_KINDS)
  _check_choice(cfg, 'model.attention.kind', ATTENTION_KINDS)
  _check_choice(cfg, 'model.attention.impl', ATTENTION_IMPLS)

  m = cfg.model
  if m.hidden_size % m.num_heads and not m.head_dim:
    _fail('model.num_heads', m.num_heads, f'must divide model.hidden_size={m.hidden_size} (or set model.head_dim)')
  if m.num_heads % m.num_kv_heads:
    _fail('model.num_kv_heads', m.num_kv_heads, f'must divide model.num_heads={m.num_heads}')
  if head_dim(m) % 2:
    _fail('model.head_dim', head_dim(m), 'must be even (rotary embeddings rotate pairs of dimensions)')
  if m.dropout_rate >= 1:
    _fail('model.dropout_rate', m.dropout_rate, 'must be < 1')
  if m.positions.mem_len and m.positions.kind != 'xl':
    _fail('model.positions.mem_len', m.positions.mem_len, "segment memory needs model.positions.kind='xl'")
  if m.positions.kind == 'xl' and m.hidden_size % 2:
    _fail('model.hidden_size', m.hidden_size, 'must be even for the sinusoidal relative encoding')
  a = m.attention
  if a.kind == 'routed':
    routed = m.num_heads - a.num_shared_heads
    if routed < 1:
      _fail('model.attention.num_shared_heads', a.num_shared_heads,
            f'must be < model.num_heads={m.num_heads} so that some heads are routed')
    if a.top_k > routed:
      _fail('model.attention.top_k', a.top_k, f'must be <= the {routed} routed heads')
  if cfg.data.seq_len > m.max_positions and m.positions.kind == 'rope':
    _fail('data.seq_len', cfg.data.seq_len, f'exceeds model.max_positions={m.max_positions}')
  if cfg.optim.min_lr_ratio > 1:
    _fail('optim.min_lr_ratio', cfg.optim.min_lr_ratio, 'must be <= 1')
  if not 0 < cfg.data.validation_fraction < 1:
    _fail('data.validation_fraction', cfg.data.validation_fraction, 'must be in (0, 1)')
  if cfg.data.tokenizer != 'byte' and not os.path.isfile(cfg.data.tokenizer):
    _fail('data.tokenizer', cfg.data.tokenizer, "must be 'byte' or the path of a tokenizer.json file")


def dtype(name: str) -> jnp.dtype:
  """Maps a config dtype name ('bfloat16', ...) to a jnp dtype."""
  return jnp.dtype(name)
