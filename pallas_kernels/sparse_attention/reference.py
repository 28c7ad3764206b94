"""Dense-mask pure-jnp reference for sparse attention."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def sparse_attention_mask(q_pos, k_pos, q_seg, k_seg, *, window=None, num_global=0):
  """Visibility mask [..., T, S]: key j is visible to query i.

  q_seg == k_seg (segment -1 never matches) AND k_pos <= q_pos AND
  (window is None OR q_pos - k_pos < window OR k_pos < num_global).
  """
  qp = q_pos[..., :, None]
  kp = k_pos[..., None, :]
  qs = q_seg[..., :, None]
  ks = k_seg[..., None, :]
  mask = (qs == ks) & (ks != -1) & (kp <= qp)
  if window is not None:
    local = (qp - kp) < window
    if num_global > 0:
      local = local | (kp < num_global)
    mask = mask & local
  return mask


def sparse_attention_reference(q, k, v, q_pos, k_pos, q_seg, k_seg, *, window=None, num_global=0,
                               scale=None, softcap=None, return_lse=False):
  """q [B,T,N,H], k/v [B,S,K,H] -> [B,T,N,H]; softmax in float32; fully masked rows give 0.

  softcap: if set, scores s = scale * q.k become softcap * tanh(s / softcap) before the softmax.
  return_lse: also return each row's log-sum-exp of its visible scores, float32 [B,N,T] (-inf: nothing visible).
  """
  B, T, N, H = q.shape
  K = k.shape[2]
  if N % K:
    raise ValueError(f'num kv heads {K} must divide num query heads {N}')
  group = N // K
  if scale is None:
    scale = 1.0 / math.sqrt(H)
  kf = jnp.repeat(k.astype(jnp.float32), group, axis=2)
  vf = jnp.repeat(v.astype(jnp.float32), group, axis=2)
  logits = jnp.einsum('btnh,bsnh->bnts', q.astype(jnp.float32), kf,
                      precision=jax.lax.Precision.HIGHEST) * scale
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  mask = sparse_attention_mask(q_pos, k_pos, q_seg, k_seg, window=window,
                               num_global=num_global)[:, None]  # [B,1,T,S]
  logits = jnp.where(mask, logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(mask, jnp.exp(logits - m), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum('bnts,bsnh->btnh', p, vf, precision=jax.lax.Precision.HIGHEST).astype(q.dtype)
  if return_lse:
    return out, jnp.where(denom[..., 0] > 0, m[..., 0] + jnp.log(jnp.where(denom[..., 0] > 0, denom[..., 0], 1.0)),
                          -jnp.inf)
  return out
