"""Compiled-kernel check for the GPU machine: Pallas prefill (forward + gradients) and decode kernels against the
pure-jnp reference in bf16, printing the max error relative to max|reference| (expect a few 1e-3).

  python bench/gpu_check_sparse_attention.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax, jax.numpy as jnp, numpy as np
from pallas_kernels.sparse_attention import sparse_attention, sparse_attention_reference, sparse_decode_attention
print(jax.devices())
for (B, T, N, K, H, window, ng) in [(2, 1000, 8, 2, 128, None, 0), (1, 4096, 8, 8, 64, 256, 4)]:
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (B, T, N, H), jnp.bfloat16); k = jax.random.normal(ks[1], (B, T, K, H), jnp.bfloat16)
  v = jax.random.normal(ks[2], (B, T, K, H), jnp.bfloat16); do = jax.random.normal(ks[3], (B, T, N, H), jnp.bfloat16)
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)); seg = jnp.ones((B, T), jnp.int32)
  def run(fn):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, pos, pos, seg, seg, window=window, num_global=ng), q, k, v)
    return (out,) + vjp(do)
  got = jax.jit(lambda: run(sparse_attention))(); want = jax.jit(lambda: run(sparse_attention_reference))()
  for name, a, b in zip(['out', 'dq', 'dk', 'dv'], got, want):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    print('prefill', T, window, name, float(np.abs(a - b).max() / np.abs(b).max()))
  qd = q[:, -1:]; qp = pos[:, -1:]; qs = seg[:, -1:]
  a = np.asarray(jax.jit(lambda: sparse_decode_attention(qd, k, v, qp, pos, qs, seg, window=window, num_global=ng))(), np.float32)
  b = np.asarray(sparse_attention_reference(qd, k, v, qp, pos, qs, seg, window=window, num_global=ng), np.float32)
  print('decode', T, window, float(np.abs(a - b).max() / np.abs(b).max()))
