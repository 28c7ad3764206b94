"""LoRA: low-rank adapters on chosen projections of a frozen (optionally int8) base, merging, PEFT files.

Adapters attach from outside the model: `LoraModel(Transformer(cfg.model), spec)` runs the model under a flax
method interceptor that adds alpha / r * dropout(x) @ A @ B to the output of every `Linear` named in
`spec.targets`, with A = `lora_a` [in..., r] and B = `lora_b` [r, out...] created in that Linear's own scope (next
to its kernel, stacked over layers like it). No model module has a LoRA field. The base stays frozen because the
train step differentiates only the adapters (dsjax/train/partition.py); with `base_int8` its projection kernels are
int8 `dsjax.quant.QTensor`s (per output channel), the same quantized type serving uses.

  spec_from_config(cfg.lora) / spec_for_run(cfg)  the LoraSpec, validated (errors name the config.lora field)
  LoraModel(model, spec)               the model with adapters (init / apply like a flax module)
  add_adapters(base, model_cfg, spec)  plain params -> params of the LoraModel (fresh or given adapters; int8 base)
  is_adapter(path)                     True for lora_a / lora_b, the params a LoRA run trains
  merge(params, spec)                  -> plain params, kernel + alpha / r * A @ B (loads into Transformer(cfg.model))
  save_peft / load_peft                adapter_config.json + adapter_model.safetensors as Hugging Face PEFT writes
                                       them for a LlamaForCausalLM, so `peft.PeftModel.from_pretrained` loads them
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Sequence

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
from dsjax.model.layers import Linear, split_equation

__all__ = ['LoraSpec', 'LoraModel', 'TARGETS', 'spec_from_config', 'spec_for_run', 'add_adapters', 'init_adapters',
           'adapters_of', 'is_adapter', 'merge', 'merge_peft', 'save_peft', 'load_peft', 'quantize_base']

# dsjax projection name -> (dsjax module inside a layer, Hugging Face LlamaDecoderLayer module).
TARGETS = {
    'q_proj': ('attention', 'self_attn'), 'k_proj': ('attention', 'self_attn'),
    'v_proj': ('attention', 'self_attn'), 'o_proj': ('attention', 'self_attn'),
    'gate_proj': ('mlp', 'mlp'), 'up_proj': ('mlp', 'mlp'), 'down_proj': ('mlp', 'mlp'),
}
ADAPTER_PARAMS = ('lora_a', 'lora_b')
ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_WEIGHTS = 'adapter_model.safetensors'
_PEFT_PREFIX = 'base_model.model.model.layers.'


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Low-rank adapters: every projection named in `targets` gets y += alpha / rank * dropout(x) @ A @ B; all
  projection kernels are frozen (int8 with `base_int8`)."""
  rank: int = 16
  alpha: float = 32.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ('q_proj', 'v_proj')
  base_int8: bool = False

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


class AdapterError(ValueError):
  """A PEFT adapter directory that does not fit the model; the message names the file and field or tensor."""


# ------------------------------------------------------------------------------------------------ spec

def _targets(value: Any, field: str) -> tuple[str, ...]:
  names = [t.strip() for t in value.split(',')] if isinstance(value, str) else list(value or ())
  unknown = [t for t in names if t not in TARGETS]
  if not names or unknown:
    raise config_lib.ConfigError(f'{field}={value!r}: ' + (f'unknown {unknown}, ' if unknown else 'empty, ') +
                                 f'expected a non-empty subset of {list(TARGETS)}')
  return tuple(t for t in TARGETS if t in names)  # canonical order, no duplicates


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


class LoraModel:
  """`model` with the adapters of `spec` on its targeted projections: `init` and `apply` as the model's (the same
  arguments; `deterministic=False` turns adapter dropout on), run under a flax interceptor (nn.intercept_methods)
  that adds each adapter's output to its Linear's. Has the model's `cfg`."""

  def __init__(self, model: Transformer, spec: LoraSpec):
    self.model, self.spec = model, spec
    self.cfg = model.cfg

  def _interceptor(self, deterministic: bool):
    def add_adapter(next_fun, args, kwargs, context):
      y = next_fun(*args, **kwargs)
      module = context.module
      if isinstance(module, Linear) and context.method_name == '__call__' and module.name in self.spec.targets:
        y = y + _adapter_output(module, args[0], self.spec, deterministic).astype(y.dtype)
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


