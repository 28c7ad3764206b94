"""Basic layers: named-axis projection, RMSNorm, SwiGLU MLP, token embedding.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) so sharding rules can place it.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def to_dtype(name: str | Dtype) -> jnp.dtype:
  """'bfloat16' / 'float32' / a dtype -> jnp.dtype."""
  return jnp.dtype(name)


def normal_init(std: float, names: tuple[str, ...]) -> nn.initializers.Initializer:
  """normal(std) initializer whose parameter is boxed with logical axis `names`."""
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)


class Linear(nn.Module):
  """`einsum(equation, x, kernel)` with a bias-free kernel of `shape` named `axes` (e.g. q: [D,N,H])."""
  shape: tuple[int, ...]
  axes: tuple[str, ...]
  equation: str
  init_std: float = 0.02
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  preferred_element_type: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', normal_init(self.init_std, self.axes), self.shape, self.param_dtype)
    return jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype),
                      preferred_element_type=self.preferred_element_type)


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
