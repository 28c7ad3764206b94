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


def _sums(params: Any, model: nn.Module, batch: Batch, dropout_rng: jax.Array | None) -> dict[str, jax.Array]:
  """Forward pass over one (micro)batch: summed nll and z-loss over its non-padding targets, token count and the
  router load-balance loss (a mean over the batch)."""
  deterministic = dropout_rng is None
  logits, aux = model.apply(
      {'params': params}, batch['inputs'], batch['positions'], segment_ids=batch['segment_ids'],
      deterministic=deterministic, rngs=None if deterministic else {'dropout': dropout_rng})
  mask_BT = (batch['segment_ids'] > 0).astype(jnp.float32)
  nll_BT, log_z_BT = token_nll(logits, batch['targets'])
  return {'nll': (nll_BT * mask_BT).sum(), 'z': (jnp.square(log_z_BT) * mask_BT).sum(), 'tokens': mask_BT.sum(),
          'router': aux['router_loss']}


def microbatches(batch: Batch, num: int) -> Batch:
  """[B, ...] -> [num, B / num, ...], microbatch i holding rows i, i + num, ...: with the batch sharded in contiguous
  row blocks over devices, every device keeps its own rows in every microbatch (no data moves)."""
  def split(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)
  return jax.tree_util.tree_map(split, batch)


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    cfg: ml_collections.ConfigDict) -> Callable[[TrainState, Batch, jax.Array], Any]:
  """Returns `train_step(state, batch, rng) -> (state, metrics)`.

  With `train.grad_accum_steps` = A > 1 the batch is split into A microbatches whose gradients are summed in a
  `lax.scan`; each microbatch's nll and z-loss are divided by the whole batch's token count, so the update equals
  the one-batch update exactly (up to summation order). Dropout RNG is folded in per step (and microbatch). A step
  whose loss or gradient norm is not finite leaves params and optimizer state unchanged and counts in
  `state.nonfinite` (consecutive such steps; the loop stops the run past `train.max_nonfinite_steps`).
  """
  use_dropout = cfg.model.dropout_rate > 0
  router_weight = cfg.model.attention.router_aux_weight if cfg.model.attention.kind == 'routed' else 0.0
  z_weight = cfg.train.z_loss_weight
  accum = int(cfg.train.grad_accum_steps)

  def objective(params, batch, rng, total_tokens):
    sums = _sums(params, model, batch, rng)
    value = (sums['nll'] + z_weight * sums['z']) / total_tokens + router_weight * sums['router'] / accum
    return value, sums

  grad_fn = jax.grad(objective, has_aux=True)

  def train_step(state: TrainState, batch: Batch, rng: jax.Array):
    dropout_rng = jax.random.fold_in(rng, state.step) if use_dropout else None
    total_tokens = jnp.maximum((batch['segment_ids'] > 0).sum().astype(jnp.float32), 1.0)
    if accum == 1:
      grads, sums = grad_fn(state.params, batch, dropout_rng, total_tokens)
    else:
      def body(acc, xs):
        index, micro = xs
        micro_rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)
        grads, sums = grad_fn(state.params, micro, micro_rng, total_tokens)
        return jax.tree_util.tree_map(jnp.add, acc, (grads, sums)), None

      zeros = jax.tree_util.tree_map(jnp.zeros_like, (state.params, {k: jnp.zeros((), jnp.float32) for k in
                                                                     ('nll', 'z', 'tokens', 'router')}))
      (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), microbatches(batch, accum)))
      sums['router'] = sums['router'] / accum
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    loss = sums['nll'] / total_tokens
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_old = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(step=state.step + 1, params=keep_old(params, state.params),
                           opt_state=keep_old(opt_state, state.opt_state),
                           nonfinite=jnp.where(finite, 0, state.nonfinite + 1))
    metrics = {'loss': loss, 'router_loss': sums['router'], 'z_loss': sums['z'] / total_tokens,
               'tokens': sums['tokens'], 'grad_norm': grad_norm, 'skipped': (~finite).astype(jnp.float32),
               'nonfinite_streak': new_state.nonfinite}
    return new_state, metrics

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
