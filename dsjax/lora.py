"""LoRA: low-rank adapters on chosen projections of a frozen (optionally int8) base, merging, PEFT files.

Adapters attach from outside the model: `LoraModel(Transformer(cfg.model), spec)` runs the model under a flax
method interceptor that adds alpha / r * dropout(x) @ A @ B to the output of every `Linear` named in
`spec.targets`, with A = `lora_a` [in..., r] and B = `lora_b` [r, out...] created in that Linear's own scope (next
to its kernel, stacked over layers like it). Routed experts (targets 'experts.gate_proj' / 'experts.up_proj' /
'experts.down_proj') get per-expert adapters A [E, in, r], B [E, r, out] under experts/<proj>_lora, added inside the
grouped matmul: the interceptor wraps `Experts.weight` (dsjax/model/moe.py), the one place the experts' weights are
read, and returns the weight wrapped as an `AdaptedExperts` (a grouped weight: moe.grouped_matmul multiplies by it).
No model module has a LoRA field. The multi-token-prediction depths (mtp_*) get no adapters (PEFT and transformers
know no MTP module; their loss still trains the main stack's adapters). The base stays frozen because the train step
differentiates only the adapters (dsjax/train/partition.py); with `base_int8` its projection kernels and routed
experts are int8 `dsjax.quant.QTensor`s (per output channel), the same quantized type serving uses.

  spec_from_config(cfg.lora) / spec_for_run(cfg)  the LoraSpec, validated (errors name the config.lora field)
  LoraModel(model, spec)               the model with adapters (init / apply like a flax module)
  add_adapters(base, model_cfg, spec)  plain params -> params of the LoraModel (fresh or given adapters; int8 base)
  is_adapter(path)                     True for lora_a / lora_b, the params a LoRA run trains
  merge(params, spec)                  -> plain params, kernel + alpha / r * A @ B (loads into Transformer(cfg.model))
  save_peft / load_peft                adapter_config.json + adapter_model.safetensors as Hugging Face PEFT writes
                                       them for a LlamaForCausalLM / Qwen2 / DeepseekV2 / DeepseekV3 model, so
                                       `peft.PeftModel.from_pretrained` loads them (see `save_peft` for routed experts)
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from typing import Any, Sequence

from absl import logging
import flax
from flax import linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors import safe_open

from dsjax import config as config_lib
from dsjax import files
from dsjax import quant
from dsjax.model import Transformer
from dsjax.model import layout
from dsjax.model import moe as moe_lib
from dsjax.model.layers import Linear, split_equation
from dsjax.model.mla import UpProjection
from dsjax.model.transformer import MTP_PREFIX, moe_layers

__all__ = ['LoraSpec', 'LoraModel', 'AdaptedExperts', 'TARGETS', 'LATENT_TARGETS', 'EXPERT_TARGETS', 'ALL_TARGETS',
           'spec_from_config', 'spec_for_run', 'add_adapters', 'init_adapters', 'adapters_of', 'is_adapter', 'merge',
           'merge_peft', 'save_peft', 'load_peft', 'quantize_base']

# dsjax projection name -> (dsjax module inside a layer, Hugging Face decoder-layer module). The MLP names are the
# dense MLP's projections, and in DeepSeekMoE layers the shared experts' (mlp/shared_experts/<name>,
# HF mlp.shared_experts.<name>).
TARGETS = {
    'q_proj': ('attention', 'self_attn'), 'k_proj': ('attention', 'self_attn'),
    'v_proj': ('attention', 'self_attn'), 'o_proj': ('attention', 'self_attn'),
    'gate_proj': ('mlp', 'mlp'), 'up_proj': ('mlp', 'mlp'), 'down_proj': ('mlp', 'mlp'),
}
# Latent attention (dsjax/model/mla.py; its q_proj and o_proj are in TARGETS).
LATENT_TARGETS = {name: ('attention', 'self_attn') for name in
                  ('q_a_proj', 'q_b_proj', 'kv_a_proj_with_mqa', 'kv_b_proj')}
# Routed experts: per-expert adapters (HF mlp.experts.{e}.<proj>).
EXPERT_PREFIX = 'experts.'
EXPERT_TARGETS = {EXPERT_PREFIX + name: ('mlp', 'mlp') for name in ('gate_proj', 'up_proj', 'down_proj')}
ALL_TARGETS = {**TARGETS, **LATENT_TARGETS, **EXPERT_TARGETS}
ADAPTER_PARAMS = ('lora_a', 'lora_b')
EXPERT_ADAPTER_SUFFIX = '_lora'  # experts/<proj>_lora/{lora_a, lora_b}
ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_WEIGHTS = 'adapter_model.safetensors'
_PEFT_PREFIX = 'base_model.model.model.layers.'
_MLP = ('gate_proj', 'up_proj', 'down_proj')


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Low-rank adapters: every projection named in `targets` gets y += alpha / rank * dropout(x) @ A @ B; all
  projection kernels are frozen (int8 with `base_int8`)."""
  rank: int = 16
  alpha: float = 32.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ('q_proj', 'v_proj')  # names of ALL_TARGETS, in its order
  base_int8: bool = False

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


class AdapterError(ValueError):
  """A PEFT adapter directory that does not fit the model; the message names the file and field or tensor."""


# ------------------------------------------------------------------------------------------------ spec

