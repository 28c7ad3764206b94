"""RoPE (HF LLaMA rotate_half convention, linear scaling) and the XL sinusoid against closed forms."""
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.model import apply_rope, sinusoid_embedding
from tests.model import oracles
from tests.model.helpers import jit

rope = jit(apply_rope, static_argnames=('theta', 'scaling_factor'))


@pytest.mark.parametrize('theta,factor', [(10000.0, 1.0), (10000.0, 4.0), (100000.0, 4.0)])
def test_rope_matches_closed_form(theta, factor):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
  pos = rng.integers(0, 2000, size=(2, 5)).astype(np.int32)
  out = rope(jnp.asarray(x), jnp.asarray(pos), theta=theta, scaling_factor=factor)
  # Angles reach ~2000 rad, where float32 argument rounding alone is ~1e-4.
  np.testing.assert_allclose(out, oracles.rope(x, pos, theta, factor), atol=5e-4)


def test_rope_small_positions_exact_and_dtype_kept():
  x = np.random.default_rng(1).normal(size=(1, 6, 2, 16)).astype(np.float32)
  pos = np.arange(6, dtype=np.int32)[None]
  np.testing.assert_allclose(rope(x, pos, scaling_factor=4.0), oracles.rope(x, pos, factor=4.0),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(rope(x, np.zeros_like(pos)), x)  # position 0 is the identity
  assert rope(jnp.asarray(x, jnp.bfloat16), pos).dtype == jnp.bfloat16


@pytest.mark.parametrize('factor', [1.0, 4.0])
def test_rope_scores_depend_only_on_relative_position(factor):
  rng = np.random.default_rng(2)
  q, k = rng.normal(size=(2, 1, 1, 1, 8)).astype(np.float32)

  def score(pq, pk):
    rq = rope(q, np.array([[pq]]), scaling_factor=factor)
    rk = rope(k, np.array([[pk]]), scaling_factor=factor)
    return float(jnp.sum(rq * rk))

  for pq, pk in [(5, 2), (3, 3), (7, 0)]:
    base = score(pq, pk)
    for shift in (1, 17, 300):
      assert score(pq + shift, pk + shift) == pytest.approx(base, abs=1e-4)
  assert abs(score(5, 2) - score(5, 4)) > 1e-3  # and it does depend on the difference


def test_sinusoid_embedding_matches_transformer_xl_formula():
  d = np.array([0, 1, 5, 37])
  out = jit(sinusoid_embedding, static_argnums=1)(jnp.asarray(d), 12)
  np.testing.assert_allclose(out, np.stack([oracles.sinusoid(x, 12) for x in d]), atol=1e-5)
