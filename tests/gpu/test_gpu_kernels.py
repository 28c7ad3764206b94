"""The GPU tier: compiled kernels on a real GPU against the pure-jnp references (skipped, with the reason, where JAX
sees no GPU; `python bench/device_check.py` runs them on a lent machine).

bf16 tolerances are relative to max |reference|: the kernels round probabilities (and ds in the backward) to bf16
before their matmuls, as flash attention does, while the references stay in float32 until the final cast; sums
of up to T such terms give errors of a few 1e-3 of the largest value, so 2e-2 is the bound (3e-2 for cuDNN, whose
backward accumulates in a different order).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import sharding as sharding_lib
from dsjax.model import Transformer
from dsjax.model import attention_kernels
from dsjax.model import paged_attention
from dsjax.sample import sampler as sampler_lib
from pallas_kernels.routed_attention import routed_attention, routed_attention_reference
from pallas_kernels.sparse_attention import sparse_attention, sparse_attention_reference, sparse_decode_attention
from tests.model import helpers

pytestmark = pytest.mark.gpu

BF16_TOL = 2e-2


def relative_errors(got, want):
  return [float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max()
                / max(float(np.abs(np.asarray(b, np.float32)).max()), 1e-6)) for a, b in zip(got, want)]


def packed(B, T, doc_lengths=None):
  """Positions and segments [B, T]: one document per row, or the given lengths packed (then padding, segment 0)."""
  if doc_lengths is None:
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return pos, jnp.ones((B, T), jnp.int32)
  pos, seg = helpers.packed_row(doc_lengths, T)
  return jnp.asarray(np.tile(pos, (B, 1))), jnp.asarray(np.tile(seg, (B, 1)))


CASES = [  # B, T, N, K, H, window, num_global, softcap, documents
    (2, 1000, 8, 2, 128, None, 0, None, None),
    (1, 4096, 8, 8, 64, 256, 4, None, None),
    (1, 2048, 8, 4, 128, 512, 2, 30.0, [700, 1000, 300]),
]


@pytest.mark.parametrize('case', CASES, ids=lambda c: f'T{c[1]}-w{c[5]}-g{c[6]}-docs{c[8] is not None}')
@pytest.mark.parametrize('kind', ['sparse', 'routed'])
def test_compiled_prefill_kernels_match_reference(case, kind):
  B, T, N, K, H, window, num_global, softcap, documents = case
  keys = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(keys[0], (B, T, N, H), jnp.bfloat16)
  k, v = (jax.random.normal(key, (B, T, K, H), jnp.bfloat16) for key in keys[1:3])
  do = jax.random.normal(keys[3], (B, T, N, H), jnp.bfloat16)
  gates = (jax.random.uniform(keys[4], (B, T, N)) < 0.5).astype(jnp.float32) * 1.5
  pos, seg = packed(B, T, documents)
  kw = dict(window=window, num_global=num_global, softcap=softcap)
  fn, ref, extra = ((sparse_attention, sparse_attention_reference, ()) if kind == 'sparse' else
                    (routed_attention, routed_attention_reference, (gates,)))

  def run(f):
    out, vjp = jax.vjp(lambda q, k, v, *e: f(q, k, v, pos, pos, seg, seg, *e, **kw), q, k, v, *extra)
    return (out,) + vjp(do.astype(out.dtype))

  got = jax.jit(functools.partial(run, fn))()
  want = jax.jit(functools.partial(run, ref))()
  errors = relative_errors(got, want)
  assert max(errors) <= BF16_TOL, dict(zip(['out', 'dq', 'dk', 'dv', 'dgates'], errors))


@pytest.mark.parametrize('window,num_global,slots', [(None, 0, 4096), (256, 4, 300)])
def test_compiled_decode_kernel_reads_the_stacked_cache(window, num_global, slots):
  L, B, N, K, H = 3, 4, 16, 4, 128
  keys = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(keys[0], (B, 2, N, H), jnp.bfloat16)
  k, v = (jax.random.normal(key, (L, B, slots, K, H), jnp.bfloat16) for key in keys[1:])
  k_pos = jnp.asarray(np.stack([np.random.default_rng(b).permutation(slots) for b in range(B)]), jnp.int32)
  k_seg = jnp.ones((B, slots), jnp.int32).at[:, :7].set(-1)
  q_pos = jnp.full((B, 2), slots, jnp.int32).at[:, 1].add(1)
  q_seg = jnp.ones((B, 2), jnp.int32)
  kw = dict(window=window, num_global=num_global)
  got = jax.jit(lambda layer: sparse_decode_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, layer=layer, **kw))(
      jnp.int32(2))
  want = sparse_attention_reference(q, k[2], v[2], q_pos, k_pos, q_seg, k_seg, **kw)
  assert relative_errors([got], [want])[0] <= BF16_TOL


@pytest.mark.parametrize('window', [None, 128])
def test_cudnn_path_matches_reference(window):
  """The model's cuDNN path (one document per row, causal or a pure window) against the reference."""
  B, T, N, K, H = 2, 1024, 8, 2, 128
  keys = jax.random.split(jax.random.key(2), 4)
  q = jax.random.normal(keys[0], (B, T, N, H), jnp.bfloat16)
  k, v = (jax.random.normal(key, (B, T, K, H), jnp.bfloat16) for key in keys[1:3])
  do = jax.random.normal(keys[3], (B, T, N, H), jnp.bfloat16)
  pos, seg = packed(B, T)

  def run(f):
    out, vjp = jax.vjp(f, q, k, v)
    return (out,) + vjp(do)

  cudnn = lambda q, k, v: attention_kernels.self_attention('cudnn', q, k, v, pos, seg, window=window, num_global=0,
                                                           gates=None, platform='gpu')
  reference = lambda q, k, v: sparse_attention_reference(q, k, v, pos, pos, seg, seg, window=window)
  errors = relative_errors(jax.jit(lambda: run(cudnn))(), jax.jit(lambda: run(reference))())
  assert max(errors) <= 1.5 * BF16_TOL, errors