def _targets(value: Any, field: str) -> tuple[str, ...]:
  names = [t.strip() for t in value.split(',')] if isinstance(value, str) else list(value or ())
  unknown = [t for t in names if t not in ALL_TARGETS]
  if not names or unknown:
    raise config_lib.ConfigError(f'{field}={value!r}: ' + (f'unknown {unknown}, ' if unknown else 'empty, ') +
                                 f'expected a non-empty subset of {list(ALL_TARGETS)}')
  return tuple(t for t in ALL_TARGETS if t in names)  # canonical order, no duplicates


def spec_from_config(lora_cfg: ml_collections.ConfigDict) -> LoraSpec:
  """The LoraSpec of the `lora` config section; impossible values raise ConfigError naming config.lora.<field>."""
  if int(lora_cfg.rank) < 1 or int(lora_cfg.rank) != lora_cfg.rank:
    raise config_lib.ConfigError(f'config.lora.rank={lora_cfg.rank!r}: must be a positive integer')
  if not float(lora_cfg.alpha) > 0:
    raise config_lib.ConfigError(f'config.lora.alpha={lora_cfg.alpha!r}: must be > 0')
  if not 0.0 <= float(lora_cfg.dropout) < 1.0:
    raise config_lib.ConfigError(f'config.lora.dropout={lora_cfg.dropout!r}: must be in [0, 1)')
  return LoraSpec(rank=int(lora_cfg.rank), alpha=float(lora_cfg.alpha), dropout=float(lora_cfg.dropout),
                  targets=_targets(lora_cfg.targets, 'config.lora.targets'), base_int8=bool(lora_cfg.base_int8))


def spec_for_run(cfg: ml_collections.ConfigDict) -> LoraSpec | None:
  """None unless `lora.enabled`. With `lora.adapter`, its adapter_config.json gives rank, alpha and targets (the
  config's dropout and base_int8 still apply)."""
  if not cfg.lora.enabled:
    return None
  spec = spec_from_config(cfg.lora)
  if cfg.lora.adapter:
    try:
      saved = read_peft_config(cfg.lora.adapter)
    except (AdapterError, FileNotFoundError) as e:
      raise config_lib.ConfigError(f'config.lora.adapter={cfg.lora.adapter!r}: {e}') from e
    spec = dataclasses.replace(spec, rank=saved.rank, alpha=saved.alpha, targets=saved.targets)
  return spec


# ------------------------------------------------------------------------------------------------ model

def _adapter_output(module: Linear, x: jax.Array, spec: LoraSpec, deterministic: bool) -> jax.Array:
  """alpha / r * einsum(dropout(x), A [in..., r], B [r, out...]) in the Linear's dtype, its params created in the
  Linear's scope: lora_b starts at zero, lora_a kaiming-uniform (a=sqrt(5)), as PEFT initialises them."""
  x_sub, k_sub, out_sub, num_in = split_equation(module.equation)
  in_letters, out_letters = k_sub[:num_in], k_sub[num_in:]
  rest = ''.join(c for c in x_sub if c not in in_letters)
  r = spec.rank
  bound = 1.0 / math.sqrt(math.prod(module.shape[:num_in]))

  def init_a(rng, shape, dtype):
    return jax.random.uniform(rng, shape, dtype, -bound, bound)

  a = module.param('lora_a', nn.with_logical_partitioning(init_a, (*module.axes[:num_in], None)),
                   (*module.shape[:num_in], r), module.param_dtype)
  b = module.param('lora_b', nn.with_logical_partitioning(nn.initializers.zeros, (None, *module.axes[num_in:])),
                   (r, *module.shape[num_in:]), module.param_dtype)
  x = nn.Dropout(spec.dropout)(x, deterministic=deterministic)  # a submodule of the Linear (its dropout rng)
  h = jnp.einsum(f'{x_sub},{in_letters}r->{rest}r', x.astype(module.dtype), a.astype(module.dtype))
  y = jnp.einsum(f'{rest}r,r{out_letters}->{out_sub}', h, b.astype(module.dtype),
                 preferred_element_type=module.preferred_element_type)
  return y * jnp.asarray(spec.alpha / r, y.dtype)


def _absorbed_adapter(module: UpProjection, w_NHR: jax.Array, spec: LoraSpec) -> jax.Array:
  """kv_b_proj's per-head weight [N, H, R] for the absorbed decode path (which reads the weight, not the Linear's
  output) plus alpha / r * (A @ B) in that layout, when the adapter exists (it is created by the Linear's call)."""
  if not module.has_variable('params', 'lora_a'):
    return w_NHR
  a = nn.meta.unbox(module.get_variable('params', 'lora_a')).astype(jnp.float32)  # [R, r]
  b = nn.meta.unbox(module.get_variable('params', 'lora_b')).astype(jnp.float32)  # [r, N, H]
  delta = jnp.einsum('Rr,rNH->NHR', a, b, precision=jax.lax.Precision.HIGHEST)
  return w_NHR + (spec.alpha / spec.rank * delta).astype(w_NHR.dtype)


class ExpertAdapter(nn.Module):
  """The adapter params of one routed-expert projection (created in the Experts' scope as <proj>_lora): lora_a
  [E, K, r] (kaiming-uniform, a=sqrt(5), as PEFT) and lora_b [E, r, M] (zeros), with the weight's axis names."""
  shape: tuple[int, int, int]  # the weight's [E, K, M]
  axes: tuple[str, str, str]
  rank: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    e, k, m = self.shape
    bound = 1.0 / math.sqrt(k)

    def init_a(rng, shape, dtype):
      return jax.random.uniform(rng, shape, dtype, -bound, bound)

    a = self.param('lora_a', nn.with_logical_partitioning(init_a, (self.axes[0], self.axes[1], None)),
                   (e, k, self.rank), self.param_dtype)
    b = self.param('lora_b', nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[0], None, self.axes[2])),
                   (e, self.rank, m), self.param_dtype)
    return a, b


