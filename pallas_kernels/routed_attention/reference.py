"""Dense pure-jnp reference for head-routed (Mixture-of-Head) attention."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.sparse_attention.reference import sparse_attention_reference


def routed_attention_reference(q, k, v, q_pos, k_pos, q_seg, k_seg, gates, active=None, *, window=None,
                               num_global=0, scale=None, softcap=None) -> jax.Array:
  """Every head computed densely, then out[b, t, n] = gates[b, t, n] * attn[b, t, n] where active, else 0.

  q [B,T,N,H], k/v [B,S,K,H], gates float [B,T,N], active bool [B,T,N] (default gates != 0). The gradient
  w.r.t. an inactive gate is 0: an unselected (token, head) pair is not part of the computation.
  """
  if active is None:
    active = gates != 0
  out = sparse_attention_reference(q, k, v, q_pos, k_pos, q_seg, k_seg, window=window, num_global=num_global,
                                   scale=scale, softcap=softcap)
  gated = out.astype(jnp.float32) * gates[..., None].astype(jnp.float32)
  return jnp.where(active[..., None], gated, 0.0).astype(q.dtype)
