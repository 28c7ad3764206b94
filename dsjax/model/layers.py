"""Basic layers: named-axis projection (optionally with LoRA adapters), RMSNorm, SwiGLU MLP, token embedding.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) so sharding rules can place it.
"""
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.model import layout

Dtype = Any


def to_dtype(name: str | Dtype) -> jnp.dtype:
  """'bfloat16' / 'float32' / a dtype -> jnp.dtype."""
  return jnp.dtype(name)


def normal_init(std: float, names: tuple[str, ...]) -> nn.initializers.Initializer:
  """normal(std) initializer whose parameter is boxed with logical axis `names`."""
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Low-rank adapters (dsjax/lora.py builds this from `config.lora`): every projection named in `targets` gets
  y += alpha / rank * dropout(x) @ A @ B; with a spec, all projection kernels are frozen (int8 with `base_int8`)."""
  rank: int = 16
  alpha: float = 32.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ('q_proj', 'v_proj')
  base_int8: bool = False

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def lora_kwargs(spec: LoraSpec | None, name: str, deterministic: bool = True) -> dict[str, Any]:
  """`Linear` fields for the projection `name` under `spec` (none without a spec: the plain model)."""
  if spec is None:
    return {}
  return dict(lora_rank=spec.rank if name in spec.targets else 0, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
              int8=spec.base_int8, frozen=True, deterministic=deterministic)


def split_equation(equation: str) -> tuple[str, str, str, int]:
  """'BTNH,NHD->BTD' -> ('BTNH', 'NHD', 'BTD', 2): input, kernel and output subscripts, and the number of leading
  kernel axes contracted with the input (the kernel is laid out [in..., out...])."""
  inputs, out = equation.split('->')
  x_sub, k_sub = inputs.split(',')
  num_in = sum(c in x_sub for c in k_sub)
  if not all(c in x_sub for c in k_sub[:num_in]):
    raise ValueError(f'{equation}: the contracted kernel axes must come first')
  return x_sub, k_sub, out, num_in


# ---- int8 base kernels (LoRA's base_int8). jax.grad (dsjax.train.step) only takes float leaves, so the int8 values
# travel in float params: two int8 values per bfloat16 number, through a bijection of the 255 x 255 pairs of
# [-127, 127] onto +0 and the finite normal bfloat16 numbers. Any arithmetic that keeps a finite value (p + 0 in
# optax.apply_updates, selects) keeps the bits, and the memory is one byte per weight.
_POSITIVE = 32512  # finite normal positive bfloat16 numbers: bits 0x0080 .. 0x7f7f (negatives: 0x8080 .. 0xff7f)


def quantize_int8(w: jax.Array, in_axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """Symmetric per-output-channel int8: w ~ q * scale, q int8 in [-127, 127] (shape of w), scale float32 (w's
  shape without `in_axes`) = max |w| over `in_axes` / 127."""
  w = w.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(w), axis=in_axes, keepdims=True)
  scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
  q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
  return q, jnp.squeeze(scale, axis=in_axes)


def pack_int8(q: jax.Array) -> jax.Array:
  """int8 [..., 2n] in [-127, 127] -> bfloat16 [..., n] (two values per number, adjacent along the last axis)."""
  if q.shape[-1] % 2:
    raise ValueError(f'int8 packing pairs the last axis, which must be even; got shape {q.shape}')
  pairs = q.astype(jnp.int32).reshape(*q.shape[:-1], q.shape[-1] // 2, 2) + 127
  index = pairs[..., 0] * 255 + pairs[..., 1]  # 0 .. 255**2 - 1
  bits = jnp.where(index == 0, 0, jnp.where(index <= _POSITIVE, index - 1 + 0x0080, index - _POSITIVE - 1 + 0x8080))
  return jax.lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.bfloat16)


def unpack_int8(packed: jax.Array) -> jax.Array:
  """The inverse of `pack_int8`: bfloat16 [..., n] -> int8 [..., 2n]."""
  bits = jax.lax.bitcast_convert_type(packed, jnp.uint16).astype(jnp.int32)
  index = jnp.where(bits == 0, 0, jnp.where(bits < 0x8000, bits - 0x0080 + 1, bits - 0x8080 + _POSITIVE + 1))
  pairs = jnp.stack([index // 255, index % 255], axis=-1) - 127
  return pairs.reshape(*packed.shape[:-1], packed.shape[-1] * 2).astype(jnp.int8)


def project(equation: str, x: jax.Array, kernel: jax.Array, preferred_element_type: Dtype | None = None, *,
            transposed: bool = False) -> jax.Array:
  """`einsum(equation, x, kernel)` for a kernel laid out [in..., out...] (or [out..., in...] if `transposed`, the
  decoding layout) whose input axes end x in the same order, as every projection here: computed as one matmul of
  [..., K] by [K, M] (or [M, K]) over the flattened axes, so the kernel is read as it is stored. (As an einsum over
  several axes, XLA may lay the activation out with the axes swapped, e.g. o_proj's heads and head_dim, and then
  copy a transposed kernel to match it, on every call.)"""
  x_sub, k_sub, out_sub, num_in = split_equation(equation)
  in_letters, out_letters = k_sub[:num_in], k_sub[num_in:]
  num_out = kernel.ndim - num_in
  rest = x_sub[:len(x_sub) - num_in]
  if x_sub[len(x_sub) - num_in:] != in_letters or out_sub != rest + out_letters or '.' in rest.replace('...', ''):
    if transposed:  # not a projection this model has; the einsum over the stored layout
      kernel = jnp.transpose(kernel, (*range(num_out, kernel.ndim), *range(num_out)))
    return jnp.einsum(equation, x, kernel, preferred_element_type=preferred_element_type)
  lead = x.shape[:x.ndim - num_in]
  out_shape = kernel.shape[:num_out] if transposed else kernel.shape[num_in:]
  k, m = math.prod(x.shape[x.ndim - num_in:]), math.prod(out_shape)
  x = x.reshape(*lead, k)
  contract = ((x.ndim - 1,), (1 if transposed else 0,))
  y = jax.lax.dot_general(x, kernel.reshape((m, k) if transposed else (k, m)), (contract, ((), ())),
                          preferred_element_type=preferred_element_type)
  return y.reshape(*lead, *out_shape)


class Linear(nn.Module):
  """`einsum(equation, x, kernel)` with a bias-free kernel of `shape` named `axes` (e.g. q: [D,N,H]).

  LoRA (`lora_rank` > 0): adds alpha / rank * einsum(dropout(x), lora_a [in..., r], lora_b [r, out...]); lora_b
  starts at zero, lora_a kaiming-uniform as in PEFT. `frozen`: no gradient reaches the kernel. `int8`: the kernel is
  stored as `kernel_int8` (pack_int8 of int8 values, [in..., out[:-1], out[-1] / 2]) and `kernel_scale` [out...].
  """
  shape: tuple[int, ...]
  axes: tuple[str, ...]
  equation: str
  init_std: float = 0.02
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  preferred_element_type: Dtype | None = None
  lora_rank: int = 0
  lora_alpha: float = 0.0
  lora_dropout: float = 0.0
  int8: bool = False
  frozen: bool = False
  deterministic: bool = True  # adapter dropout off

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    num_in = split_equation(self.equation)[3]
    if self.int8:
      y = self._int8_matmul(x)
    elif self.has_variable('params', layout.TRANSPOSED):  # the decoding layout (dsjax/model/layout.py)
      shape, axes = (*self.shape[num_in:], *self.shape[:num_in]), (*self.axes[num_in:], *self.axes[:num_in])
      kernel_t = self.param(layout.TRANSPOSED, normal_init(self.init_std, axes), shape, self.param_dtype)
      if self.frozen:
        kernel_t = jax.lax.stop_gradient(kernel_t)
      y = project(self.equation, x.astype(self.dtype), kernel_t.astype(self.dtype), self.preferred_element_type,
                  transposed=True)
    else:
      stored = self.get_variable('params', 'kernel')
      if hasattr(stored, 'project'):  # a quantized kernel (dsjax.quant.QTensor) multiplies by itself
        y = stored.project(x.astype(self.dtype), self.preferred_element_type)
      else:
        kernel = self.param('kernel', normal_init(self.init_std, self.axes), self.shape, self.param_dtype)
        if self.frozen:
          kernel = jax.lax.stop_gradient(kernel)
        y = project(self.equation, x.astype(self.dtype), kernel.astype(self.dtype), self.preferred_element_type)
    if self.lora_rank:
      y = y + self._adapter(x).astype(y.dtype)
    return y

  def _int8_matmul(self, x: jax.Array) -> jax.Array:
    """x @ int8 kernel, then the per-output-channel scale (which commutes with the contraction)."""
    _, k_sub, out_sub, num_in = split_equation(self.equation)
    out_shape, out_axes = self.shape[num_in:], self.axes[num_in:]
    # Random init (the int8 base is usually quantized from a float checkpoint by dsjax.lora): N(0, std) on a
    # fixed grid of 4 std / 127.
    step = 4.0 * self.init_std / 127.0

    def init_kernel(rng, packed_shape, dtype):
      del dtype
      w = jax.random.normal(rng, self.shape, jnp.float32) * self.init_std
      return pack_int8(jnp.clip(jnp.round(w / step), -127, 127).astype(jnp.int8))

    packed_shape = (*self.shape[:-1], self.shape[-1] // 2)
    if self.shape[-1] % 2:
      raise ValueError(f'lora.base_int8 needs an even last kernel dimension; {self.name} has shape {self.shape}')
    packed = self.param('kernel_int8', nn.with_logical_partitioning(init_kernel, self.axes), packed_shape,
                        jnp.bfloat16)
    scale = self.param('kernel_scale', nn.with_logical_partitioning(nn.initializers.constant(step), out_axes),
                       out_shape, self.param_dtype)
    kernel = unpack_int8(jax.lax.stop_gradient(packed)).astype(self.dtype)
    y = jnp.einsum(self.equation, x.astype(self.dtype), kernel, preferred_element_type=self.preferred_element_type)
    out_letters = k_sub[num_in:]
    return jnp.einsum(f'{out_sub},{out_letters}->{out_sub}', y, jax.lax.stop_gradient(scale).astype(y.dtype))

  def _adapter(self, x: jax.Array) -> jax.Array:
    """alpha / r * einsum(dropout(x), A [in..., r], B [r, out...]) in `dtype`."""
    x_sub, k_sub, out_sub, num_in = split_equation(self.equation)
    in_letters, out_letters = k_sub[:num_in], k_sub[num_in:]
    rest = ''.join(c for c in x_sub if c not in in_letters)
    r = self.lora_rank
    bound = 1.0 / math.sqrt(math.prod(self.shape[:num_in]))  # kaiming_uniform(a=sqrt(5)), PEFT's default

    def init_a(rng, shape, dtype):
      return jax.random.uniform(rng, shape, dtype, -bound, bound)

    a = self.param('lora_a', nn.with_logical_partitioning(init_a, (*self.axes[:num_in], None)),
                   (*self.shape[:num_in], r), self.param_dtype)
    b = self.param('lora_b', nn.with_logical_partitioning(nn.initializers.zeros, (None, *self.axes[num_in:])),
                   (r, *self.shape[num_in:]), self.param_dtype)
    x = nn.Dropout(self.lora_dropout)(x, deterministic=self.deterministic)
    h = jnp.einsum(f'{x_sub},{in_letters}r->{rest}r', x.astype(self.dtype), a.astype(self.dtype))
    y = jnp.einsum(f'{rest}r,r{out_letters}->{out_sub}', h, b.astype(self.dtype),
                   preferred_element_type=self.preferred_element_type)
    return y * jnp.asarray(self.lora_alpha / r, y.dtype)


class RMSNorm(nn.Module):
  """x / rms(x) * scale over the last axis, computed in float32, returned in `dtype`."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