class AdaptedExperts(flax.struct.PyTreeNode):
  """A routed experts' weight with per-expert LoRA adapters, as a grouped weight (dsjax/model/moe.py
  `grouped_matmul`): rows x grouped by expert -> x @ W_e + alpha / r * dropout(x) @ A_e @ B_e, the adapter's two
  factors applied by two more grouped matmuls (ragged_dot), so no [E, K, M] delta is formed."""
  base: Any                       # float [E, K, M] in the compute dtype, or a grouped weight (an int8 QTensor base)
  lora_a: jax.Array               # [E, K, r]
  lora_b: jax.Array               # [E, r, M]
  dropout_key: jax.Array | None   # None: no dropout
  factor: float = flax.struct.field(pytree_node=False)  # alpha / r
  rate: float = flax.struct.field(pytree_node=False)
  dtype: str = flax.struct.field(pytree_node=False)     # compute dtype

  def ragged_dot(self, x_RK: jax.Array, group_sizes_E: jax.Array, preferred_element_type: Any = None,
                 shard: jax.Array | None = None) -> jax.Array:
    """[R, M]: see the class docstring; `shard` (expert parallelism) makes each shard's dropout mask its own."""
    dtype = jnp.dtype(self.dtype)
    y = moe_lib.grouped_matmul(x_RK, self.base, group_sizes_E, preferred_element_type, shard)
    x = x_RK.astype(dtype)
    if self.dropout_key is not None:
      key = self.dropout_key if shard is None else jax.random.fold_in(self.dropout_key, shard)
      keep = jax.random.bernoulli(key, 1.0 - self.rate, x.shape)
      x = jnp.where(keep, x / (1.0 - self.rate), 0).astype(dtype)
    h_Rr = jax.lax.ragged_dot(x, self.lora_a.astype(dtype), group_sizes_E)
    delta = jax.lax.ragged_dot(h_Rr, self.lora_b.astype(dtype), group_sizes_E, preferred_element_type=y.dtype)
    return y + delta * jnp.asarray(self.factor, y.dtype)

  def shard_map_specs(self, spec: jax.sharding.PartitionSpec) -> AdaptedExperts:
    """Split like the weight (`spec` over [E, K, M]): A over E and K, B over E and M, the key replicated."""
    spec_of = jax.sharding.PartitionSpec
    return self.replace(base=moe_lib.shard_map_specs_of(self.base, spec), lora_a=spec_of(spec[0], spec[1], None),
                        lora_b=spec_of(spec[0], None, spec[2]),
                        dropout_key=None if self.dropout_key is None else spec_of())


def _adapted_experts(module: moe_lib.Experts, name: str, weight: Any, spec: LoraSpec,
                     deterministic: bool) -> AdaptedExperts:
  """`weight` (what Experts.weight(name) returned) with the adapter of experts.<name>, created in the Experts' scope."""
  e, d, f = module.num_experts, module.hidden_size, module.expert_dim
  if name == 'down_proj':
    shape, axes = (e, f, d), ('experts', 'mlp', 'embed')
  else:
    shape, axes = (e, d, f), ('experts', 'embed', 'mlp')
  a, b = ExpertAdapter(shape, axes, spec.rank, module.param_dtype, name=name + EXPERT_ADAPTER_SUFFIX)()
  key = None
  if not deterministic and spec.dropout > 0:
    key = module.make_rng('dropout')
  return AdaptedExperts(weight, a, b, key, factor=spec.alpha / spec.rank, rate=spec.dropout,
                        dtype=jnp.dtype(module.dtype).name)


def _in_mtp(module: nn.Module) -> bool:
  """Whether `module` belongs to a multi-token-prediction depth (params under mtp_*), which gets no adapters."""
  path = module.path
  return bool(path) and str(path[0]).startswith(MTP_PREFIX)


class LoraModel:
  """`model` with the adapters of `spec` on its targeted projections: `init` and `apply` as the model's (the same
  arguments; `deterministic=False` turns adapter dropout on), run under a flax interceptor (nn.intercept_methods)
  that adds each adapter's output to its Linear's, wraps targeted routed experts' weights (Experts.weight) with
  theirs, and adds kv_b_proj's adapter to the weight the absorbed decode path reads (UpProjection.per_head_weight).
  Has the model's `cfg`."""

  def __init__(self, model: Transformer, spec: LoraSpec):
    self.model, self.spec = model, spec
    self.cfg = model.cfg

  def _interceptor(self, deterministic: bool):
    targets = self.spec.targets

    def add_adapter(next_fun, args, kwargs, context):
      y = next_fun(*args, **kwargs)
      module, method = context.module, context.method_name
      if isinstance(module, Linear) and method == '__call__' and module.name in targets and not _in_mtp(module):
        y = y + _adapter_output(module, args[0], self.spec, deterministic).astype(y.dtype)
      elif (isinstance(module, UpProjection) and method == 'per_head_weight' and module.name in targets
            and not _in_mtp(module)):
        y = _absorbed_adapter(module, y, self.spec)
      elif (isinstance(module, moe_lib.Experts) and method == 'weight' and EXPERT_PREFIX + args[0] in targets
            and not _in_mtp(module)):
        y = _adapted_experts(module, args[0], y, self.spec, deterministic)
      return y
    return add_adapter

  def init(self, *args, **kwargs):
    with nn.intercept_methods(self._interceptor(kwargs.get('deterministic', True))):
      return self.model.init(*args, **kwargs)

  def apply(self, *args, **kwargs):
    with nn.intercept_methods(self._interceptor(kwargs.get('deterministic', True))):
      return self.model.apply(*args, **kwargs)


