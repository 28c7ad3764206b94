"""RMSNorm, SwiGLU MLP and the embedder against NumPy."""
import jax.numpy as jnp
import numpy as np

from dsjax.model import MLP, Embedder, RMSNorm
from tests.model import oracles
from tests.model.helpers import init_shapes, jit, random_like


def test_rmsnorm_matches_numpy_and_computes_in_float32():
  x = np.random.default_rng(0).normal(size=(2, 3, 16)).astype(np.float32) * 5
  norm = RMSNorm(eps=1e-5)
  params = random_like(init_shapes(norm, x))
  out = jit(norm.apply)({'params': params}, x)
  np.testing.assert_allclose(out, oracles.rmsnorm(x, np.asarray(params['scale']), 1e-5), rtol=1e-5, atol=1e-6)

  out_bf16 = jit(RMSNorm(eps=1e-5, dtype=jnp.bfloat16).apply)({'params': params}, x.astype(jnp.bfloat16))
  assert out_bf16.dtype == jnp.bfloat16
  # Only the final cast rounds: within bf16 resolution (2^-8 relative) of the float64 result.
  np.testing.assert_allclose(np.asarray(out_bf16, np.float32),
                             oracles.rmsnorm(np.asarray(x.astype(jnp.bfloat16), np.float32),
                                             np.asarray(params['scale']), 1e-5), rtol=2 ** -8, atol=1e-3)


def test_swiglu_mlp_matches_numpy():
  x = np.random.default_rng(1).normal(size=(2, 5, 8)).astype(np.float32)
  mlp = MLP(hidden_size=8, mlp_dim=12)
  params = random_like(init_shapes(mlp, x), std=0.5)
  assert params['gate_proj']['kernel'].shape == (8, 12) and params['down_proj']['kernel'].shape == (12, 8)
  out = jit(mlp.apply)({'params': params}, x)
  np.testing.assert_allclose(out, oracles.mlp(oracles.to_np(params), x), rtol=1e-5, atol=1e-5)


def test_embedder_encode_decode():
  emb = Embedder(vocab_size=10, features=4)
  tokens = np.array([[1, 9, 0]])
  params = random_like(init_shapes(emb, tokens, method=Embedder.encode))
  table = np.asarray(params['embedding'])
  x = emb.apply({'params': params}, tokens, method=Embedder.encode)
  np.testing.assert_array_equal(x, table[tokens])
  logits = emb.apply({'params': params}, x, method=Embedder.decode)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, table[tokens] @ table.T, rtol=1e-5, atol=1e-6)
