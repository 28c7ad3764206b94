"""The two layouts of a Transformer's params, and the conversions between them.

  training (what `Transformer.init`, training, checkpoints and converters use):
      params['layers'][...]: each leaf stacked [L, ...]; projection kernels [in..., out...] under 'kernel'
  decoding (what the sampler, the engine and speculative decoding read):
      params['layers_0'] ... params['layers_{L-1}']; float projection kernels transposed to [out..., in...] under
      'kernel_t' (quantized kernels, dsjax.quant.QTensor, keep their stored layout)

Why a second layout: `nn.scan` over stacked params is what training wants (one compiled block, remat, fast
compiles), but a decode loop over it slices every layer's weights out of the [L, ...] arrays on every token; XLA
writes each slice to a new buffer before the dot reads it, so a token reads the weights twice and writes them once.
With the layers unstacked, the Transformer runs its blocks in an unrolled Python loop and every dot reads its
weight where it lies. The kernels are transposed because a decode step is a matrix-vector product: with the
contracted axis contiguous in the weight as in the activation (torch's [out, in] layout), XLA:CPU's matmul reads
the weight at nearly the machine's read bandwidth, about 1.3x faster at batch 1 and 2x at batch 4-8 than [in, out]
(bench/decode.py); GPUs and TPUs read either layout at full speed.

`Transformer` and `Linear` follow the params they are given, so both layouts run the same model: convert once
when loading for inference (`for_decoding`), and back for a checkpoint (`for_training`). The conversions work on
arrays, on tracers (inside jit: XLA then writes the converted copy once, before any loop that reads it), on
abstract shapes (`jax.eval_shape`) and on logically partitioned (boxed) params.
"""
from __future__ import annotations

from collections.abc import Mapping
import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

STACKED = 'layers'
DENSE_STACKED = 'dense_layers'  # DeepSeekMoE models: the dense layers before the MoE ones (HF first_k_dense_replace)
TRANSPOSED = 'kernel_t'  # a projection kernel in the decoding layout, [out..., in...]
_UNSTACKED = re.compile(r'^layers_(\d+)$')

# Projection kernels ([in..., out...] in the training layout) -> how many leading axes are contracted with the input.
INPUT_AXES = {'q_proj': 1, 'k_proj': 1, 'v_proj': 1, 'o_proj': 2, 'r_proj': 1, 'gate_proj': 1, 'up_proj': 1,
              'down_proj': 1, 'lm_head': 1, 'q_a_proj': 1, 'q_b_proj': 1, 'kv_a_proj_with_mqa': 1, 'kv_b_proj': 1,
              'eh_proj': 1}


def layer_groups(is_moe: list[bool]) -> list[tuple[str, int, int, bool]]:
  """The stacks of the training layout as (params key, first layer, end, moe) from each layer's kind: one stack
  'layers' when all layers are alike, else 'dense_layers' for the dense prefix and 'layers' for the MoE layers."""
  num_dense = is_moe.count(False)
  if any(is_moe[:num_dense]):
    raise ValueError(f'MoE layers must follow the dense ones, got {is_moe}')
  if num_dense in (0, len(is_moe)):
    return [(STACKED, 0, len(is_moe), num_dense == 0)]
  return [(DENSE_STACKED, 0, num_dense, False), (STACKED, num_dense, len(is_moe), True)]


def layer_name(index: int) -> str:
  """The params key of layer `index` in the decoding layout."""
  return f'{STACKED}_{index}'


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.Partitioned)


def _value(x: Any) -> Any:
  return x.value if _is_box(x) else x


def _layer_keys(params: Any) -> list[str]:
  keys = [k for k in params if isinstance(k, str) and _UNSTACKED.match(k)]
  return sorted(keys, key=lambda k: int(_UNSTACKED.match(k).group(1)))


def is_decoding(params: Any) -> bool:
  """Whether `params` (a Transformer's params dict, boxed or not) are in the decoding layout."""
  return isinstance(params, Mapping) and bool(_layer_keys(params))


def _rebuild(params: Any, out: dict[str, Any]) -> Any:
  return out if isinstance(params, dict) else type(params)(out)


