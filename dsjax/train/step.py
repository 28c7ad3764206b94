"""Loss, train step and eval step: pure functions of (state, batch) that the loop jits.

A batch is a dict of int32 arrays [batch, seq]: `inputs`, `targets`, `segment_ids` (0 = padding) and
`positions` (per-document), as produced by dsjax.data.pipeline.
"""
from __future__ import annotations

from typing import Any, Callable

from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from dsjax.train.state import TrainState

Batch = dict[str, jax.Array]


def token_nll(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token negative log-likelihood (nats) and log-partition, both float32 [B, T]."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return log_z_BT - target_logit_BT, log_z_BT


def loss_fn(params: Any, model: nn.Module, batch: Batch, dropout_rng: jax.Array | None, *,
            router_aux_weight: float = 0.0, z_loss_weight: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean next-token loss over non-padding targets, plus the router load-balance and optional z-loss terms."""
  deterministic = dropout_rng is None
  logits, aux = model.apply(
      {'params': params}, batch['inputs'], batch['positions'], segment_ids=batch['segment_ids'],
      deterministic=deterministic, rngs=None if deterministic else {'dropout': dropout_rng})
  mask_BT = (batch['segment_ids'] > 0).astype(jnp.float32)
  num_tokens = jnp.maximum(mask_BT.sum(), 1.0)
  nll_BT, log_z_BT = token_nll(logits, batch['targets'])
  nll = (nll_BT * mask_BT).sum() / num_tokens
  router_loss = aux['router_loss']
  z_loss = (jnp.square(log_z_BT) * mask_BT).sum() / num_tokens
  total = nll + router_aux_weight * router_loss + z_loss_weight * z_loss
  return total, {'loss': nll, 'router_loss': router_loss, 'z_loss': z_loss, 'tokens': mask_BT.sum()}


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    cfg: ml_collections.ConfigDict) -> Callable[[TrainState, Batch, jax.Array], Any]:
  """Returns `train_step(state, batch, rng) -> (state, metrics)`; dropout RNG is folded in per step."""
  use_dropout = cfg.model.dropout_rate > 0
  weights = dict(router_aux_weight=cfg.model.attention.router_aux_weight if cfg.model.attention.kind == 'routed'
                 else 0.0, z_loss_weight=cfg.train.z_loss_weight)

  def train_step(state: TrainState, batch: Batch, rng: jax.Array):
    dropout_rng = jax.random.fold_in(rng, state.step) if use_dropout else None
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, metrics), grads = grad_fn(state.params, model, batch, dropout_rng, **weights)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics['grad_norm'] = optax.tree.norm(grads)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model: nn.Module, token_bytes: jax.Array) -> Callable[[Any, Batch], dict[str, jax.Array]]:
  """Returns `eval_step(params, batch) -> sums` of nll (nats), target tokens and the bytes they stand for.

  `token_bytes` [vocab] maps a token id to its length in UTF-8 bytes, so bits per byte compare across tokenizers.
  """
  def eval_step(params: Any, batch: Batch) -> dict[str, jax.Array]:
    logits, _ = model.apply({'params': params}, batch['inputs'], batch['positions'],
                            segment_ids=batch['segment_ids'])
    mask_BT = batch['segment_ids'] > 0
    nll_BT, _ = token_nll(logits, batch['targets'])
    return {
        'nll_sum': jnp.where(mask_BT, nll_BT, 0.0).sum(),
        'tokens': mask_BT.sum(),
        'bytes': jnp.where(mask_BT, token_bytes[batch['targets']], 0).sum(),
    }

  return eval_step
