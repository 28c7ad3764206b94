"""Differentially private training (DP-SGD, Abadi et al. 2016) and its privacy accountant.

With `privacy.enabled` the train step uses the gradient strategy `DpSgd` (dsjax/train/gradients.py), which
replaces the batch gradient by

  g = (sum_i clip(g_i, C) + N(0, (sigma * C)^2 I)) / B

where g_i is the gradient of example i's own loss (its mean nll over its own non-padding tokens, plus the other
terms of the objective on that example alone), computed with jax.vmap over the rows of a (micro)batch,
clip(g, C) = g * min(1, C / ||g||) with ||.|| the global L2 norm over all parameters (optax's
`per_example_global_norm_clip`), C = privacy.l2_clip, sigma = privacy.noise_multiplier and B the rows of the whole
batch. With gradient accumulation every example is clipped in its microbatch, the clipped sums are accumulated,
and the noise is added once per step, so the step is the same mechanism for any train.grad_accum_steps (which
also bounds the memory of the per-example gradients: microbatch rows x parameters). The noised mean then goes
through the usual optimizer (global-norm clipping, AdamW): post-processing, which costs no
privacy. (optax.contrib.differentially_private_aggregate does clip + noise in one transform, but cannot be combined
with accumulation and keeps its key in the optimizer state; the formula here is the same.) The noise key is
derived from the step's rng and step number: the guarantee assumes the seed stays secret.

Accounting. `epsilon` composes `steps` Poisson-subsampled Gaussian mechanisms (sampling rate q, noise
multiplier sigma) with dp_accounting's RDP accountant and reports epsilon at `delta`.
CAVEAT: the pipeline does not Poisson-sample; it draws shuffled fixed-size batches (each epoch a permutation, packed
rows of data.seq_len). The reported epsilon assumes Poisson sampling at rate q = batch_size / training rows, the
common practice in DP-SGD papers, but it is not a proven bound for shuffled batches. The unit of privacy is one
packed row (an "example" here): a document longer than data.seq_len spans several rows, and a row may hold several
short documents, so document- or user-level guarantees need group privacy on top.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import dp_accounting
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dsjax.data import mixture
from dsjax.model import partitioning
from dsjax.train import gradients
from dsjax.train import objective as objective_lib


def per_example_grads(loss_fn: Callable[..., tuple[jax.Array, Any]], params: Any, examples: Any,
                      *args: Any) -> tuple[Any, Any]:
  """(grads, aux) of `loss_fn(params, example, *args) -> (loss, aux)` for every example: jax.vmap of jax.grad over
  the leading axis of `examples` and of each of `args` (None args allowed); params shared. Leaves [N, ...]. On a
  mesh the example axis stays on the batch's mesh axes (`spmd_axis_name`), also through the attention kernels'
  shard_map."""
  return jax.vmap(jax.grad(loss_fn, has_aux=True), in_axes=(None, 0) + (0,) * len(args),
                  spmd_axis_name=partitioning.batch_axes())(params, examples, *args)


def clip_and_sum(per_example_grads: Any, l2_clip: float) -> tuple[Any, jax.Array]:
  """Sum over the leading (example) axis of the per-example gradients, each first scaled to global L2 norm at most
  `l2_clip`; and the number of examples that were scaled down (int32). Leaves are [examples, ...]."""
  leaves, treedef = jax.tree_util.tree_flatten(per_example_grads)
  clipped_sum, num_clipped = optax.per_example_global_norm_clip(leaves, l2_clip)
  return jax.tree_util.tree_unflatten(treedef, clipped_sum), num_clipped


def noisy_mean(grad_sum: Any, key: jax.Array, l2_clip: float, noise_multiplier: float, batch_size: int) -> Any:
  """(grad_sum + N(0, (noise_multiplier * l2_clip)^2) per coordinate) / batch_size: the DP-SGD gradient, whose
  noise std is noise_multiplier * l2_clip / batch_size per coordinate. One key per leaf, split from `key`."""
  leaves, treedef = jax.tree_util.tree_flatten(grad_sum)
  keys = jax.random.split(key, len(leaves))
  std = noise_multiplier * l2_clip
  noised = [(g + std * jax.random.normal(k, g.shape, g.dtype)) / batch_size for g, k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(treedef, noised)


@dataclasses.dataclass(frozen=True)
class DpSgd:
  """The DP-SGD gradient strategy: each example's gradient (its own loss) clipped to `l2_clip`, summed; once per
  step (after any accumulation) Gaussian noise of std noise_multiplier * l2_clip added and the sum divided by the
  batch rows. Logs `clipped_fraction`, the share of examples whose gradient was scaled down."""
  l2_clip: float
  noise_multiplier: float

  def grads(self, loss_fn, trainable, frozen, batch, rng):
    rows = batch['inputs'].shape[0]
    examples = {k: v for k, v in batch.items() if k not in objective_lib.NORMALIZERS}  # each its own mean

    def example_loss(t, example, example_rng):
      return gradients.loss_of_trainable(loss_fn, frozen)(t, jax.tree_util.tree_map(lambda x: x[None], example),
                                                          example_rng)
    rngs = None if rng is None else jax.random.split(rng, rows)
    grads, aux = per_example_grads(example_loss, trainable, examples, rngs)
    clipped_sum, num_clipped = clip_and_sum(grads, self.l2_clip)
    return clipped_sum, {'sums': {k: v.sum() for k, v in aux['sums'].items()},
                         'means': {k: v.mean() for k, v in aux['means'].items()},
                         'counts': {'clipped': num_clipped.astype(jnp.float32)}}

  def finish(self, grads: Any, key: jax.Array, rows: int) -> Any:
    return noisy_mean(grads, key, self.l2_clip, self.noise_multiplier, rows)

  def metrics(self, aux: dict[str, Any], rows: int) -> dict[str, jax.Array]:
    return {'clipped_fraction': aux['counts']['clipped'] / rows}


def strategy_for_run(cfg: ml_collections.ConfigDict) -> DpSgd | None:
  """DpSgd from the `privacy` section when privacy.enabled, else None."""
  if not cfg.privacy.enabled:
    return None
  return DpSgd(float(cfg.privacy.l2_clip), float(cfg.privacy.noise_multiplier))


def epsilon(steps: int, sampling_rate: float, noise_multiplier: float, delta: float) -> float:
  """Epsilon of `steps` compositions of the Poisson-subsampled Gaussian mechanism (rate `sampling_rate`, noise std
  `noise_multiplier` times the sensitivity) at `delta`, from dp_accounting's RDP accountant (add/remove-one
  neighbouring). inf when noise_multiplier is 0; 0 when no step was taken."""
  if not 0 < delta < 1:
    raise ValueError(f'delta={delta}: must be in (0, 1)')
  if not 0 <= sampling_rate <= 1:
    raise ValueError(f'sampling_rate={sampling_rate}: must be in [0, 1]')
  if steps <= 0 or sampling_rate == 0:
    return 0.0
  if noise_multiplier <= 0:
    return math.inf
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), int(steps))
  accountant = dp_accounting.rdp.RdpAccountant()  # its default grid of RDP orders
  accountant.compose(event)
  return float(accountant.get_epsilon(delta))


def count_train_rows(data_cfg: Any, tokenizer) -> int:
  """A lower bound on the packed rows of one pass over the training split: ceil(next-token pairs / seq_len), the
  pairs of a document [bos] + encode(text) + [eos] being its length + 1. Packing pads some rows, so the true count
  is a little higher; the lower bound overstates the sampling rate and hence epsilon (conservative). Tokenizes the
  whole split once."""
  pairs = sum(len(tokenizer.encode(doc.text)) + 1 for doc in mixture.load_split(data_cfg, 'train'))
  return max(1, int(np.ceil(pairs / int(data_cfg.seq_len))))


def report(cfg: Any, steps: int, train_rows: int) -> dict[str, float]:
  """The run's privacy summary: epsilon at privacy.delta after `steps` steps of train.batch_size rows drawn from
  `train_rows` rows (sampling rate batch_size / train_rows, Poisson sampling assumed; see the module caveat)."""
  rate = min(1.0, cfg.train.batch_size / max(train_rows, 1))
  return {'epsilon': epsilon(steps, rate, cfg.privacy.noise_multiplier, cfg.privacy.delta),
          'delta': float(cfg.privacy.delta), 'noise_multiplier': float(cfg.privacy.noise_multiplier),
          'steps': int(steps), 'sampling_rate': rate, 'l2_clip': float(cfg.privacy.l2_clip),
          'train_rows': int(train_rows)}


class PrivacyReport:
  """A training-loop hook (dsjax/train/hooks.py): at the end of a DP-SGD run, epsilon of all the steps taken
  (`report`), printed after the final eval and kept as `summary['privacy']`. Counting the training rows tokenizes
  the whole training split once."""

  def on_step(self, run: Any, step: int) -> None:
    del run, step

  def on_end(self, run: Any) -> None:
    cfg = run.cfg
    steps = int(run.state.step)
    run.summary['privacy'] = r = report(cfg, steps, count_train_rows(cfg.data, run.tokenizer))
    run.say(f'DP-SGD: epsilon {r["epsilon"]:.3f} at delta {cfg.privacy.delta:g} after {r["steps"]} steps (sampling '
            f'rate {r["sampling_rate"]:.3g}, noise multiplier {cfg.privacy.noise_multiplier:g}, Poisson sampling '
            'assumed: see dsjax/privacy.py)')