# ------------------------------------------------------------------------------------------------ params

def _name(path: Sequence[Any]) -> str:
  """The parameter name of a tree path: its last dict key (boxes and other nodes add non-dict keys)."""
  keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
  return str(keys[-1]) if keys else ''


def is_adapter(path: str) -> bool:
  """True for the '/'-joined path of an adapter param (lora_a, lora_b)."""
  return path.rsplit('/', 1)[-1] in ADAPTER_PARAMS


def abstract_params(model_cfg: ml_collections.ConfigDict, spec: LoraSpec | None) -> Any:
  """Boxed ShapeDtypeStructs of the params of the model (with `spec`'s adapters, float kernels; nothing allocated)."""
  model = Transformer(model_cfg) if spec is None else LoraModel(Transformer(model_cfg), spec)
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(lambda t: model.init(jax.random.key(0), t, t), tokens)['params']


def _lead(path: Sequence[Any]) -> int:
  """The leading axes of an adapter param at `path` (tree path or names): the stacked layers' (under 'layers' /
  'dense_layers') and, for routed experts' adapters (under experts/<proj>_lora), the experts'."""
  names = [str(p.key) if isinstance(p, jax.tree_util.DictKey) else str(p) for p in path]
  stacked = 1 if names and names[0] in (layout.STACKED, layout.DENSE_STACKED) else 0
  return stacked + (1 if len(names) >= 2 and names[-2].endswith(EXPERT_ADAPTER_SUFFIX) else 0)


def _adapted_targets(adapters: Any) -> set[str]:
  """The target names that have adapters in a params (or adapters) tree."""
  found = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]:
    names = [str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey)]
    if len(names) >= 2 and names[-1] == 'lora_a':
      module = names[-2]
      found.add(EXPERT_PREFIX + module[:-len(EXPERT_ADAPTER_SUFFIX)] if module.endswith(EXPERT_ADAPTER_SUFFIX)
                else module)
  return found


def _check_targets(shapes: Any, spec: LoraSpec) -> None:
  """ConfigError naming config.lora.targets when a target is not a projection of this model (e.g. q_proj of latent
  attention with a query latent, which has q_a_proj / q_b_proj; experts.* without routed experts)."""
  missing = [t for t in spec.targets if t not in _adapted_targets(shapes)]
  if missing:
    raise config_lib.ConfigError(f'config.lora.targets={list(spec.targets)!r}: {missing} are not projections of '
                                 f'this model (standard attention: q/k/v/o_proj; latent attention: q_proj or '
                                 'q_a_proj + q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj; MLP and shared '
                                 'experts: gate/up/down_proj; routed experts: experts.gate/up/down_proj)')


def init_adapters(model_cfg: ml_collections.ConfigDict, spec: LoraSpec, rng: jax.Array) -> dict:
  """Fresh adapters as PEFT initialises them: lora_a ~ U(+-1/sqrt(fan_in)), lora_b = 0. A tree holding only the
  adapter params, e.g. {'layers': {'attention' | 'mlp': {target: {'lora_a': [L, in..., r], 'lora_b': [L, r, out...]}}}}
  (also 'dense_layers'; shared experts under mlp/shared_experts; routed experts under mlp/experts/<proj>_lora with
  lora_a [L, E, in, r], lora_b [L, E, r, out]). A target the model lacks raises ConfigError."""
  shapes = adapters_of(nn.meta.unbox(abstract_params(model_cfg, spec)))
  _check_targets(shapes, spec)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)

  def make(rng):
    values = []
    for (path, s), key in zip(leaves, jax.random.split(rng, len(leaves))):
      if _name(path) == 'lora_a':
        bound = 1.0 / math.sqrt(math.prod(s.shape[_lead(path):-1]))
        values.append(jax.random.uniform(key, s.shape, s.dtype, -bound, bound))
      else:
        values.append(jnp.zeros(s.shape, s.dtype))
    return jax.tree_util.tree_unflatten(treedef, values)
  return jax.jit(make)(rng)


def adapters_of(params: Any) -> dict:
  """The adapter params (lora_a, lora_b) of a params tree, in a tree of the same nesting; other params dropped."""
  if not isinstance(params, dict):
    return params
  out = {}
  for key, value in params.items():
    if key in ADAPTER_PARAMS:
      out[key] = value
    elif isinstance(value, dict):
      sub = adapters_of(value)
      if sub:
        out[key] = sub
  return out


def add_adapters(base: Any, model_cfg: ml_collections.ConfigDict, spec: LoraSpec, rng: jax.Array | None = None,
                 adapters: dict | None = None) -> dict:
  """Params of `LoraModel(Transformer(model_cfg), spec)` from the plain params `base`: the base values (projection
  kernels and routed experts quantized to int8 QTensors with `spec.base_int8`) plus `adapters` (a tree as
  `init_adapters` returns; fresh ones from `rng` when None). A missing or misshapen param raises ValueError naming
  it; a target the model lacks ConfigError."""
  if adapters is None:
    if rng is None:
      raise ValueError('add_adapters: give either adapters or an rng to initialise them')
    adapters = init_adapters(model_cfg, spec, rng)
  target = nn.meta.unbox(abstract_params(model_cfg, spec))
  _check_targets(target, spec)
  params = _fill(target, quant.unbox(base), adapters, ())
  return quantize_base(params, model_cfg) if spec.base_int8 else params


