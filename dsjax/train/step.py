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

from dsjax import distill
from dsjax import privacy
from dsjax.train.state import TrainState

Batch = dict[str, jax.Array]


def token_nll(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token negative log-likelihood (nats) and log-partition, both float32 [B, T]."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return log_z_BT - target_logit_BT, log_z_BT


def _sums(params: Any, model: nn.Module, batch: Batch, dropout_rng: jax.Array | None, teacher: Any = None,
          temperature: float = 1.0) -> dict[str, jax.Array]:
  """Forward pass over one (micro)batch: summed nll and z-loss over its non-padding targets, token count and the
  router load-balance loss (a mean over the batch); with `teacher` outputs (dsjax.distill.teacher_outputs) also
  `kl`, the summed KL(teacher || student) at `temperature` (without the T^2 factor)."""
  deterministic = dropout_rng is None
  logits, aux = model.apply(
      {'params': params}, batch['inputs'], batch['positions'], segment_ids=batch['segment_ids'],
      deterministic=deterministic, rngs=None if deterministic else {'dropout': dropout_rng})
  mask_BT = (batch['segment_ids'] > 0).astype(jnp.float32)
  nll_BT, log_z_BT = token_nll(logits, batch['targets'])
  sums = {'nll': (nll_BT * mask_BT).sum(), 'z': (jnp.square(log_z_BT) * mask_BT).sum(), 'tokens': mask_BT.sum(),
          'router': aux['router_loss']}
  if teacher is not None:
    sums['kl'] = (distill.token_kl(logits, teacher, temperature) * mask_BT).sum()
  return sums


def microbatches(batch: Batch, num: int) -> Batch:
  """[B, ...] -> [num, B / num, ...], microbatch i holding rows i, i + num, ...: with the batch sharded in contiguous
  row blocks over devices, every device keeps its own rows in every microbatch (no data moves)."""
  def split(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)
  return jax.tree_util.tree_map(split, batch)


_NOISE_STREAM = 0x5EED  # fold_in tag of the DP noise key (dropout uses the step number directly)


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, cfg: ml_collections.ConfigDict, *,
                    teacher: tuple[nn.Module, Any] | None = None) -> Callable[..., Any]:
  """Returns `train_step(state, batch, rng[, teacher_params]) -> (state, metrics)`.

  With `train.grad_accum_steps` = A > 1 the batch is split into A microbatches whose gradients are summed in a
  `lax.scan`; each microbatch's nll and z-loss are divided by the whole batch's token count, so the update equals
  the one-batch update exactly (up to summation order). Dropout RNG is folded in per step (and microbatch). A step
  whose loss or gradient norm is not finite leaves params and optimizer state unchanged and counts in
  `state.nonfinite` (consecutive such steps; the loop stops the run past `train.max_nonfinite_steps`).

  `teacher` = (teacher_model, teacher_params) turns on distillation (dsjax.distill, `cfg.distill`): each
  microbatch's objective becomes (hard_weight * nll + kl_weight * T^2 * KL) / tokens (+ z and router terms), the
  teacher's forward running in the same step under stop_gradient; metrics gain `distill_kl` (mean KL per token at
  temperature T, no T^2). The teacher params are the step's 4th argument: jit it with them as an argument (with
  their own in_shardings) so they are not baked in as constants; the default (the params given here) serves
  un-jitted calls. `cfg.privacy.enabled` turns on DP-SGD (dsjax.privacy): per-example gradients clipped to
  privacy.l2_clip in every microbatch, summed over the whole batch, Gaussian noise of std noise_multiplier *
  l2_clip added once per step, divided by the batch rows; metrics gain `clipped_fraction`. Each example's loss is
  then its own mean over its tokens. With neither, the step is exactly the plain one.
  """
  use_dropout = cfg.model.dropout_rate > 0 or (cfg.lora.enabled and cfg.lora.dropout > 0)  # LoRA: adapter dropout
  router_weight = cfg.model.attention.router_aux_weight if cfg.model.attention.kind == 'routed' else 0.0
  z_weight = cfg.train.z_loss_weight
  accum = int(cfg.train.grad_accum_steps)
  teacher_model, default_teacher_params = teacher if teacher is not None else (None, None)
  distilling = teacher is not None
  temperature, kl_weight, hard_weight, top_k = (float(cfg.distill.temperature), float(cfg.distill.kl_weight),
                                                float(cfg.distill.hard_weight), int(cfg.distill.top_k))
  dp = bool(cfg.privacy.enabled)
  l2_clip, noise_multiplier = float(cfg.privacy.l2_clip), float(cfg.privacy.noise_multiplier)
  sum_keys = ('nll', 'z', 'tokens', 'router') + (('kl',) if distilling else ()) + (('clipped',) if dp else ())

  def objective(params, batch, rng, total_tokens, teacher_out=None):
    sums = _sums(params, model, batch, rng, teacher_out, temperature)
    if teacher_out is None:
      value = (sums['nll'] + z_weight * sums['z']) / total_tokens + router_weight * sums['router'] / accum
    else:
      value = ((hard_weight * sums['nll'] + z_weight * sums['z'] + kl_weight * temperature ** 2 * sums['kl'])
               / total_tokens + router_weight * sums['router'] / accum)
    return value, sums

  grad_fn = jax.grad(objective, has_aux=True)

  def example_objective(params, example, rng, teacher_out):
    """One example's loss (a batch of one row): its own mean over its own tokens."""
    one = lambda tree: jax.tree_util.tree_map(lambda x: x[None], tree)
    sums = _sums(params, model, one(example), rng, None if teacher_out is None else one(teacher_out), temperature)
    tokens = jnp.maximum(sums['tokens'], 1.0)
    hard = hard_weight if distilling else 1.0
    value = (hard * sums['nll'] + z_weight * sums['z']) / tokens + router_weight * sums['router']
    if distilling:
      value = value + kl_weight * temperature ** 2 * sums['kl'] / tokens
    return value, sums

  def private_grads(params, micro, rng, teacher_out):
    """Sum over the microbatch's rows of their clipped gradients, and summed stats (`clipped`: rows clipped)."""
    rows = micro['inputs'].shape[0]
    rngs = None if rng is None else jax.random.split(rng, rows)
    grads, sums = privacy.per_example_grads(example_objective, params, micro, rngs, teacher_out)
    clipped_sum, num_clipped = privacy.clip_and_sum(grads, l2_clip)
    sums = {k: v.sum() for k, v in sums.items()}
    sums['router'] = sums['router'] / rows  # a per-row mean, like the batch's
    sums['clipped'] = num_clipped.astype(jnp.float32)
    return clipped_sum, sums

  def micro_grads(params, micro, rng, total_tokens, teacher_params):
    teacher_out = (distill.teacher_outputs(teacher_model, teacher_params, micro, top_k) if distilling else None)
    if dp:
      return private_grads(params, micro, rng, teacher_out)
    if teacher_out is None:
      return grad_fn(params, micro, rng, total_tokens)
    return grad_fn(params, micro, rng, total_tokens, teacher_out)

  def train_step(state: TrainState, batch: Batch, rng: jax.Array, teacher_params: Any = default_teacher_params):
    dropout_rng = jax.random.fold_in(rng, state.step) if use_dropout else None
    total_tokens = jnp.maximum((batch['segment_ids'] > 0).sum().astype(jnp.float32), 1.0)
    if accum == 1:
      grads, sums = micro_grads(state.params, batch, dropout_rng, total_tokens, teacher_params)
    else:
      def body(acc, xs):
        index, micro = xs
        micro_rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)
        grads, sums = micro_grads(state.params, micro, micro_rng, total_tokens, teacher_params)
        return jax.tree_util.tree_map(jnp.add, acc, (grads, sums)), None

      zeros = jax.tree_util.tree_map(jnp.zeros_like, (state.params, {k: jnp.zeros((), jnp.float32) for k in
                                                                     sum_keys}))
      (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), microbatches(batch, accum)))
      sums['router'] = sums['router'] / accum
    if dp:
      noise_key = jax.random.fold_in(jax.random.fold_in(rng, _NOISE_STREAM), state.step)
      grads = privacy.noisy_mean(grads, noise_key, l2_clip, noise_multiplier, batch['inputs'].shape[0])
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
    if distilling:
      metrics['distill_kl'] = sums['kl'] / total_tokens
    if dp:
      metrics['clipped_fraction'] = sums['clipped'] / batch['inputs'].shape[0]
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
