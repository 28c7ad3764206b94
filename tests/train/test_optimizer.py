"""The optimizer: schedule shape against the closed form, weight decay skips norms, clipping bounds the update."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dsjax.train import optimizer as optimizer_lib


def optim_cfg(**overrides):
  cfg = ml_collections.ConfigDict(dict(learning_rate=1e-2, warmup_steps=10, min_lr_ratio=0.1, b1=0.9, b2=0.95,
                                       eps=1e-8, weight_decay=0.1, clip_norm=1.0))
  cfg.update(overrides)
  return cfg


def expected_lr(step, peak=1e-2, warmup=10, total=100, ratio=0.1):
  if step < warmup:
    return peak * step / warmup
  progress = (step - warmup) / (total - warmup)
  return peak * ratio + (peak - peak * ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize('step', [0, 1, 5, 10, 11, 50, 99, 100])
def test_schedule_is_linear_warmup_then_cosine(step):
  schedule = optimizer_lib.learning_rate_schedule(optim_cfg(), total_steps=100)
  np.testing.assert_allclose(float(schedule(step)), expected_lr(step), rtol=1e-5, atol=1e-9)


def test_weight_decay_applies_to_matrices_not_norms_or_biases():
  params = {'layers': {'attn_norm': {'scale': jnp.ones((2, 4))}, 'mlp': {'up_proj': {'kernel': jnp.ones((2, 4, 3))}},
                       'attention': {'u_bias': jnp.ones((2, 3))}},
            'embedder': {'embedding': jnp.ones((5, 4))}}
  opt = optimizer_lib.make_optimizer(optim_cfg(warmup_steps=0, min_lr_ratio=1.0), total_steps=10)
  state = opt.init(params)
  zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = opt.update(zero_grads, state, params)
  # With zero gradients AdamW's update is exactly -lr * weight_decay * param, and nothing for masked leaves.
  np.testing.assert_allclose(updates['layers']['mlp']['up_proj']['kernel'], -1e-2 * 0.1, rtol=1e-6)
  np.testing.assert_allclose(updates['embedder']['embedding'], -1e-2 * 0.1, rtol=1e-6)
  np.testing.assert_array_equal(updates['layers']['attn_norm']['scale'], 0.0)
  np.testing.assert_array_equal(updates['layers']['attention']['u_bias'], 0.0)


def test_gradients_are_clipped_to_the_global_norm_before_adam():
  params = {'w': {'kernel': jnp.zeros((3,))}}
  grads = {'w': {'kernel': jnp.array([300.0, 400.0, 0.0])}}  # global norm 500
  # eps = 1 makes Adam's first step depend on the gradient's scale: -lr * g / (|g| + 1) (bias-corrected).
  opt = optimizer_lib.make_optimizer(optim_cfg(warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0, eps=1.0),
                                     total_steps=10)
  updates, _ = opt.update(grads, opt.init(params), params)
  clipped = np.array([300.0, 400.0, 0.0]) / 500.0
  np.testing.assert_allclose(updates['w']['kernel'], -1e-2 * clipped / (np.abs(clipped) + 1.0), rtol=1e-5)
