"""Mixture-of-Head routing: top-k selection, gates and the load-balance loss."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.model import HeadRouter, load_balance_loss
from tests.model import oracles
from tests.model.helpers import init_shapes, jit, random_like


@pytest.mark.parametrize('num_heads,num_shared,top_k', [(4, 0, 2), (6, 1, 3), (5, 2, 1), (4, 0, 4)])
def test_router_gates_match_oracle(num_heads, num_shared, top_k):
  rng = np.random.default_rng(num_heads + top_k)
  x = rng.normal(size=(2, 7, 8)).astype(np.float32)
  valid = np.ones((2, 7), bool)
  router = HeadRouter(num_heads, num_shared, top_k)
  params = random_like(init_shapes(router, x, valid), std=1.0)
  gates, _ = jit(router.apply)({'params': params}, x, valid)
  gates = np.asarray(gates)
  want, probs = oracles.router(x, np.asarray(params['kernel']), num_shared, top_k)
  np.testing.assert_allclose(gates, want, rtol=1e-5, atol=1e-6)

  routed = gates[..., num_shared:]
  np.testing.assert_array_equal(gates[..., :num_shared], 1.0)
  np.testing.assert_array_equal((routed != 0).sum(-1), top_k)  # exactly top_k routed heads, rest exactly 0
  np.testing.assert_allclose(routed.sum(-1), top_k, rtol=1e-6)
  top = np.argsort(-probs, axis=-1)[..., :top_k]
  for b in range(2):
    for t in range(7):
      assert set(np.nonzero(routed[b, t])[0]) == set(top[b, t])


def test_load_balance_loss_hand_values():
  balance_loss = jit(load_balance_loss, static_argnums=3)
  uniform = np.full((1, 2, 4), 0.25, np.float32)
  spread = np.array([[[1, 1, 0, 0], [0, 0, 1, 1]]], bool)  # every head used once
  valid = np.ones((1, 2), bool)
  assert float(balance_loss(uniform, spread, valid, 2)) == pytest.approx(1.0)
  # Skewed: both tokens pick heads 0 and 1. f = [.5, .5, 0, 0], P = [.4, .3, .2, .1]: 4 * (.2 + .15) = 1.4.
  skewed = np.tile(np.array([0.4, 0.3, 0.2, 0.1], np.float32), (1, 2, 1))
  same = np.array([[[1, 1, 0, 0], [1, 1, 0, 0]]], bool)
  assert float(balance_loss(skewed, same, valid, 2)) == pytest.approx(1.4, rel=1e-6)
  # An invalid (padding) token changes nothing.
  probs = np.concatenate([skewed, np.array([[[0.0, 0.0, 0.0, 1.0]]], np.float32)], 1)
  active = np.concatenate([same, np.array([[[0, 0, 1, 1]]], bool)], 1)
  assert float(balance_loss(probs, active, np.array([[1, 1, 0]], bool), 2)) == pytest.approx(1.4, rel=1e-6)


def test_router_aux_loss_uniform_and_skewed():
  eye = np.eye(4, dtype=np.float32)
  apply = jit(HeadRouter(num_heads=4, num_shared_heads=0, top_k=1).apply)
  valid = np.array([[1, 1, 1, 1, 0]], bool)
  # Token i is a one-hot on feature i and prefers head i: each head used once, mean probs uniform -> 1.0.
  x = np.concatenate([eye, eye[:1]])[None]
  _, loss = apply({'params': {'kernel': jnp.asarray(3.0 * eye)}}, x, valid)
  assert float(loss) == pytest.approx(1.0, rel=1e-6)
  # Every token has logits [ln 3, 0, 0, 0]: all pick head 0 with p0 = 3 / 6, so loss = 4 * 1 * 0.5 = 2.0.
  kernel = np.zeros((4, 4), np.float32)
  kernel[:, 0] = math.log(3.0)
  _, loss = apply({'params': {'kernel': jnp.asarray(kernel)}}, x, valid)
  assert float(loss) == pytest.approx(2.0, rel=1e-6)