def _take(x: Any, index: int) -> Any:
  if _is_box(x):  # a logically partitioned leaf loses its 'layers' axis name
    return x.remove_axis(0, {nn.PARTITION_NAME: STACKED}).replace_boxed(x.value[index])
  return x[index]


def _stack(xs: list[Any]) -> Any:
  if _is_box(xs[0]):
    return xs[0].replace_boxed(jnp.stack([x.value for x in xs])).add_axis(0, {nn.PARTITION_NAME: STACKED})
  return jnp.stack(xs)


def _permute(x: Any, perm: tuple[int, ...]) -> Any:
  if _is_box(x):
    return x.replace(value=jnp.transpose(x.value, perm), names=tuple(x.names[i] for i in perm))
  return jnp.transpose(x, perm)


def _transpose_kernels(tree: Any, to_decoding: bool) -> Any:
  """Every float projection kernel 'kernel' [in..., out...] <-> 'kernel_t' [out..., in...] (per-layer params)."""
  flat = flax.traverse_util.flatten_dict(dict(tree) if not isinstance(tree, dict) else tree)
  out = {}
  for path, leaf in flat.items():
    module, name = (path[-2] if len(path) >= 2 else None), path[-1]
    source = 'kernel' if to_decoding else TRANSPOSED
    value = _value(leaf)
    if name != source or module not in INPUT_AXES or not hasattr(value, 'ndim'):
      out[path] = leaf  # QTensors are pytree nodes, not leaves here: their 'values' and 'scales' pass through
      continue
    ndim, num_in = value.ndim, INPUT_AXES[module]
    num_in = num_in if to_decoding else ndim - num_in  # leading axes to move to the back
    perm = tuple(range(num_in, ndim)) + tuple(range(num_in))
    out[(*path[:-1], TRANSPOSED if to_decoding else 'kernel')] = _permute(leaf, perm)
  return flax.traverse_util.unflatten_dict(out)


def for_decoding(params: Any) -> Any:
  """Training-layout params -> the decoding layout (see module docstring); decoding params are returned as they are.

  Outside jit the result is a second copy of the weights: drop the training-layout params to free theirs.
  """
  if not isinstance(params, Mapping) or is_decoding(params):
    return params  # also what a drafter without params (None) passes
  if STACKED not in params:
    raise ValueError(f"params hold neither 'layers' nor 'layers_0': not a Transformer's params ({sorted(params)})")
  out = {k: v for k, v in params.items() if k not in (STACKED, DENSE_STACKED)}
  start = 0
  for key in (DENSE_STACKED, STACKED):  # the dense prefix (if any) holds the first layers
    if key not in params:
      continue
    stacked = params[key]
    leaves = jax.tree.leaves(stacked, is_leaf=_is_box)
    if not leaves:
      raise ValueError(f"params['{key}'] holds no arrays")
    count = _value(leaves[0]).shape[0]
    for i in range(count):
      out[layer_name(start + i)] = jax.tree.map(lambda x, i=i: _take(x, i), stacked, is_leaf=_is_box)
    start += count
  return _rebuild(params, _transpose_kernels(out, to_decoding=True))


def for_training(params: Any) -> Any:
  """Decoding-layout params -> the training layout (checkpoints, training); training params are returned as is."""
  keys = _layer_keys(params) if isinstance(params, Mapping) else []
  if not keys:
    return params
  if [int(_UNSTACKED.match(k).group(1)) for k in keys] != list(range(len(keys))):
    raise ValueError(f'decoding params need layers_0 .. layers_{len(keys) - 1} without gaps, got {keys}')
  transposed = _transpose_kernels(params, to_decoding=False)
  out = {k: v for k, v in transposed.items() if k not in keys}
  is_moe = ['experts' in transposed[k].get('mlp', {}) for k in keys]
  for name, start, stop, _ in layer_groups(is_moe):
    out[name] = jax.tree.map(lambda *xs: _stack(list(xs)), *[transposed[k] for k in keys[start:stop]],
                             is_leaf=_is_box)
  return _rebuild(params, out)
