"""Position encodings: RoPE with linear (HF LLaMA convention) or YaRN (DeepSeek-V2/V3) scaling, and
Transformer-XL relative encoding."""
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class YarnParams(NamedTuple):
  """YaRN RoPE scaling (Peng et al. 2023) as transformers' `_compute_yarn_parameters` reads HF `rope_scaling`; the
  scaling factor itself is `scaling_factor`. Hashable, so it can be a static argument of a jitted function."""
  original_max_positions: int = 4096  # original_max_position_embeddings: the context of pretraining
  beta_fast: float = 32.0             # ramp bounds, in rotations over the original context
  beta_slow: float = 1.0
  mscale: float = 1.0                 # 0 stands for HF's unset mscale
  mscale_all_dim: float = 0.0         # 0 stands for HF's unset mscale_all_dim
  truncate: bool = True               # round the ramp bounds outwards to whole dimensions (HF's default)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
  """YaRN's attention temperature term 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1), as HF's get_mscale."""
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_params(positions_cfg: Any) -> YarnParams | None:
  """The YarnParams of a `model.positions` config section, None unless rope_scaling is 'yarn'."""
  p = positions_cfg
  if p.get('rope_scaling', 'linear') != 'yarn':
    return None
  return YarnParams(int(p.yarn_original_max_positions), float(p.yarn_beta_fast), float(p.yarn_beta_slow),
                    float(p.yarn_mscale), float(p.yarn_mscale_all_dim), bool(p.get('yarn_truncate', True)))


def rope_kwargs(positions_cfg: Any) -> dict[str, Any]:
  """Keyword arguments (theta, scaling_factor, yarn) of `apply_rope` / `rope_angles` / `rope_frequencies` for a
  `model.positions` config section: `apply_rope(q, positions, **rope_kwargs(cfg.positions))`."""
  return dict(theta=float(positions_cfg.rope_theta), scaling_factor=float(positions_cfg.rope_scaling_factor),
              yarn=yarn_params(positions_cfg))


def yarn_attention_factor(scaling_factor: float, yarn: YarnParams) -> float:
  """The factor YaRN multiplies cos and sin by (so q.k by its square): HF's attention_factor,
  mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are set, else mscale(factor)."""
  if yarn.mscale and yarn.mscale_all_dim:
    return float(yarn_get_mscale(scaling_factor, yarn.mscale) / yarn_get_mscale(scaling_factor, yarn.mscale_all_dim))
  return float(yarn_get_mscale(scaling_factor))


def yarn_softmax_scale_multiplier(positions_cfg: Any) -> float:
  """What DeepSeek-V2/V3 attention multiplies its softmax scale qk_head_dim^-0.5 by: mscale(factor,
  mscale_all_dim)^2 when rope_scaling is 'yarn' and yarn_mscale_all_dim is set (HF's yarn_apply_mscale), else 1.
  (Standard attention does not use it: there the temperature is all in `yarn_attention_factor`.)"""
  p = positions_cfg
  if p.get('rope_scaling', 'linear') != 'yarn' or not p.yarn_mscale_all_dim:
    return 1.0
  mscale = yarn_get_mscale(float(p.rope_scaling_factor), float(p.yarn_mscale_all_dim))
  return mscale * mscale


def _base_inv_freq(head_dim: int, theta: float) -> jax.Array:
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def rope_frequencies(head_dim: int, theta: float = 10000.0, scaling_factor: float = 1.0,
                     yarn: YarnParams | None = None) -> tuple[np.ndarray, float]:
  """(inv_freq float32 [H/2], attention_factor): angle = position * inv_freq, and cos/sin are multiplied by
  attention_factor. Linear scaling (yarn None): theta^(-2i/H) / scaling_factor and 1.0. YaRN: HF's
  `_compute_yarn_parameters`, i.e. frequencies that turn fewer than beta_slow times over the original context are
  interpolated (divided by the factor), those that turn more than beta_fast times kept, a linear ramp between.

  Computed on the host in numpy float32, op for op as transformers computes it in torch: the result is a constant
  of the traced program (XLA would rewrite the divisions as multiplications by reciprocals, off by an ulp, which
  is 1e-3 in cos/sin at position 1e5).
  """
  f32 = np.float32
  pos_freqs = f32(theta) ** (np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim))  # theta^(2i/H)
  if yarn is None:
    return (f32(1) / pos_freqs) / f32(scaling_factor), 1.0

  # Dimension index (of head_dim) at which a frequency turns `rotations` times over the original context; in
  # float64 as HF computes it; only the ramp over the H/2 frequencies is float32.
  def correction_dim(rotations):
    return head_dim * math.log(yarn.original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
  if yarn.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)  # (HF clips high to head_dim - 1, not head_dim / 2 - 1)
  if low == high:
    high += 0.001  # as HF: no zero-width ramp
  ramp = np.clip((np.arange(head_dim // 2, dtype=f32) - f32(low)) / f32(high - low), 0, 1)
  extrapolation = f32(1) - ramp  # 1: keep the frequency, 0: interpolate it (divide it by the factor)
  interpolated, kept = f32(1) / (f32(scaling_factor) * pos_freqs), f32(1) / pos_freqs
  inv_freq = interpolated * (f32(1) - extrapolation) + kept * extrapolation
  return inv_freq.astype(f32), yarn_attention_factor(scaling_factor, yarn)


def rope_angles(positions: jax.Array, head_dim: int, theta: float = 10000.0,
                scaling_factor: float = 1.0, yarn: YarnParams | None = None) -> jax.Array:
  """float32 angles [..., H/2] of positions [...]: position * inv_freq of `rope_frequencies` (without the
  attention factor). Linear: (position / scaling_factor) * theta^(-2i/H), i = 0..H/2-1."""
  if yarn is None:  # positions divided, not the frequencies: the rounding dsjax has always had
    return (positions.astype(jnp.float32) / scaling_factor)[..., None] * _base_inv_freq(head_dim, theta)
  inv_freq, _ = rope_frequencies(head_dim, theta, scaling_factor, yarn)
  return positions.astype(jnp.float32)[..., None] * inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float = 10000.0,
               scaling_factor: float = 1.0, yarn: YarnParams | None = None) -> jax.Array:
  """Rotates x [B, T, N, H] by positions [B, T] (rotate_half: dim i pairs with dim i + H/2); with YaRN, cos and
  sin are multiplied by its attention factor, as HF's rotary embeddings do.

  Computed in float32, returned in x.dtype.
  """
  h = x.shape[-1]
  angles = rope_angles(positions, h, theta, scaling_factor, yarn)[..., None, :]  # [B, T, 1, H/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  if yarn is not None:
    attention_factor = yarn_attention_factor(scaling_factor, yarn)
    if attention_factor != 1.0:
      sin, cos = sin * attention_factor, cos * attention_factor
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def sinusoid_embedding(distances: jax.Array, dim: int, base: float = 10000.0) -> jax.Array:
  """Transformer-XL embedding of distances [...] -> float32 [..., dim].

  [sin(d f), cos(d f)] concatenated, with f_i = base^(-2i/dim), i = 0..dim/2-1.
  """
  inv_freq = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  angles = distances.astype(jnp.float32)[..., None] * inv_freq
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
