"""Weight-only post-training quantization for serving: int8 per output channel, int4 group-wise (packed).

  qparams = quantize_params(params, cfg.model, cfg.quant)   # then Sampler / Engine / model.apply as usual
  weight_bytes(qparams) / weight_bytes(params, as_dtype='bfloat16')

No model change and no wrapper: a quantized kernel is stored where `kernel` was as a `QTensor`, a flax
`AxisMetadata` box (like `LogicallyPartitioned`) whose leaves are the int8 values and the scales. Flax unboxes
every parameter when a module reads it (`self.param`), and a QTensor's unbox *is* the dequantization, so
`Linear` gets `q * scale` in the compute dtype inside the jitted forward; XLA then sees int8 -> convert ->
multiply -> dot (see docs/quantization.md for what it fuses). Under `nn.scan` the leaves carry the leading
[layers] axis and are sliced per layer like any parameter.

Layouts (K: product of a kernel's input axes, M: product of its output axes, L: scanned layers if any):
  int8: values int8 [L?, K, M] in [-127, 127], scales [L?, 1, M] float32; w ~= q * scale.
  int4: values int8 [L?, K/2, M], two signed nibbles per byte (row 2i low, row 2i+1 high), in [-8, 7];
        scales [L?, K/group_size, M] bfloat16 (rounded up so |w / scale| <= 7); w ~= q * scale[group].
Quantized: the kernels of every projection in `INPUT_AXES` (q/k/v/o_proj, the latent-attention projections
q_a/q_b/kv_a_proj_with_mqa/kv_b_proj, gate/up/down_proj of dense MLPs and shared experts, the MTP eh_proj and the
untied lm_head), and the routed experts' gate_proj / up_proj [E, D, F] and down_proj [E, F, D] (`EXPERT_WEIGHTS`:
most of a DeepSeekMoE model's bytes), quantized per expert with a leading [E] axis after the layers one, i.e.
values [L?, E, K, M] and scales [L?, E, groups, M]. Kept in float (cast to the compute dtype): the token embedding (a
gather; also the tied head), norms, projection biases, the head router and the MoE router ('gate': it selects experts,
a discontinuous function of its logits).

Routed experts multiply through `QTensor.ragged_dot` (dsjax/model/moe.py `grouped_matmul`): int8 as one grouped
matmul of x by the int8 values in the compute dtype, each row then scaled by its expert's per-channel scales (no
dequantized copy of the experts); int4 dequantizes all experts' weights, then one grouped matmul.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

from absl import logging
import flax
import flax.linen as nn
from flax.core import meta
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dsjax import config as config_lib
from dsjax.model import layout
from dsjax.model.layers import Linear

MODES = ('none', 'int8', 'int4')

# Kernels that are quantized -> how many leading axes of the (per-layer) kernel are contracted with the input: every
# projection but Transformer-XL's r_proj (applied to a handful of distance embeddings, not worth it).
INPUT_AXES = {name: axes for name, axes in layout.INPUT_AXES.items() if name != 'r_proj'}
# The routed experts' raw params (dsjax/model/moe.py Experts): [E, in, out], one input axis.
EXPERTS = 'experts'
EXPERT_WEIGHTS = ('gate_proj', 'up_proj', 'down_proj')
# A quantized matmul with at most this many rows of x (decode steps, verification chunks) runs chunk by chunk on
# CPU (`chunked_matmul`); more rows (prefill) amortize one dequantized copy of the weight over the rows.
CHUNKED_MAX_ROWS = 64
CHUNK_ELEMENTS = 1 << 19  # weights dequantized per chunk (2 MiB of float32: a fraction of any real kernel)


class QTensor(flax.struct.PyTreeNode, meta.AxisMetadata):
  """A quantized kernel; `unbox()` (what flax's `self.param` calls) returns the dequantized [*lead, *shape] array."""
  values: jax.Array            # int8 [*lead, K, M] (int8) or [*lead, K // 2, M] (int4, packed)
  scales: jax.Array            # [*lead, groups, M]
  shape: tuple[int, ...] = flax.struct.field(pytree_node=False)  # one kernel's float shape, e.g. [D, N, H]
  bits: int = flax.struct.field(pytree_node=False)               # 8 | 4
  num_input_axes: int = flax.struct.field(pytree_node=False)     # leading axes of `shape` contracted with x
  dtype: str = flax.struct.field(pytree_node=False)              # dequantized (compute) dtype
  # Logical axis names of `values` ([*lead, K, M]: e.g. ('layers', 'embed', 'heads')) for sharding
  # (dsjax.sharding.logical_shardings); None: replicated. `scales` share the lead and M names.
  names: tuple[str | None, ...] | None = flax.struct.field(pytree_node=False, default=None)

  @property
  def size(self) -> int:
    """The number of weights it stands for (as a float kernel; int4 packs two per stored byte)."""
    return math.prod(self.values.shape[:-2]) * math.prod(self.shape)

  def partition_specs(self) -> QTensor:
    """This QTensor with a PartitionSpec of logical names in place of each array (flax.linen.get_partition_spec)."""
    names = self.names or (None,) * self.values.ndim
    spec = jax.sharding.PartitionSpec
    return self.replace(values=spec(*names), scales=spec(*names[:-2], None, names[-1]))

  def unbox(self) -> jax.Array:
    return dequantize(self)

  def project(self, x: jax.Array, preferred_element_type: Any = None) -> jax.Array:
    """x [..., *in_axes] @ this kernel -> [..., *out_axes] in preferred_element_type (default: the compute dtype).

    The dequantized weight is never written out whole for a few rows of x: XLA:GPU and XLA:TPU fuse the
    dequantization into the matmul's operand; XLA:CPU does not (it writes int8 -> float into a buffer first, and
    hoists that out of a decode loop: a float copy of every weight, read each token), so on CPU `chunked_matmul`
    dequantizes a cache-sized chunk of rows at a time."""
    n_in = self.num_input_axes
    lead = x.shape[:x.ndim - n_in]
    k, m = math.prod(self.shape[:n_in]), math.prod(self.shape[n_in:])
    x_RK = x.reshape(-1, k)
    if jax.default_backend() == 'cpu' and self.values.ndim == 2 and x_RK.shape[0] <= CHUNKED_MAX_ROWS:
      y = chunked_matmul(x_RK, self)
    elif self.bits == 8:  # one scale per output channel commutes with the contraction: scale the sum
      y = jnp.dot(x_RK.astype(self.dtype), self.values.astype(self.dtype), preferred_element_type=jnp.float32)
      y = y * self.scales[..., 0, :].astype(jnp.float32)
    else:
      y = jnp.dot(x_RK.astype(self.dtype), dequantize(self).reshape(k, m), preferred_element_type=jnp.float32)
    return y.astype(preferred_element_type or self.dtype).reshape(*lead, *self.shape[n_in:])

  def ragged_dot(self, x_MK: jax.Array, group_sizes_E: jax.Array, preferred_element_type: Any = None,
                 shard: jax.Array | None = None) -> jax.Array:
    """Grouped matmul of routed experts (values [E, K, M]): rows of x [M_rows, K] sorted by expert, the first
    group_sizes_E[0] rows times expert 0's kernel, and so on; rows past the groups give zeros. Returns
    [M_rows, M] in preferred_element_type (default: the compute dtype). `shard` (for randomness) is unused.

    int8: `jax.lax.ragged_dot` of x with the int8 values in the compute dtype, accumulated in float32, then each row
    scaled by the per-channel scales of its row's expert: a scale per (expert, output channel) commutes with the
    contraction, so no dequantized copy of the experts is written. int4: scales change along K (groups), so they do
    not commute; all experts are dequantized (one [E, K, M] copy in the compute dtype, per call), then one ragged_dot.
    """
    del shard
    dtype = jnp.dtype(self.dtype)
    x_MK = x_MK.astype(dtype)
    if self.bits == 8:
      y = jax.lax.ragged_dot(x_MK, self.values.astype(dtype), group_sizes_E, preferred_element_type=jnp.float32)
      # The expert of each row (rows past the groups get the last expert: their y is zero anyway).
      expert_M = jnp.repeat(jnp.arange(group_sizes_E.shape[0]), group_sizes_E, total_repeat_length=x_MK.shape[0])
      y = y * jnp.take(self.scales[:, 0, :], expert_M, axis=0).astype(jnp.float32)
    else:
      y = jax.lax.ragged_dot(x_MK, dequantize_matrix(self), group_sizes_E, preferred_element_type=jnp.float32)
    return y.astype(preferred_element_type or dtype)

  def shard_map_specs(self, spec: jax.sharding.PartitionSpec) -> QTensor:
    """in_specs for `jax.shard_map` of a QTensor of routed experts whose float weight [E, K, M] has mesh-axis
    `spec`: values split like the weight; scales split over E and M alike, and over K only for int4 groups (int8 has
    one scale row, the same for every K shard: each shard's partial sum is scaled alike)."""
    values = jax.sharding.PartitionSpec(*spec)
    scales = jax.sharding.PartitionSpec(spec[0], spec[1] if self.bits == 4 else None, spec[2])
    return self.replace(values=values, scales=scales)

  def replace_boxed(self, val: Any) -> Any:
    return val

  def add_axis(self, index: int, params: dict[Any, Any]) -> QTensor:
    return self  # nn.scan stacks/slices the leaves; the static per-kernel shape does not change

  def remove_axis(self, index: int, params: dict[Any, Any]) -> QTensor:
    return self


def is_qtensor(x: Any) -> bool:
  return isinstance(x, QTensor)


def unbox(tree: Any) -> Any:
  """`flax.linen.meta.unbox` that keeps QTensors (whose own unbox would dequantize them)."""
  return jax.tree_util.tree_map(lambda x: x if is_qtensor(x) else meta.unbox(x), tree,
                                is_leaf=lambda x: isinstance(x, meta.AxisMetadata))


def pack_int4(q: jax.Array) -> jax.Array:
  """int8 [..., K, M] in [-8, 7] (K even) -> int8 [..., K // 2, M]: row 2i in the low nibble, 2i+1 in the high."""
  lo, hi = q[..., 0::2, :], q[..., 1::2, :]
  return ((hi << 4) | (lo & 0x0F)).astype(jnp.int8)


def unpack_int4(p: jax.Array) -> jax.Array:
  """Inverse of `pack_int4`: int8 [..., K // 2, M] -> int8 [..., K, M] (arithmetic shifts sign-extend)."""
  lo, hi = (p << 4) >> 4, p >> 4
  return jnp.stack([lo, hi], axis=-2).reshape(*p.shape[:-2], 2 * p.shape[-2], p.shape[-1])


@functools.partial(jax.jit, static_argnames=('bits', 'group_size'))
def quantize_matrix(w: jax.Array, *, bits: int, group_size: int) -> tuple[jax.Array, jax.Array]:
  """Symmetric absmax quantization of w [..., K, M] with one scale per (group of `group_size` rows, column).

  Returns (q int8 [..., K, M] unpacked, scales [..., K // group_size, M]) with |w - q * scale| <= scale / 2.
  """
  *lead, k, m = w.shape
  qmax = 127 if bits == 8 else 7
  wg = w.astype(jnp.float32).reshape(*lead, k // group_size, group_size, m)
  scale = jnp.max(jnp.abs(wg), axis=-2) / qmax
  scale = jnp.where(scale > 0, scale, 1.0)
  if bits == 4:  # bf16 scales, rounded up (relative rounding error <= 2^-9) so that |w / scale| <= qmax still
    scale = (scale * (1 + 2.0 ** -7)).astype(jnp.bfloat16)
  q = jnp.clip(jnp.round(wg / scale.astype(jnp.float32)[..., None, :]), -qmax - (bits == 4), qmax)
  return q.astype(jnp.int8).reshape(*lead, k, m), scale


def quantize_kernel(w: jax.Array, num_input_axes: int, lead: int, *, bits: int, group_size: int, dtype: Any,
                    name: str = 'kernel') -> QTensor:
  """A kernel [*lead, *in_axes, *out_axes] -> QTensor (int8: per output channel; int4: group-wise along K)."""
  shape = tuple(w.shape[lead:])
  k, m = math.prod(shape[:num_input_axes]), math.prod(shape[num_input_axes:])
  if bits == 8:
    group_size = k
  else:
    group_size = int4_group_size(k, group_size, f'{name} (shape {shape})')
  q, scales = quantize_matrix(w.reshape(*w.shape[:lead], k, m), bits=bits, group_size=group_size)
  values = q if bits == 8 else pack_int4(q)
  return QTensor(values, scales, shape=shape, bits=bits, num_input_axes=num_input_axes, dtype=jnp.dtype(dtype).name)


def int4_group_size(k: int, group_size: int, name: str = 'kernel') -> int:
  """The int4 group size of a kernel with input size `k`: `group_size` (config.quant.group_size) when it divides k,
  else the largest even divisor of k below it, logged (once per quantized kernel). Groups are even (int4 packs
  rows in pairs);
  a group size <= 0 or odd, or an odd k, raises ConfigError."""
  if group_size <= 0 or group_size % 2:
    raise config_lib.ConfigError(f'config.quant.group_size={group_size}: must be even and > 0 (int4 packs two rows '
                                 'per byte)')
  if k % group_size == 0:
    return group_size
  size = max((d for d in range(2, group_size, 2) if k % d == 0), default=0)
  if not size:
    raise config_lib.ConfigError(f'int4: the input size {k} of {name} is odd; int4 needs an even input size (set '
                                 "config.quant.mode to 'int8')")
  logging.warning('int4: config.quant.group_size=%d does not divide the input size %d of %s; using group size %d '
                  'for it (the largest even divisor below)', group_size, k, name, size)
  return size


def with_axis_names(t: QTensor, kernel: Any) -> QTensor:
  """`t` with the logical axis names of the boxed kernel it was quantized from ([*lead, *in, *out] -> the names of
  the lead axes, the first input and the first output axis: a flattened K or M is split over the mesh as its leading
  axis would be); `t` unchanged when the kernel carries no names."""
  names = getattr(kernel, 'names', None)
  if names is None:
    return t
  lead = t.values.ndim - 2
  return t.replace(names=(*names[:lead], names[lead], names[lead + t.num_input_axes]))


def names_like(like: Any, params: Any) -> Any:
  """`params` with each QTensor given the axis names of the QTensor at its place in `like` (abstract params or
  their shardings, of the same structure), so that the two trees have the same structure."""
  def copy(x, y):
    return y.replace(names=x.names) if is_qtensor(x) and is_qtensor(y) else y
  return jax.tree_util.tree_map(copy, unbox(like), params, is_leaf=is_qtensor)


def dequantize(t: QTensor, dtype: Any = None) -> jax.Array:
  """QTensor -> [*lead, *shape] in `dtype` (default: its compute dtype)."""
  w = dequantize_matrix(t, dtype)
  return w.reshape(*w.shape[:-2], *t.shape)


def dequantize_matrix(t: QTensor, dtype: Any = None) -> jax.Array:
  """QTensor -> [*lead, K, M] in `dtype` (default: its compute dtype), from its arrays alone (so also for the
  shard of a QTensor that a shard_map hands a device: values and scales split alike along K or M)."""
  dtype = jnp.dtype(dtype or t.dtype)
  q = t.values if t.bits == 8 else unpack_int4(t.values)
  *lead, k, m = q.shape
  groups = t.scales.shape[-2]
  w = q.astype(dtype).reshape(*lead, groups, k // groups, m) * t.scales.astype(dtype)[..., None, :]
  return w.reshape(*lead, k, m)


def _divisor_at_most(n: int, limit: int) -> int:
  return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def chunked_matmul(x_RK: jax.Array, t: QTensor) -> jax.Array:
  """float32 [R, M]: x [R, K] @ the dequantized kernel [K, M] of a per-layer QTensor, as a loop over chunks of
  at most CHUNK_ELEMENTS weights (whole rows): each chunk is dequantized into a small buffer and multiplied, so
  memory traffic is one read of the quantized weight. int8 applies its per-channel scales to the sum; int4 splits x
  into its even and odd columns (the low and high nibbles of a packed row) and scales each chunk's groups before its
  matmul. Written by hand: XLA:CPU has no mixed int8/float matmul and fuses no dequantization into its dots.
  """
  k = x_RK.shape[-1]
  m = t.values.shape[-1]
  dtype = jnp.dtype(t.dtype)
  x_RK = x_RK.astype(dtype)
  zeros = jnp.zeros((x_RK.shape[0], m), jnp.float32)
  dot = lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)
  if t.bits == 8:
    rows = _divisor_at_most(k, max(CHUNK_ELEMENTS // m, 1))

    def int8_chunk(i, acc):
      q = jax.lax.dynamic_slice_in_dim(t.values, i * rows, rows, 0).astype(dtype)
      return acc + dot(jax.lax.dynamic_slice_in_dim(x_RK, i * rows, rows, 1), q)
    return jax.lax.fori_loop(0, k // rows, int8_chunk, zeros) * t.scales[0].astype(jnp.float32)

  groups = t.scales.shape[0]
  group = k // groups
  if group * m <= CHUNK_ELEMENTS:  # whole groups per chunk
    rows = group * _divisor_at_most(groups, max(CHUNK_ELEMENTS // (group * m), 1))
  else:  # part of one group per chunk (wide kernels: the LM head)
    rows = 2 * _divisor_at_most(group // 2, max(CHUNK_ELEMENTS // (2 * m), 1))
  packed_rows, chunk_groups = rows // 2, max(rows // group, 1)
  x_even, x_odd = x_RK[:, 0::2], x_RK[:, 1::2]  # the columns the low / high nibbles multiply

  def int4_chunk(i, acc):
    packed = jax.lax.dynamic_slice_in_dim(t.values, i * packed_rows, packed_rows, 0)
    scales = jax.lax.dynamic_slice_in_dim(t.scales, i * rows // group, chunk_groups, 0).astype(dtype)
    weight = lambda q: (q.astype(dtype).reshape(chunk_groups, -1, m) * scales[:, None]).reshape(packed_rows, m)
    lo, hi = weight((packed << 4) >> 4), weight(packed >> 4)
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, i * packed_rows, packed_rows, 1)
    return acc + dot(take(x_even), lo) + dot(take(x_odd), hi)
  return jax.lax.fori_loop(0, k // rows, int4_chunk, zeros)


def _check(quant_cfg: ml_collections.ConfigDict) -> None:
  if quant_cfg.mode not in MODES:
    raise config_lib.ConfigError(f'config.quant.mode={quant_cfg.mode!r}: expected one of {", ".join(MODES)}')
  if quant_cfg.group_size <= 0:
    raise config_lib.ConfigError(f'config.quant.group_size={quant_cfg.group_size}: must be > 0')
  if quant_cfg.get('activations', False) and quant_cfg.mode != 'int8':
    raise config_lib.ConfigError(f'config.quant.activations=True needs config.quant.mode=int8 (int8 x int8 '
                                 f'matmuls), not {quant_cfg.mode!r}')


def quantized_layout(names: Sequence[str]) -> tuple[int, int] | None:
  """(input axes, leading axes) of the param at the dict-key path `names` (from the params' root, training layout)
  when `quantize_params` quantizes it, else None. Quantized: a 'kernel' of a module in INPUT_AXES, and the routed
  experts' EXPERT_WEIGHTS; the leading axes are the stacked layers' (under 'layers' / 'dense_layers') and, for
  experts, the experts axis."""
  if len(names) < 2:
    return None
  stacked = 1 if names[0] in (layout.STACKED, layout.DENSE_STACKED) else 0
  if names[-1] == 'kernel' and names[-2] in INPUT_AXES:
    return INPUT_AXES[names[-2]], stacked
  if names[-2] == EXPERTS and names[-1] in EXPERT_WEIGHTS:
    return 1, stacked + 1
  return None


def quantize_params(params: Any, model_cfg: ml_collections.ConfigDict, quant_cfg: ml_collections.ConfigDict) -> Any:
  """Float params (boxed or not) -> params with QTensor kernels (see module docstring); mode 'none': unchanged.

  Other float leaves are cast to `model_cfg.dtype` (the model casts them there anyway). Works under
  `jax.eval_shape` too (abstract params in, abstract quantized params out).
  """
  _check(quant_cfg)
  if quant_cfg.mode == 'none':
    return params
  if any(is_qtensor(x) for x in jax.tree_util.tree_leaves(params, is_leaf=is_qtensor)):
    raise ValueError('params are quantized already')
  if layout.is_decoding(params):
    raise ValueError('quantize params in the training layout, then convert them with '
                     'dsjax.model.layout.for_decoding (quantized kernels keep their layout)')
  bits = 8 if quant_cfg.mode == 'int8' else 4
  dtype = jnp.dtype(model_cfg.dtype)
  flat = flax.traverse_util.flatten_dict(params)
  out = {}
  for path, boxed in flat.items():
    w = meta.unbox(boxed)
    names = [str(getattr(p, 'key', p)) for p in path]
    where = quantized_layout(names)
    if where is not None:
      out[path] = with_axis_names(
          quantize_kernel(w, *where, bits=bits, group_size=quant_cfg.group_size, dtype=dtype, name='/'.join(names)),
          boxed)
    elif jnp.issubdtype(w.dtype, jnp.floating):
      out[path] = w.astype(dtype)
    else:
      out[path] = w
  return flax.traverse_util.unflatten_dict(out)


def dequantize_params(params: Any, dtype: Any = None) -> Any:
  """Every QTensor replaced by its dequantized array (the float model these params compute exactly)."""
  return jax.tree_util.tree_map(lambda x: dequantize(x, dtype) if is_qtensor(x) else x, params, is_leaf=is_qtensor)


def weight_bytes(params: Any, as_dtype: Any = None) -> int:
  """Bytes the params occupy (arrays or ShapeDtypeStructs; QTensors: values + scales).

  as_dtype: count every leaf at this dtype instead (e.g. 'bfloat16' for the bf16 baseline of float params).
  """
  itemsize = None if as_dtype is None else jnp.dtype(as_dtype).itemsize
  return int(sum(int(np.prod(x.shape)) * (itemsize or jnp.dtype(x.dtype).itemsize)
                 for x in jax.tree_util.tree_leaves(params)))


def int8_matmul(x: jax.Array, t: QTensor) -> jax.Array:
  """x [..., *in_axes] @ an int8 QTensor with x quantized to int8 per token (dynamic absmax over its input axes):
  an int8 x int8 -> int32 matmul, both scales applied to the output. Returns [..., *out_axes] float32."""
  n_in = t.num_input_axes
  lead = x.shape[:x.ndim - n_in]
  x_K = x.astype(jnp.float32).reshape(*lead, -1)
  x_scale = jnp.max(jnp.abs(x_K), axis=-1, keepdims=True) / 127
  x_scale = jnp.where(x_scale > 0, x_scale, 1.0)
  x_q = jnp.clip(jnp.round(x_K / x_scale), -127, 127).astype(jnp.int8)
  acc = jnp.einsum('...K,KM->...M', x_q, t.values, preferred_element_type=jnp.int32)
  y = acc.astype(jnp.float32) * x_scale * t.scales[0].astype(jnp.float32)
  return y.reshape(*lead, *t.shape[n_in:])


def _w8a8_interceptor(next_fun, args, kwargs, context):
  """Runs a `Linear` whose parameters are an int8 QTensor (and its bias, if any) as `int8_matmul` (+ bias); other
  modules, and Linears with more parameters, e.g. LoRA adapters, run unchanged."""
  module = context.module
  if not isinstance(module, Linear) or context.method_name != '__call__' or kwargs or len(args) != 1:
    return next_fun(*args, **kwargs)
  variables = module.variables.get('params', {})
  kernel = variables.get('kernel')
  if set(variables) - {'bias'} != {'kernel'} or not is_qtensor(kernel) or kernel.bits != 8:
    return next_fun(*args, **kwargs)
  out_dtype = module.preferred_element_type or module.dtype
  y = int8_matmul(args[0].astype(module.dtype), kernel).astype(out_dtype)
  return y + meta.unbox(variables['bias']).astype(out_dtype) if 'bias' in variables else y


class QuantizedModel:
  """`model` with int8 activations: `apply` runs it with every int8-quantized `Linear` as an int8 x int8 matmul
  (dynamic per-token activation scales). Has the model's `cfg`, so Sampler / Engine take it in place of the model."""

  def __init__(self, model: Any):
    self.model = model
    self.cfg = getattr(model, 'cfg', None)

  def apply(self, *args, **kwargs):
    with nn.intercept_methods(_w8a8_interceptor):
      return self.model.apply(*args, **kwargs)

  def __getattr__(self, name: str) -> Any:
    return getattr(self.model, name)


def quantize_model(model: Any, quant_cfg: ml_collections.ConfigDict) -> Any:
  """The model to serve quantized params with: `model` itself (weight-only), or a `QuantizedModel` when
  quant.activations is set."""
  _check(quant_cfg)
  return QuantizedModel(model) if quant_cfg.get('activations', False) else model


def maybe_quantize(params: Any, cfg: ml_collections.ConfigDict) -> Any:
  """`quantize_params(params, cfg.model, cfg.quant)` for a full config (a no-op when quant.mode is 'none')."""
  return quantize_params(params, cfg.model, cfg.quant)

