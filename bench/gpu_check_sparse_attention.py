"""Compiled-kernel check for an accelerator machine: the Pallas prefill kernels (sparse and routed, forward and
gradients) and the decode kernel against the pure-jnp references in bf16, printing the max error relative to
max|reference| (expect a few 1e-3; the interpret-mode tests cover the same math on CPU).

  python bench/gpu_check_sparse_attention.py
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pallas_kernels.routed_attention import routed_attention, routed_attention_reference  # pylint: disable=g-import-not-at-top
from pallas_kernels.sparse_attention import sparse_attention, sparse_attention_reference, sparse_decode_attention

CASES = [  # B, T, N, K, H, window, num_global, softcap
    (2, 1000, 8, 2, 128, None, 0, None),
    (1, 4096, 8, 8, 64, 256, 4, None),
    (1, 2048, 8, 4, 128, 512, 2, 30.0),
]


def relative_errors(got, want):
  return [float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max()
                / np.abs(np.asarray(b, np.float32)).max()) for a, b in zip(got, want)]


def main() -> None:
  print(jax.devices())
  for B, T, N, K, H, window, num_global, softcap in CASES:
    keys = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(keys[0], (B, T, N, H), jnp.bfloat16)
    k, v = (jax.random.normal(key, (B, T, K, H), jnp.bfloat16) for key in keys[1:3])
    do = jax.random.normal(keys[3], (B, T, N, H), jnp.bfloat16)
    gates = (jax.random.uniform(keys[4], (B, T, N)) < 0.5).astype(jnp.float32) * 1.5
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    seg = jnp.ones((B, T), jnp.int32)
    kw = dict(window=window, num_global=num_global, softcap=softcap)

    def run(fn, *extra):
      out, vjp = jax.vjp(lambda q, k, v, *extra: fn(q, k, v, pos, pos, seg, seg, *extra, **kw), q, k, v, *extra)
      return (out,) + vjp(do.astype(out.dtype))

    label = f'T={T} window={window} softcap={softcap}'
    for name, fn, ref, extra in (('sparse', sparse_attention, sparse_attention_reference, ()),
                                 ('routed', routed_attention, routed_attention_reference, (gates,))):
      errors = relative_errors(jax.jit(lambda fn=fn, extra=extra: run(fn, *extra))(),
                               jax.jit(lambda ref=ref, extra=extra: run(ref, *extra))())
      print(name, label, dict(zip(['out', 'dq', 'dk', 'dv', 'dgates'], errors)))
    qd, qp, qs = q[:, -1:], pos[:, -1:], seg[:, -1:]
    got = jax.jit(lambda: sparse_decode_attention(qd, k, v, qp, pos, qs, seg, **kw))()
    want = sparse_attention_reference(qd, k, v, qp, pos, qs, seg, **kw)
    print('decode', label, relative_errors([got], [want])[0])


if __name__ == '__main__':
  main()
