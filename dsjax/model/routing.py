"""Mixture-of-Head routing: a linear router picks the top-k heads per token and gates their outputs."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.model import partitioning
from dsjax.model.layers import normal_init


def route(probs: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
  """Top-k selection over routed heads.

  Args:
    probs: float32 [B, T, R] router probabilities (softmax over the R routed heads).
  Returns:
    gates [B, T, R]: top_k * p_i / sum_{active} p_j on the top_k heads, exactly 0 elsewhere (active gates
      sum to top_k, so the average active weight is 1 as in plain multi-head attention).
    active: bool [B, T, R].
  """
  # Head i is active when fewer than top_k heads beat it (a larger probability, or an equal one at a lower index:
  # lax.top_k's choice). Elementwise over [B, T, R, R], so it stays split over a sharded batch, where XLA's TopK
  # custom call gathers its whole operand.
  head = jnp.arange(probs.shape[-1])
  other, this = probs[..., None, :], probs[..., :, None]
  beats = (other > this) | ((other == this) & (head[None, :] < head[:, None]))
  active = jnp.sum(beats, axis=-1) < top_k
  selected = jnp.where(active, probs, 0.0)
  gates = top_k * selected / jnp.sum(selected, axis=-1, keepdims=True)
  return gates, active


def load_balance_loss(probs: jax.Array, active: jax.Array, valid: jax.Array, top_k: int) -> jax.Array:
  """Switch-Transformer load-balance loss R * sum_i f_i P_i over valid tokens; 1.0 when use is uniform.

  f_i = (valid tokens routed to head i) / (top_k * n_valid), without gradient; P_i = mean router prob.
  Args:
    probs: float32 [B, T, R]. active: bool [B, T, R]. valid: bool [B, T].
  """
  num_routed = probs.shape[-1]
  w = valid.astype(jnp.float32)[..., None]
  n_valid = jnp.maximum(jnp.sum(w), 1.0)
  f = jax.lax.stop_gradient(jnp.sum(active * w, axis=(0, 1)) / (top_k * n_valid))
  p = jnp.sum(probs * w, axis=(0, 1)) / n_valid
  return num_routed * jnp.sum(f * p)


class HeadRouter(nn.Module):
  """Per-token head gates: x [B, T, D] -> (gates float32 [B, T, N], load-balance loss float32 scalar).

  The first `num_shared_heads` heads are always active with gate 1; the remaining N_r are routed.
  """
  num_heads: int
  num_shared_heads: int
  top_k: int
  init_std: float = 0.02
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    num_routed = self.num_heads - self.num_shared_heads
    # The routed-head axis is not split over devices: top-k needs every head's score of a token, so each shard
    # computes whole rows of scores for its batch rows (D x R weights: a few thousand numbers per layer).
    kernel = self.param('kernel', normal_init(self.init_std, ('embed', None)),
                        (x.shape[-1], num_routed), self.param_dtype)
    logits = jnp.einsum('BTD,DR->BTR', x.astype(jnp.float32), kernel.astype(jnp.float32))
    probs = partitioning.constrain(jax.nn.softmax(logits, axis=-1), ('batch', None, None))
    gates, active = route(probs, self.top_k)
    shared = jnp.ones(gates.shape[:-1] + (self.num_shared_heads,), gates.dtype)
    return jnp.concatenate([shared, gates], axis=-1), load_balance_loss(probs, active, valid, self.top_k)
