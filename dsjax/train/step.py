"""The train step: a pure function of (state, batch, rng) that the loop jits.

A batch is a dict of int32 arrays [batch, seq]: `inputs`, `targets`, `segment_ids` (0 = padding) and `positions`
(per-document), as produced by dsjax.data.pipeline. The step differentiates one loss_fn (dsjax/train/objective.py)
with one gradient strategy (dsjax/train/gradients.py, dsjax/privacy.py) over the trainable params only
(dsjax/train/partition.py); `make_train_step` assembles these from the config.
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
from dsjax.train import gradients
from dsjax.train import objective as objective_lib
from dsjax.train import optimizer as optimizer_lib
from dsjax.train import partition
from dsjax.train.state import TrainState

Batch = dict[str, jax.Array]
_NOISE_STREAM = 0x5EED  # fold_in tag of the strategy's noise key (dropout uses the step number directly)


def build_train_step(loss_fn: objective_lib.LossFn, optimizer: optax.GradientTransformation, mask: Any, *,
                     strategy: gradients.GradientStrategy = gradients.BatchGradient(), accum_steps: int = 1,
                     prepare: Callable[..., Batch] | None = None, use_dropout: bool = False) -> Callable[..., Any]:
  """Returns `train_step(state, batch, rng, *extras) -> (state, metrics)`.

  Gradients of `loss_fn` reach only the params `mask` marks trainable; the optimizer state covers only those. The
  batch is split into `accum_steps` microbatches (gradients summed, dsjax.train.gradients.accumulate); `prepare(micro,
  *extras)` runs on each first (distillation: the teacher's outputs; `extras` are the step's arguments after rng).
  Dropout RNG (`use_dropout`) is folded in per step and microbatch. A step whose loss or gradient norm is not finite
  leaves the state unchanged and counts in `state.nonfinite` (the loop stops past `train.max_nonfinite_steps`).
  """
  def train_step(state: TrainState, batch: Batch, rng: jax.Array, *extras: Any):
    trainable_mask = partition.trainable_mask(state.params, partition.ALL) if mask is None else mask
    trainable, frozen = partition.split(state.params, trainable_mask)

    def grads_fn(micro: Batch, micro_rng: jax.Array | None):
      micro = micro if prepare is None else prepare(micro, *extras)
      return strategy.grads(loss_fn, trainable, frozen, micro, micro_rng)

    dropout_rng = jax.random.fold_in(rng, state.step) if use_dropout else None
    grads, aux = gradients.accumulate(grads_fn, batch, dropout_rng, accum_steps)
    rows = batch['inputs'].shape[0]
    grads = strategy.finish(grads, jax.random.fold_in(jax.random.fold_in(rng, _NOISE_STREAM), state.step), rows)
    updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
    new_trainable = optax.apply_updates(trainable, updates)

    total_tokens = jnp.maximum((batch['segment_ids'] > 0).sum().astype(jnp.float32), 1.0)
    loss = aux['sums']['nll'] / total_tokens
    grad_norm = optax.tree.norm(optimizer_lib.without_correction_bias(grads))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_old = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(step=state.step + 1, params=partition.join(keep_old(new_trainable, trainable), frozen),
                           opt_state=keep_old(opt_state, state.opt_state),
                           nonfinite=jnp.where(finite, 0, state.nonfinite + 1))
    metrics = {'loss': loss, **{k: v / total_tokens for k, v in aux['sums'].items() if k not in ('nll', 'tokens')},
               **aux['means'], 'tokens': aux['sums']['tokens'], 'grad_norm': grad_norm,
               'skipped': (~finite).astype(jnp.float32), 'nonfinite_streak': new_state.nonfinite,
               **strategy.metrics(aux, rows)}
    return new_state, metrics

  return train_step


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, cfg: ml_collections.ConfigDict, *,
                    teacher: tuple[nn.Module, Any] | None = None, mask: Any = None) -> Callable[..., Any]:
  """The run's train step from its config: the language-model objective (dsjax/train/objective.py), distilled from
  `teacher` = (teacher_model, teacher_params) when given (dsjax/distill.py; the teacher params are the step's 4th
  argument, defaulting to the ones given here: jit with them as an argument, with their own in_shardings, so they are
  not baked in as constants), DP-SGD with `privacy.enabled` (dsjax/privacy.py), `train.grad_accum_steps`
  microbatches. `mask`: the trainable params (dsjax/train/partition.py; None = all).
  """
  objective = objective_lib.language_model(model, cfg)
  prepare = None
  if teacher is not None:
    distillation = distill.Distillation.from_config(cfg, teacher[0])
    objective, prepare = distillation.extend(objective), distillation.prepare
  use_dropout = cfg.model.dropout_rate > 0 or (cfg.lora.enabled and cfg.lora.dropout > 0)  # LoRA: adapter dropout
  step = build_train_step(objective.loss_fn, optimizer, mask, strategy=privacy.strategy_for_run(cfg) or
                          gradients.BatchGradient(), accum_steps=int(cfg.train.grad_accum_steps), prepare=prepare,
                          use_dropout=use_dropout)
  if teacher is None:
    return step
  return lambda state, batch, rng, teacher_params=teacher[1]: step(state, batch, rng, teacher_params)
