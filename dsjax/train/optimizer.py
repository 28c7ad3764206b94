"""The optax optimizer: clip_by_global_norm -> AdamW with a warmup + cosine schedule, no decay on norms/biases; and
the auxiliary-loss-free update of MoE correction biases (DeepSeek-V3 section 2.1.2), which bypasses all of that."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dsjax.model import moe


def learning_rate_schedule(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then cosine decay to `learning_rate * min_lr_ratio`."""
  warmup = min(optim_cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=optim_cfg.learning_rate,
      warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=optim_cfg.learning_rate * optim_cfg.min_lr_ratio,
  )


def weight_decay_mask(params: Any) -> Any:
  """True for matrices (`kernel`, `embedding`, LoRA's `lora_a`/`lora_b`); False for norm scales and biases
  (stacked or not)."""
  def decays(path, _):
    name = getattr(path[-1], 'key', str(path[-1]))
    return name in ('kernel', 'embedding', 'lora_a', 'lora_b')
  return jax.tree_util.tree_map_with_path(decays, params)


CORRECTION_BIAS = moe.BIAS_NAME  # 'e_score_correction_bias'


def correction_bias_labels(params: Any) -> Any:
  """'bias' for the leaves of MoE correction biases (`e_score_correction_bias` anywhere in the path: stacked or not,
  boxed or not), 'adamw' for every other leaf."""
  def label(path, _):
    return 'bias' if any(getattr(key, 'key', None) == CORRECTION_BIAS for key in path) else 'adamw'
  return jax.tree_util.tree_map_with_path(label, params)


def without_correction_bias(grads: Any) -> Any:
  """`grads` with the correction biases' entries zeroed: their "gradient" is an expert-load signal, not part of the
  gradient whose norm is logged and guarded."""
  return jax.tree.map(lambda g, label: jnp.zeros_like(g) if label == 'bias' else g, grads,
                      correction_bias_labels(grads))


def has_correction_bias(params: Any) -> bool:
  """Whether the (trainable) params hold an MoE correction bias anywhere."""
  return any(label == 'bias' for label in jax.tree_util.tree_leaves(correction_bias_labels(params)))


def bias_update(rate: float) -> optax.GradientTransformation:
  """bias -= rate * sign(gradient). The MoE's backward gives the bias the gradient load - mean(load) (summed over
  accumulated microbatches: the sign of the sum is that of the whole batch), so an over-loaded expert's bias falls
  and an under-loaded one's rises by `rate`, once per step. rate 0: the bias stays frozen."""
  if rate <= 0:
    return optax.set_to_zero()
  return optax.chain(optax.scale_by_sign(), optax.scale(-rate))


def make_optimizer(optim_cfg: ml_collections.ConfigDict, total_steps: int,
                   bias_update_rate: float = 0.0) -> optax.GradientTransformation:
  """The training optimizer; its state mirrors the (fp32 master) params' dtype. The train step gives it only the
  trainable params (dsjax/train/partition.py), so frozen params have no optimizer state.

  MoE correction biases (`e_score_correction_bias` leaves, `correction_bias_labels`) get `bias_update(
  bias_update_rate)` (pass `model.moe.bias_update_rate`; 0: frozen) and neither AdamW, weight decay nor clipping (nor
  do they count in the clipping norm). For params without such leaves the optimizer and its state are exactly the
  clip -> AdamW chain (checkpoints of dense models keep their layout).
  """
  adamw = _clipped_adamw(optim_cfg, total_steps)
  split = optax.multi_transform({'adamw': adamw, 'bias': bias_update(bias_update_rate)}, correction_bias_labels)

  def init(params):
    return split.init(params) if has_correction_bias(params) else adamw.init(params)

  def update(updates, state, params=None):
    # Which branch is static: it depends on the tree's paths only, not on values.
    if has_correction_bias(updates):
      return split.update(updates, state, params)
    return adamw.update(updates, state, params)

  return optax.GradientTransformation(init, update)


def _clipped_adamw(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  parts = []
  if optim_cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
  parts.append(optax.adamw(
      learning_rate=learning_rate_schedule(optim_cfg, total_steps),
      b1=optim_cfg.b1,
      b2=optim_cfg.b2,
      eps=optim_cfg.eps,
      weight_decay=optim_cfg.weight_decay,
      mask=weight_decay_mask,
  ))
  return optax.chain(*parts)
