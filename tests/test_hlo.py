"""dsjax/hlo.py against programs whose buffers are known: a loop over stacked weights slices a weight-sized copy
per iteration (what the decode loop did before its params were unstacked); the same loop over separate weights
writes none."""
import jax
import jax.numpy as jnp

from dsjax import hlo

L, K, M = 3, 256, 512


def weight_sized(ops):
  return [op for op in ops if op.elements >= K * M]


def test_a_loop_over_stacked_weights_writes_a_slice_per_iteration():
  def scanned(ws, x):
    def body(i, x):
      return jnp.tanh(x @ jax.lax.dynamic_index_in_dim(ws, i % L, keepdims=False) * 2.0)[:, :K]
    return jax.lax.fori_loop(0, 8, body, x)
  text = jax.jit(scanned).lower(jax.ShapeDtypeStruct((L, K, M), jnp.float32),
                                jax.ShapeDtypeStruct((2, K), jnp.float32)).compile().as_text()
  found = weight_sized(hlo.loop_buffers(text))
  assert found and all(op.shape == (K, M) and op.computation != hlo.parse(text)[2] for op in found), found


def test_a_loop_over_separate_weights_writes_none():
  def unrolled(ws, x):
    def body(i, x):
      for w in ws:
        x = jnp.tanh(x @ w * 2.0)[:, :K]
      return x
    return jax.lax.fori_loop(0, 8, body, x)
  text = jax.jit(unrolled).lower([jax.ShapeDtypeStruct((K, M), jnp.float32)] * L,
                                 jax.ShapeDtypeStruct((2, K), jnp.float32)).compile().as_text()
  loop = hlo.loop_buffers(text)
  assert sum(op.shape == (2, M) for op in loop) >= L  # the loop body was found: a matmul result per weight
  assert weight_sized(loop) == [] and weight_sized(hlo.top_level_ops(text)) == []
