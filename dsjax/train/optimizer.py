"""The optax optimizer: clip_by_global_norm -> AdamW with a warmup + cosine schedule, no decay on norms/biases."""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax


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


def make_optimizer(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """The training optimizer; its state mirrors the (fp32 master) params' dtype. The train step gives it only the
  trainable params (dsjax/train/partition.py), so frozen params have no optimizer state."""
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