def init_adapters(model_cfg: ml_collections.ConfigDict, spec: LoraSpec, rng: jax.Array) -> dict:
  """Fresh adapters as PEFT initialises them: lora_a ~ U(+-1/sqrt(fan_in)), lora_b = 0. A tree holding only the
  adapter params: {'layers': {'attention' | 'mlp': {target: {'lora_a': [L, in..., r], 'lora_b': [L, r, out...]}}}}."""
  shapes = adapters_of(nn.meta.unbox(abstract_params(model_cfg, spec)))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)

  def make(rng):
    values = []
    for (path, s), key in zip(leaves, jax.random.split(rng, len(leaves))):
      if _name(path) == 'lora_a':
        bound = 1.0 / math.sqrt(math.prod(s.shape[1:-1]))
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
  kernels quantized to int8 QTensors with `spec.base_int8`) plus `adapters` (a tree as `init_adapters` returns;
  fresh ones from `rng` when None). A missing or misshapen param raises ValueError naming it."""
  if adapters is None:
    if rng is None:
      raise ValueError('add_adapters: give either adapters or an rng to initialise them')
    adapters = init_adapters(model_cfg, spec, rng)
  target = nn.meta.unbox(abstract_params(model_cfg, spec))
  params = _fill(target, quant.unbox(base), adapters, ())
  return quantize_base(params, model_cfg) if spec.base_int8 else params


def quantize_base(params: Any, model_cfg: ml_collections.ConfigDict) -> Any:
  """Every projection kernel of `params` (boxed or not, concrete or abstract) as an int8 QTensor, one scale per
  output channel (dsjax.quant; a boxed kernel's axis names carried over for sharding); the rest unchanged."""
  def convert(path, leaf):
    names = [str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey)]
    if len(names) < 2 or names[-1] != 'kernel' or names[-2] not in TARGETS or quant.is_qtensor(leaf):
      return leaf
    lead = 1 if names[0] == 'layers' else 0
    t = quant.quantize_kernel(nn.meta.unbox(leaf), quant.INPUT_AXES[names[-2]], lead, bits=8, group_size=0,
                              dtype=model_cfg.dtype, name='/'.join(names))
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
  kernel + alpha / r * A @ B (int8 kernels dequantized first), adapter params removed. Kernels keep their dtype
  (the adapters' dtype for int8 ones)."""
  return _merge(quant.unbox(params), spec)


def _merge(node: Any, spec: LoraSpec) -> Any:
  if not isinstance(node, dict):
    return node
  if 'lora_a' not in node and not quant.is_qtensor(node.get('kernel')):
    return {k: _merge(v, spec) for k, v in node.items()}
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

def _io_shapes(m: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
  """Per-layer (in, out) kernel shapes of every target, as dsjax lays them out."""
  d, n, k, h, f = m.hidden_size, m.num_heads, m.num_kv_heads, config_lib.head_dim(m), m.mlp_dim
  return {'q_proj': ((d,), (n, h)), 'k_proj': ((d,), (k, h)), 'v_proj': ((d,), (k, h)), 'o_proj': ((n, h), (d,)),
          'gate_proj': ((d,), (f,)), 'up_proj': ((d,), (f,)), 'down_proj': ((f,), (d,))}


def _peft_name(layer: int, target: str, which: str) -> str:
  return f'{_PEFT_PREFIX}{layer}.{TARGETS[target][1]}.{target}.lora_{which}.weight'


def _host(x: jax.Array) -> np.ndarray:
  """A (possibly multi-process sharded) array as one host numpy array."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def save_peft(directory: str, params: Any, model_cfg: ml_collections.ConfigDict,
              spec: LoraSpec | ml_collections.ConfigDict, base_model: str | None = None) -> None:
  """Writes the adapters of `params` as a PEFT LoRA adapter for LlamaForCausalLM: adapter_config.json and
  adapter_model.safetensors (float32) with tensors `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`
  [r, in] and `...lora_B.weight` [out, in], in torch's [out, in] layout with heads flattened as export_hf does."""
  if not isinstance(spec, LoraSpec):
    spec = spec_from_config(spec)
  params = nn.meta.unbox(params)
  shapes = _io_shapes(model_cfg)
  tensors = {}
  for target in spec.targets:
    node = params['layers'][TARGETS[target][0]][target]
    a, b = _host(node['lora_a']).astype(np.float32), _host(node['lora_b']).astype(np.float32)
    num_in, num_out = math.prod(shapes[target][0]), math.prod(shapes[target][1])
    for i in range(model_cfg.num_layers):
      tensors[_peft_name(i, target, 'A')] = np.ascontiguousarray(a[i].reshape(num_in, spec.rank).T)
      tensors[_peft_name(i, target, 'B')] = np.ascontiguousarray(b[i].reshape(spec.rank, num_out).T)
  if jax.process_index() != 0:
    return
  os.makedirs(directory, exist_ok=True)
  config = {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'base_model_name_or_path': base_model, 'r': spec.rank,
      'lora_alpha': spec.alpha, 'lora_dropout': spec.dropout, 'target_modules': list(spec.targets),
      'bias': 'none', 'fan_in_fan_out': False, 'use_rslora': False, 'use_dora': False, 'modules_to_save': None,
      'init_lora_weights': True, 'layers_to_transform': None, 'layers_pattern': None, 'rank_pattern': {},
      'alpha_pattern': {}, 'inference_mode': True, 'revision': None,
  }
  files.save_safetensors(tensors, os.path.join(directory, ADAPTER_WEIGHTS), metadata={'format': 'pt'})
  with open(os.path.join(directory, ADAPTER_CONFIG), 'w') as f:
    json.dump(config, f, indent=2)


def read_peft_config(directory: str) -> LoraSpec:
  """The LoraSpec of a PEFT adapter_config.json (base_int8 False); features dsjax lacks raise AdapterError."""
  path = os.path.join(directory, ADAPTER_CONFIG)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'not a PEFT adapter directory (no {ADAPTER_CONFIG}): {path}')
  with open(path) as f:
    c = json.load(f)
  if c.get('peft_type') != 'LORA':
    raise AdapterError(f'{path}: peft_type={c.get("peft_type")!r}, only LORA adapters are supported')
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
    targets = _targets(c['target_modules'], f'{path}: target_modules')
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
  shapes = _io_shapes(model_cfg)
  expected = {_peft_name(i, t, w) for t in spec.targets for i in range(model_cfg.num_layers) for w in 'AB'}
  adapters: dict = {'layers': {}}
  with safe_open(path, framework='numpy') as f:
    names = set(f.keys())
    missing, unexpected = sorted(expected - names), sorted(names - expected)
    if missing or unexpected:
      raise AdapterError(f'{path}: does not fit adapter_config.json and the model ({model_cfg.num_layers} layers, '
                         f'targets {list(spec.targets)}): missing {missing[:4]}, unexpected {unexpected[:4]}')
    for target in spec.targets:
      in_shape, out_shape = shapes[target]
      a_shape, b_shape = (spec.rank, math.prod(in_shape)), (math.prod(out_shape), spec.rank)
      a, b = [], []
      for i in range(model_cfg.num_layers):
        ta, tb = f.get_tensor(_peft_name(i, target, 'A')), f.get_tensor(_peft_name(i, target, 'B'))
        for name, t, want in ((_peft_name(i, target, 'A'), ta, a_shape), (_peft_name(i, target, 'B'), tb, b_shape)):
          if tuple(t.shape) != want:
            raise AdapterError(f'{path}: tensor {name} has shape {tuple(t.shape)}, the model needs {want}')
        a.append(ta.astype(np.float32).T.reshape(*in_shape, spec.rank))
        b.append(tb.astype(np.float32).T.reshape(spec.rank, *out_shape))
      module = adapters['layers'].setdefault(TARGETS[target][0], {})
      module[target] = {'lora_a': jnp.asarray(np.stack(a), dtype), 'lora_b': jnp.asarray(np.stack(b), dtype)}
  return spec, adapters