@pytest.mark.parametrize('kind', ['full', 'routed_sparse'])
def test_train_step_with_kernels_on_all_local_devices(kind):
  """impl='auto' (the kernels) against impl='reference', one train step on a mesh of every local GPU."""
  from tests.train.test_sharded_step import random_batch, run_step, tiny_cfg  # pylint: disable=g-import-not-at-top
  results = {}
  for impl in ('reference', 'auto'):
    cfg = tiny_cfg(jax.device_count(), 1, 1, kind='routed' if kind == 'routed_sparse' else kind)
    cfg.train.batch_size = 8 * jax.device_count()
    cfg.model.attention.update(dict(impl=impl, sparse_mask=kind == 'routed_sparse', window=8, num_global=2))
    results[impl] = run_step(cfg, random_batch(batch=8 * jax.device_count()))
  (ref_state, ref_metrics, _), (state, metrics, _) = results['reference'], results['auto']
  np.testing.assert_allclose(float(metrics['loss']), float(ref_metrics['loss']), rtol=1e-5)
  for got, want in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(ref_state.params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('kind', ['full', 'sparse'])
def test_sampler_with_kernels_matches_reference(kind):
  """Greedy decoding through the decode kernel (full or ring cache) against the reference path, float32."""
  cfg = {impl: helpers.tiny_config(kind, attention=dict(impl=impl)) for impl in ('reference', 'auto')}
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = helpers.random_like(helpers.init_shapes(Transformer(cfg['reference']), tokens, tokens), seed=1, std=0.5)
  mesh_cfg = helpers.base_config().mesh
  placement = sharding_lib.Placement.of(sharding_lib.make_mesh(mesh_cfg), mesh_cfg)
  prompts = [[5, 9, 14, 3, 9, 14, 3, 9], [7, 2], list(range(1, 40))]
  outputs = {impl: sampler_lib.Sampler(Transformer(c), max_len=64, placement=placement).generate(
      params, prompts, jax.random.key(0), max_new_tokens=12) for impl, c in cfg.items()}
  assert outputs['auto'] == outputs['reference']


@pytest.mark.parametrize('dtype,tol', [(jnp.bfloat16, BF16_TOL), (jnp.float32, 1e-2)])
def test_compiled_paged_decode_kernel_matches_reference(dtype, tol):
  """JAX's Triton paged kernel (dsjax.model.paged_attention, path 'pallas') against the gather reference over a
  shuffled page pool: rows of different lengths (one empty, one on a partial page), GQA 4. float32 gets 1e-2:
  Triton's dot runs float32 in TF32 at default precision."""
  B, N, K, H, bs, M = 6, 16, 4, 128, 16, 256
  P = 1 + B * M
  keys = jax.random.split(jax.random.key(3), 3)
  q = jax.random.normal(keys[0], (B, N, H), dtype)
  k_pages, v_pages = (jax.random.normal(key, (K, P, bs, H), dtype) for key in keys[1:])
  table = jnp.asarray(np.random.default_rng(0).permutation(np.arange(1, P)).reshape(B, M), jnp.int32)
  lengths = jnp.asarray([4096, 0, 1, 3001, 17, 2048], jnp.int32)
  kernel, reason = paged_attention.paged_kernel('pallas', 'gpu', head_dim=H, page_size=bs, num_blocks=M,
                                                window=None, dtype=dtype)
  assert kernel == 'gpu_paged_attention', reason
  got = jax.jit(functools.partial(paged_attention.paged_decode_attention, path='pallas', platform='gpu'))(
      q, k_pages, v_pages, table, lengths)
  want = paged_attention.reference_paged_attention(q, k_pages, v_pages, table, lengths)
  assert got.dtype == dtype and np.all(np.asarray(got[1], np.float32) == 0)
  assert relative_errors([got], [want])[0] <= tol
