"""Basic layers: named-axis projection, RMSNorm, SwiGLU MLP, token embedding.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) so sharding rules can place it.
"""
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


def split_equation(equation: str) -> tuple[str, str, str, int]:
  """'BTNH,NHD->BTD' -> ('BTNH', 'NHD', 'BTD', 2): input, kernel and output subscripts, and the number of leading
  kernel axes contracted with the input (the kernel is laid out [in..., out...])."""
  inputs, out = equation.split('->')
  x_sub, k_sub = inputs.split(',')
  num_in = sum(c in x_sub for c in k_sub)
  if not all(c in x_sub for c in k_sub[:num_in]):
    raise ValueError(f'{equation}: the contracted kernel axes must come first')
  return x_sub, k_sub, out, num_in


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
  """`einsum(equation, x, kernel)` with a kernel of `shape` named `axes` (e.g. q: [D,N,H]), computed by `project`,
  plus `bias` (the output axes, e.g. [N,H]; zeros at init) if `use_bias`. The stored kernel may be float (`kernel`,
  or `kernel_t` in the decoding layout) or a quantized `dsjax.quant.QTensor` that multiplies by itself; the bias
  stays float and is the same in every layout. Adapters (dsjax/lora.py) attach from outside by interception.
  """
  shape: tuple[int, ...]
  axes: tuple[str, ...]
  equation: str
  init_std: float = 0.02
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  preferred_element_type: Dtype | None = None
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., *in_axes] -> [..., *out_axes] in preferred_element_type (default: dtype)."""
    num_in = split_equation(self.equation)[3]
    if self.has_variable('params', layout.TRANSPOSED):  # the decoding layout (dsjax/model/layout.py)
      shape, axes = (*self.shape[num_in:], *self.shape[:num_in]), (*self.axes[num_in:], *self.axes[:num_in])
      kernel_t = self.param(layout.TRANSPOSED, normal_init(self.init_std, axes), shape, self.param_dtype)
      y = project(self.equation, x.astype(self.dtype), kernel_t.astype(self.dtype), self.preferred_element_type,
                  transposed=True)
      return self._add_bias(y)
    stored = self.get_variable('params', 'kernel')
    if hasattr(stored, 'project'):  # a quantized kernel (dsjax.quant.QTensor) multiplies by itself
      return self._add_bias(stored.project(x.astype(self.dtype), self.preferred_element_type))
    kernel = self.param('kernel', normal_init(self.init_std, self.axes), self.shape, self.param_dtype)
    y = project(self.equation, x.astype(self.dtype), kernel.astype(self.dtype), self.preferred_element_type)
    return self._add_bias(y)

  def _add_bias(self, y: jax.Array) -> jax.Array:
    """y [..., *out_axes] + bias [*out_axes] in y's dtype; y itself without `use_bias`."""
    if not self.use_bias:
      return y
    num_in = split_equation(self.equation)[3]
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, self.axes[num_in:]),
                      self.shape[num_in:], self.param_dtype)
    return y + bias.astype(y.dtype)


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

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d, f = self.hidden_size, self.mlp_dim
    kw = dict(init_std=self.init_std, dtype=self.dtype, param_dtype=self.param_dtype)
    gate = Linear((d, f), ('embed', 'mlp'), '...D,DF->...F', name='gate_proj', **kw)(x)
    up = Linear((d, f), ('embed', 'mlp'), '...D,DF->...F', name='up_proj', **kw)(x)
    return Linear((f, d), ('mlp', 'embed'), '...F,FD->...D', name='down_proj', **kw)(nn.silu(gate) * up)


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
