"""Position encodings: RoPE with linear scaling (HF LLaMA convention) and Transformer-XL relative encoding."""
import jax
import jax.numpy as jnp


def rope_angles(positions: jax.Array, head_dim: int, theta: float = 10000.0,
                scaling_factor: float = 1.0) -> jax.Array:
  """float32 angles [..., H/2]: (position / scaling_factor) * theta^(-2i/H), i = 0..H/2-1."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  return (positions.astype(jnp.float32) / scaling_factor)[..., None] * inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float = 10000.0,
               scaling_factor: float = 1.0) -> jax.Array:
  """Rotates x [B, T, N, H] by positions [B, T] (rotate_half: dim i pairs with dim i + H/2).

  Computed in float32, returned in x.dtype.
  """
  h = x.shape[-1]
  angles = rope_angles(positions, h, theta, scaling_factor)[..., None, :]  # [B, T, 1, H/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def sinusoid_embedding(distances: jax.Array, dim: int, base: float = 10000.0) -> jax.Array:
  """Transformer-XL embedding of distances [...] -> float32 [..., dim].

  [sin(d f), cos(d f)] concatenated, with f_i = base^(-2i/dim), i = 0..dim/2-1.
  """
  inv_freq = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  angles = distances.astype(jnp.float32)[..., None] * inv_freq
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)