def quantize_base(params: Any, model_cfg: ml_collections.ConfigDict) -> Any:
  """Every projection kernel that LoRA can target (ALL_TARGETS: attention, latent attention, MLP and shared
  experts) and the routed experts' weights of `params` (boxed or not, concrete or abstract) as int8 QTensors, one
  scale per output channel (and expert) (dsjax.quant; a boxed kernel's axis names carried over for sharding); the
  rest unchanged (lm_head, eh_proj, embeddings, norms, routers)."""
  linear = set(TARGETS) | set(LATENT_TARGETS)

  def convert(path, leaf):
    names = [str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey)]
    where = quant.quantized_layout(names)
    if where is None or quant.is_qtensor(leaf) or (names[-1] == 'kernel' and names[-2] not in linear):
      return leaf
    t = quant.quantize_kernel(nn.meta.unbox(leaf), *where, bits=8, group_size=0, dtype=model_cfg.dtype,
                              name='/'.join(names))
    return quant.with_axis_names(t, leaf)
  return jax.tree_util.tree_map_with_path(convert, params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _fill(target: dict, base: dict, adapters: dict, path: tuple[str, ...]) -> dict:
  out = {}
  where = lambda key: '/'.join(path + (key,))
  for key, shape in target.items():
    if isinstance(shape, dict):
      out[key] = _fill(shape, base.get(key, {}) if isinstance(base, dict) else {},
                       adapters.get(key, {}) if isinstance(adapters, dict) else {}, path + (key,))
    elif key in ADAPTER_PARAMS:
      if key not in adapters:
        raise ValueError(f'adapters: missing {where(key)}')
      out[key] = _checked(adapters[key], shape, where(key))
    else:
      if key not in base:
        raise ValueError(f'base params: missing {where(key)}')
      out[key] = _checked(base[key], shape, where(key))
  return out


def _checked(value: Any, shape: jax.ShapeDtypeStruct, name: str) -> Any:
  if quant.is_qtensor(value):  # an int8 base already
    return value
  if tuple(value.shape) != tuple(shape.shape):
    raise ValueError(f'param {name}: shape {tuple(value.shape)}, the LoRA model needs {tuple(shape.shape)}')
  return jnp.asarray(value, shape.dtype)


def plain_model(model: Any, params: Any) -> tuple[Transformer, Any]:
  """(Transformer, params) that compute what (model, params) do: a LoraModel's adapters merged into the kernels
  (for sampling and evaluation, which run the plain model); any other model unchanged."""
  if isinstance(model, LoraModel):
    return model.model, merge(params, model.spec)
  return model, params


def merge_peft(base: Any, model_cfg: ml_collections.ConfigDict, directory: str) -> dict:
  """Plain params of the base with the PEFT adapter in `directory` merged in (serving an adapter: no adapter math
  per token)."""
  spec, adapters = load_peft(directory, model_cfg)
  return merge(add_adapters(base, model_cfg, spec, adapters=adapters), spec)


def merge(params: Any, spec: LoraSpec) -> dict:
  """Plain params (`Transformer(model_cfg)`, dsjax.convert.hf.export_hf): every adapter folded into its kernel as
  kernel + alpha / r * A @ B (routed experts: per expert, W_e + alpha / r * A_e @ B_e; int8 kernels and experts
  dequantized first), adapter params removed. Kernels keep their dtype (the adapters' dtype for int8 ones)."""
  return _merge(quant.unbox(params), spec)


def _merge(node: Any, spec: LoraSpec) -> Any:
  if not isinstance(node, dict):
    return node
  if 'lora_a' not in node and not quant.is_qtensor(node.get('kernel')):
    out = {}
    for k, v in node.items():  # routed experts: weight [lead..., E, K, M] + its adapter node <k>_lora
      if k.endswith(EXPERT_ADAPTER_SUFFIX) and k[:-len(EXPERT_ADAPTER_SUFFIX)] in node:
        continue
      adapter = node.get(k + EXPERT_ADAPTER_SUFFIX)
      if adapter is not None or quant.is_qtensor(v):
        out[k] = _merge({'kernel': v, **(adapter or {})}, spec)['kernel']
      else:
        out[k] = _merge(v, spec)
    return out
  kernel = node['kernel']
  if quant.is_qtensor(kernel):
    dtype = node['lora_a'].dtype if 'lora_a' in node else jnp.float32
    kernel = quant.dequantize(kernel, jnp.float32)
  else:
    dtype = kernel.dtype
  # a [lead..., in..., r], b [lead..., r, out...], kernel [lead..., in..., out...]
  lead = node['lora_a'].ndim + node['lora_b'].ndim - 2 - kernel.ndim if 'lora_a' in node else 0
  merged = _merged_kernel(kernel, node.get('lora_a'), node.get('lora_b'), lead=lead, factor=spec.alpha / spec.rank,
                          dtype=jnp.dtype(dtype))
  return {**{k: v for k, v in node.items() if k not in ('kernel', *ADAPTER_PARAMS)}, 'kernel': merged}


@functools.partial(jax.jit, static_argnames=('lead', 'factor', 'dtype'))
def _merged_kernel(kernel: jax.Array, a: jax.Array | None, b: jax.Array | None, *, lead: int, factor: float,
                   dtype: jnp.dtype) -> jax.Array:
  """One merged kernel [lead..., in..., out...]: the kernel + factor * A @ B, computed in float32."""
  kernel = kernel.astype(jnp.float32)
  if a is not None:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    lead_shape, r = a.shape[:lead], a.shape[-1]
    in_shape, out_shape = a.shape[lead:-1], b.shape[lead + 1:]
    delta = jnp.matmul(a.reshape(*lead_shape, math.prod(in_shape), r), b.reshape(*lead_shape, r, math.prod(out_shape)),
                       precision=jax.lax.Precision.HIGHEST)
    kernel = kernel + factor * delta.reshape(kernel.shape)
  return kernel.astype(dtype)


class LoraExport:
  """A training-loop hook (dsjax/train/hooks.py): at the end of a LoRA run, the adapter alone in PEFT format in
  <workdir>/adapter; `merged` gives the merged (plain) model that the run's ExportModel hook writes as its
  checkpoint, for serve.py and HF export."""

  def __init__(self, spec: LoraSpec):
    self.spec = spec

  def on_step(self, run: Any, step: int) -> None:
    del run, step

  def on_end(self, run: Any) -> None:
    if not run.workdir:
      return
    directory = os.path.join(run.workdir, 'adapter')
    save_peft(directory, run.state.params, run.cfg.model, self.spec)
    run.summary['adapter'] = directory
    run.say(f'saved the LoRA adapter (PEFT format) to {directory}')

  def merged(self, run: Any) -> tuple[ml_collections.ConfigDict, Any]:
    """(config, params) of the merged plain model: kernel + alpha / r * A @ B, LoRA off."""
    cfg = ml_collections.ConfigDict(run.cfg.to_dict())
    cfg.lora.enabled, cfg.lora.adapter = False, ''
    return cfg, merge(run.state.params, self.spec)


# ------------------------------------------------------------------------------------------------ PEFT files

@dataclasses.dataclass(frozen=True)
class _Site:
  """Where one target's adapters of one stack of layers live, in dsjax's params and in PEFT's file."""
  target: str
  path: tuple[str, ...]          # the adapter's module in the params, stack first (its lora_a / lora_b inside)
  hf_module: str                 # in a HF decoder layer; '{e}' for per-expert modules
  layers: tuple[int, ...]        # the model's layer indices of the stack
  experts: int                   # routed experts (per-expert adapters), 0 otherwise
  in_shape: tuple[int, ...]      # of one kernel, as dsjax lays it out
  out_shape: tuple[int, ...]
  rope: int = 0                  # latent attention: the last `rope` outputs (per head) are RoPE dims, reordered

  def name(self, layer: int, expert: int, which: str) -> str:
    return f'{_PEFT_PREFIX}{layer}.{self.hf_module.format(e=expert)}.lora_{which}.weight'

  def names(self) -> list[str]:
    return [self.name(i, e, w) for i in self.layers for e in range(self.experts or 1) for w in 'AB']


def _rope_order(size: int) -> np.ndarray:
  """HF DeepSeek checkpoints rotate interleaved RoPE pairs, dsjax dim i with i + size/2 (dsjax/convert imports
  reorder the rotated outputs of q and kv_a so; the B matrices of adapters on them are reordered alike)."""
  return np.concatenate([np.arange(0, size, 2), np.arange(1, size, 2)])


def _reorder_rope(b: np.ndarray, rope: int, to_dsjax: bool) -> np.ndarray:
  """B [r, *out] with the last `rope` entries of its last axis permuted HF -> dsjax order (or back)."""
  if not rope:
    return b
  order = _rope_order(rope) if to_dsjax else np.argsort(_rope_order(rope))
  return np.concatenate([b[..., :-rope], b[..., -rope:][..., order]], axis=-1)


def _sites(m: ml_collections.ConfigDict, targets: Sequence[str]) -> list[_Site]:
  """The adapter sites of `targets` in a model of config `m` (targets the model lacks have none)."""
  d = m.hidden_size
  if m.mla.kv_lora_rank:
    la, n = m.mla, m.num_heads
    hq, hr = la.qk_nope_head_dim + la.qk_rope_head_dim, la.qk_rope_head_dim
    attention = {'o_proj': ((n, la.v_head_dim), (d,), 0), 'kv_a_proj_with_mqa': ((d,), (la.kv_lora_rank + hr,), hr),
                 'kv_b_proj': ((la.kv_lora_rank,), (n, la.qk_nope_head_dim + la.v_head_dim), 0)}
    if la.q_lora_rank:
      attention.update(q_a_proj=((d,), (la.q_lora_rank,), 0), q_b_proj=((la.q_lora_rank,), (n, hq), hr))
    else:
      attention['q_proj'] = ((d,), (n, hq), hr)
  else:
    n, k, h = m.num_heads, m.num_kv_heads, config_lib.head_dim(m)
    attention = {'q_proj': ((d,), (n, h), 0), 'k_proj': ((d,), (k, h), 0), 'v_proj': ((d,), (k, h), 0),
                 'o_proj': ((n, h), (d,), 0)}
  mlp = lambda f: {'gate_proj': ((d,), (f,)), 'up_proj': ((d,), (f,)), 'down_proj': ((f,), (d,))}
  sites = []
  for stack, start, stop, is_moe in layout.layer_groups(moe_layers(m)):
    layers = tuple(range(start, stop))
    for t in targets:
      if t in attention:
        in_shape, out_shape, rope = attention[t]
        sites.append(_Site(t, (stack, 'attention', t), f'self_attn.{t}', layers, 0, in_shape, out_shape, rope))
      elif t in _MLP and not is_moe:
        sites.append(_Site(t, (stack, 'mlp', t), f'mlp.{t}', layers, 0, *mlp(m.mlp_dim)[t]))
      elif t in _MLP and m.moe.num_shared_experts:
        sites.append(_Site(t, (stack, 'mlp', 'shared_experts', t), f'mlp.shared_experts.{t}', layers, 0,
                           *mlp(m.moe.num_shared_experts * m.moe.expert_dim)[t]))
      elif t in EXPERT_TARGETS and is_moe:
        proj = t[len(EXPERT_PREFIX):]
        sites.append(_Site(t, (stack, 'mlp', 'experts', proj + EXPERT_ADAPTER_SUFFIX), f'mlp.experts.{{e}}.{proj}',
                           layers, m.moe.num_experts, *mlp(m.moe.expert_dim)[proj]))
  return sites


def _host(x: jax.Array) -> np.ndarray:
  """A (possibly multi-process sharded) array as one host numpy array."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _peft_caveats(model_cfg: ml_collections.ConfigDict, targets: Sequence[str]) -> str | None:
  """What PEFT with transformers >= 5 does differently with this adapter of a DeepSeekMoE model, or None."""
  if not model_cfg.moe.num_experts:
    return None
  notes = []
  mlp = [t for t in targets if t in _MLP]
  if mlp:
    notes.append(f'its {mlp} adapters of the dense MLP / shared experts are dropped: PEFT rewrites gate/up/down_proj '
                 'targets of DeepseekV2/V3 to the fused routed-expert parameters (experts.gate_up_proj, down_proj)')
  routed = {t for t in targets if t in EXPERT_TARGETS}
  if len(routed & {'experts.gate_proj', 'experts.up_proj'}) == 1:
    notes.append('PEFT refuses an adapter on only one of experts.gate_proj / experts.up_proj (fused as gate_up_proj)')
  if not notes:
    return None
  return ('with transformers >= 5, ' + '; '.join(notes) + '. transformers 4 + PEFT load the file as written '
          '(per-expert modules mlp.experts.{e}.<proj>), as does dsjax.lora.load_peft')


def save_peft(directory: str, params: Any, model_cfg: ml_collections.ConfigDict,
              spec: LoraSpec | ml_collections.ConfigDict, base_model: str | None = None) -> None:
  """Writes the adapters of `params` as a PEFT LoRA adapter: adapter_config.json and adapter_model.safetensors
  (float32) with tensors `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in] and
  `...lora_B.weight` [out, r], in torch's [out, in] layout with heads flattened as export_hf does (latent attention:
  B's RoPE rows of q_proj / q_b_proj / kv_a_proj_with_mqa in HF's interleaved order). Shared experts are
  `...mlp.shared_experts.gate_proj...`, routed experts one adapter per expert `...mlp.experts.{e}.gate_proj...`: the
  per-expert modules of DeepseekV2/V3 in transformers 4, which PEFT with transformers 5 converts on load into its
  adapters of the fused expert parameters (target_parameters), exactly for attention and routed-expert targets; for
  dense-MLP / shared-expert targets of a MoE model it does not (see `_peft_caveats`, logged as a warning).
  target_modules lists the HF module names (experts.gate_proj -> gate_proj), as PEFT matches them."""
  if not isinstance(spec, LoraSpec):
    spec = spec_from_config(spec)
  params = nn.meta.unbox(params)
  tensors = {}
  for site in _sites(model_cfg, spec.targets):
    node = params
    for key in site.path:
      node = node[key]
    a, b = _host(node['lora_a']).astype(np.float32), _host(node['lora_b']).astype(np.float32)
    num_in, num_out = math.prod(site.in_shape), math.prod(site.out_shape)
    for li, i in enumerate(site.layers):
      for e in range(site.experts or 1):
        a_one, b_one = (a[li, e], b[li, e]) if site.experts else (a[li], b[li])
        b_one = _reorder_rope(b_one.reshape(spec.rank, *site.out_shape), site.rope, to_dsjax=False)
        tensors[site.name(i, e, 'A')] = np.ascontiguousarray(a_one.reshape(num_in, spec.rank).T)
        tensors[site.name(i, e, 'B')] = np.ascontiguousarray(b_one.reshape(spec.rank, num_out).T)
  if jax.process_index() != 0:
    return
  if caveats := _peft_caveats(model_cfg, spec.targets):
    logging.warning('LoRA adapter %s: %s', directory, caveats)
  os.makedirs(directory, exist_ok=True)
  target_modules = list(dict.fromkeys(t.removeprefix(EXPERT_PREFIX) for t in spec.targets))
  config = {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'base_model_name_or_path': base_model, 'r': spec.rank,
      'lora_alpha': spec.alpha, 'lora_dropout': spec.dropout, 'target_modules': target_modules,
      'bias': 'none', 'fan_in_fan_out': False, 'use_rslora': False, 'use_dora': False, 'modules_to_save': None,
      'init_lora_weights': True, 'layers_to_transform': None, 'layers_pattern': None, 'rank_pattern': {},
      'alpha_pattern': {}, 'inference_mode': True, 'revision': None,
  }
  files.save_safetensors(tensors, os.path.join(directory, ADAPTER_WEIGHTS), metadata={'format': 'pt'})
  with open(os.path.join(directory, ADAPTER_CONFIG), 'w') as f:
    json.dump(config, f, indent=2)


def _tensor_names(directory: str) -> set[str] | None:
  path = os.path.join(directory, ADAPTER_WEIGHTS)
  if not os.path.isfile(path):
    return None
  with safe_open(path, framework='numpy') as f:
    return set(f.keys())


def _dsjax_targets(modules: list[str], names: set[str] | None) -> list[str]:
  """dsjax targets of PEFT target_modules: an MLP name (gate/up/down_proj) stands for the dense MLP's / shared
  experts' projection and, where the weights hold per-expert tensors (mlp.experts.{e}.<name>), the routed
  experts' too; without weights to look at, the former only."""
  out = []
  for module in modules:
    if module not in _MLP or names is None:
      out.append(module)
      continue
    routed = any(re.search(rf'\.mlp\.experts\.\d+\.{module}\.lora_A\.weight$', n) for n in names)
    linear = any(n.endswith((f'.mlp.{module}.lora_A.weight', f'.mlp.shared_experts.{module}.lora_A.weight'))
                 for n in names)
    if linear or not routed:
      out.append(module)
    if routed:
      out.append(EXPERT_PREFIX + module)
  return out


def read_peft_config(directory: str) -> LoraSpec:
  """The LoraSpec of a PEFT adapter_config.json (base_int8 False; routed-expert targets as its weights show, see
  `_dsjax_targets`); features dsjax lacks raise AdapterError."""
  path = os.path.join(directory, ADAPTER_CONFIG)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'not a PEFT adapter directory (no {ADAPTER_CONFIG}): {path}')
  with open(path) as f:
    c = json.load(f)
  if c.get('peft_type') != 'LORA':
    raise AdapterError(f'{path}: peft_type={c.get("peft_type")!r}, only LORA adapters are supported')
  if c.get('target_parameters'):
    raise AdapterError(f'{path}: target_parameters={c["target_parameters"]!r}: adapters of fused expert parameters '
                       '(as PEFT writes them with transformers >= 5, e.g. experts.gate_up_proj with one adapter for '
                       'gate and up) are not supported; dsjax reads per-expert adapters (mlp.experts.{e}.gate_proj '
                       'etc., as PEFT writes them with transformers 4 and dsjax.lora.save_peft)')
  for field, ok in (('use_rslora', False), ('use_dora', False), ('fan_in_fan_out', False), ('bias', 'none'),
                    ('layers_to_transform', None), ('rank_pattern', {}), ('alpha_pattern', {}),
                    ('modules_to_save', None)):
    if c.get(field, ok) not in (ok, None, [], {}):
      raise AdapterError(f'{path}: {field}={c[field]!r} is not supported (dsjax needs {ok!r})')
  for field in ('r', 'lora_alpha', 'target_modules'):
    if field not in c:
      raise AdapterError(f'{path}: required field {field!r} is missing')
  if not isinstance(c['target_modules'], list):
    raise AdapterError(f'{path}: target_modules={c["target_modules"]!r}: expected a list of module names')
  try:
    targets = _targets(_dsjax_targets(c['target_modules'], _tensor_names(directory)), f'{path}: target_modules')
  except config_lib.ConfigError as e:
    raise AdapterError(str(e)) from e
  return LoraSpec(rank=int(c['r']), alpha=float(c['lora_alpha']), dropout=float(c.get('lora_dropout') or 0.0),
                  targets=targets)


def load_peft(directory: str, model_cfg: ml_collections.ConfigDict) -> tuple[LoraSpec, dict]:
  """(spec, adapters) from a PEFT adapter directory for a model of `model_cfg`; adapters as `init_adapters` lays
  them out, in the model's param dtype. Missing files, tensors or wrong shapes raise errors naming the file."""
  spec = read_peft_config(directory)
  path = os.path.join(directory, ADAPTER_WEIGHTS)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'PEFT adapter directory without weights (no {ADAPTER_WEIGHTS}): {path}')
  dtype = config_lib.dtype(model_cfg.param_dtype)
  sites = _sites(model_cfg, spec.targets)
  expected = {name for site in sites for name in site.names()}
  adapters: dict = {}
  with safe_open(path, framework='numpy') as f:
    names = set(f.keys())
    missing, unexpected = sorted(expected - names), sorted(names - expected)
    if missing or unexpected:
      raise AdapterError(f'{path}: does not fit adapter_config.json and the model ({model_cfg.num_layers} layers, '
                         f'targets {list(spec.targets)}): missing {missing[:4]}, unexpected {unexpected[:4]}')
    for site in sites:
      a_shape, b_shape = (spec.rank, math.prod(site.in_shape)), (math.prod(site.out_shape), spec.rank)
      a, b = [], []
      for i in site.layers:
        for e in range(site.experts or 1):
          ta, tb = f.get_tensor(site.name(i, e, 'A')), f.get_tensor(site.name(i, e, 'B'))
          for name, t, want in ((site.name(i, e, 'A'), ta, a_shape), (site.name(i, e, 'B'), tb, b_shape)):
            if tuple(t.shape) != want:
              raise AdapterError(f'{path}: tensor {name} has shape {tuple(t.shape)}, the model needs {want}')
          a.append(ta.astype(np.float32).T.reshape(*site.in_shape, spec.rank))
          b.append(_reorder_rope(tb.astype(np.float32).T.reshape(spec.rank, *site.out_shape), site.rope,
                                 to_dsjax=True))
      lead = (len(site.layers), site.experts) if site.experts else (len(site.layers),)
      node = adapters
      for key in site.path:
        node = node.setdefault(key, {})
      node['lora_a'] = jnp.asarray(np.stack(a).reshape(*lead, *a[0].shape), dtype)
      node['lora_b'] = jnp.asarray(np.stack(b).reshape(*lead, *b[0].shape), dtype)
  return spec, adapters