class MLP(nn.Module):
  """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x)); [..., D] -> [..., D]."""
  hidden_size: int
  mlp_dim: int
  init_std: float = 0.02
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: LoraSpec | None = None
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d, f = self.hidden_size, self.mlp_dim
    kw = dict(init_std=self.init_std, dtype=self.dtype, param_dtype=self.param_dtype)
    lo = lambda name: lora_kwargs(self.lora, name, self.deterministic)
    gate = Linear((d, f), ('embed', 'mlp'), '...D,DF->...F', name='gate_proj', **kw, **lo('gate_proj'))(x)
    up = Linear((d, f), ('embed', 'mlp'), '...D,DF->...F', name='up_proj', **kw, **lo('up_proj'))(x)
    return Linear((f, d), ('mlp', 'embed'), '...F,FD->...D', name='down_proj', **kw,
                  **lo('down_proj'))(nn.silu(gate) * up)


class Embedder(nn.Module):
  """Token embedding [V, D]; `encode` looks tokens up, `decode` computes tied logits x @ E^T."""
  vocab_size: int
  features: int
  init_std: float = 0.02
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding = self.param('embedding', normal_init(self.init_std, ('vocab', 'embed')),
                                (self.vocab_size, self.features), self.param_dtype)

  def encode(self, tokens: jax.Array) -> jax.Array:
    """int [B, T] -> [B, T, D] in `dtype`."""
    return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

  def decode(self, x: jax.Array) -> jax.Array:
    """[B, T, D] -> float32 logits [B, T, V]."""
    return jnp.einsum('...D,VD->...V', x.astype(self.dtype), self.embedding.astype(self.dtype),
                      preferred_element_type=jnp.float32)
