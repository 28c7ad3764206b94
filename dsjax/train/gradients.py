"""Gradient strategies: how the train step turns a loss_fn and a batch into the gradient of the trainable params.

A strategy has two parts, so that accumulation can wrap any of them:
  grads(loss_fn, trainable, frozen, batch, rng) -> (gradient sum over the batch's rows, aux)
  finish(grads, key, rows) -> the gradient the optimizer gets (after all microbatches: DP-SGD adds its noise here)
and `metrics(aux, rows)` for what it wants logged. `aux` is the loss_fn's ({'sums', 'means'}) summed over pieces
(means averaged), plus anything the strategy counts itself.

  BatchGradient()               jax.grad of the batch loss (the default)
  dsjax.privacy.DpSgd(...)      per-example clipped gradients, Gaussian noise (DP-SGD)
  accumulate(grads_fn, ...)     microbatches in a lax.scan, summed; wraps any strategy's `grads`
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp

from dsjax.train import objective as objective_lib
from dsjax.train import partition

Batch = dict[str, Any]
GradsFn = Callable[[Batch, jax.Array | None], tuple[Any, dict[str, Any]]]


class GradientStrategy(Protocol):

  def grads(self, loss_fn: objective_lib.LossFn, trainable: Any, frozen: Any, batch: Batch,
            rng: jax.Array | None) -> tuple[Any, dict[str, Any]]:
    ...

  def finish(self, grads: Any, key: jax.Array, rows: int) -> Any:
    ...

  def metrics(self, aux: dict[str, Any], rows: int) -> dict[str, jax.Array]:
    ...


def loss_of_trainable(loss_fn: objective_lib.LossFn, frozen: Any) -> objective_lib.LossFn:
  """`loss_fn` as a function of the trainable part only (the frozen part closed over: no gradient, any dtype)."""
  return lambda trainable, batch, rng: loss_fn(partition.join(trainable, frozen), batch, rng)


@dataclasses.dataclass(frozen=True)
class BatchGradient:
  """The gradient of the batch's loss (its mean over the batch's tokens)."""

  def grads(self, loss_fn, trainable, frozen, batch, rng):
    return jax.grad(loss_of_trainable(loss_fn, frozen), has_aux=True)(trainable, batch, rng)

  def finish(self, grads: Any, key: jax.Array, rows: int) -> Any:
    del key, rows
    return grads

  def metrics(self, aux: dict[str, Any], rows: int) -> dict[str, jax.Array]:
    del aux, rows
    return {}


def microbatches(batch: Batch, num: int) -> Batch:
  """[B, ...] -> [num, B / num, ...], microbatch i holding rows i, i + num, ...: with the batch sharded in contiguous
  row blocks over devices, every device keeps its own rows in every microbatch (no data moves)."""
  def split(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)
  return jax.tree_util.tree_map(split, batch)


def accumulate(grads_fn: GradsFn, batch: Batch, rng: jax.Array | None, num: int) -> tuple[Any, dict[str, Any]]:
  """`grads_fn(batch, rng)` over `num` microbatches in a lax.scan, gradients and aux summed (aux means averaged);
  each microbatch is normalised by the whole batch's token count, so the sum equals the one-batch gradient (up to
  summation order) while only one microbatch's activations live at a time. Microbatch i's rng is fold_in(rng, i)."""
  if num == 1:
    return grads_fn(batch, rng)
  total_tokens = jnp.maximum((batch['segment_ids'] > 0).sum().astype(jnp.float32), 1.0)

  def one(index, micro):
    micro = {**micro, objective_lib.NUM_TOKENS: total_tokens, objective_lib.NUM_PIECES: num}
    return grads_fn(micro, None if rng is None else jax.random.fold_in(rng, index))

  def body(acc, xs):
    return jax.tree_util.tree_map(jnp.add, acc, one(*xs)), None

  split = microbatches(batch, num)
  shapes = jax.eval_shape(one, 0, jax.tree_util.tree_map(lambda x: x[0], split))
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  (grads, aux), _ = jax.lax.scan(body, zeros, (jnp.arange(num), split))
  aux['means'] = {k: v / num for k, v in aux['means'].items()}
  return grads, aux
