"""reference_attention and the Attention module against brute-force NumPy oracles, for every kind."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.model import Attention, RelativeBias, attend, reference_attention
from tests.model import oracles
from tests.model.helpers import init_shapes, jit, random_like, random_packed, tiny_config

# (batch, T, memory slots, N, K, H): MHA, GQA (4, 2) and MQA (4, 1).
SHAPES = [(2, 8, 0, 4, 4, 8), (2, 7, 0, 4, 2, 4), (1, 9, 5, 4, 1, 4), (2, 6, 3, 4, 2, 8)]
MASKS = {'full': (None, 0), 'sparse': (3, 2), 'window1': (1, 0)}


def make_inputs(seed, batch, t_len, mem, n, kv, h):
  """Packed rows with padding; `mem` extra key slots before them (some empty, the rest continuing doc 1)."""
  rng = np.random.default_rng(seed)
  q_pos, q_seg = random_packed(rng, batch, t_len)
  q_pos = np.where(q_seg == 1, q_pos + mem, q_pos)
  m_seg = np.where(np.arange(mem) < mem // 2, -1, 1)[None].repeat(batch, 0)
  k_pos = np.concatenate([np.arange(mem)[None].repeat(batch, 0), q_pos], 1).astype(np.int32)
  k_seg = np.concatenate([m_seg, q_seg], 1).astype(np.int32)
  s_len = t_len + mem
  q = rng.normal(size=(batch, t_len, n, h)).astype(np.float32)
  k = rng.normal(size=(batch, s_len, kv, h)).astype(np.float32)
  v = rng.normal(size=(batch, s_len, kv, h)).astype(np.float32)
  return rng, q, k, v, q_pos, k_pos, q_seg, k_seg


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('mask', list(MASKS))
@pytest.mark.parametrize('variant', ['plain', 'gated', 'xl'])
def test_reference_attention_matches_oracle(shape, mask, variant):
  rng, q, k, v, q_pos, k_pos, q_seg, k_seg = make_inputs(sum(shape), *shape)
  window, num_global = MASKS[mask]
  n, h, s_len = shape[3], shape[5], k.shape[1]
  gates, rel, extra = None, None, {}
  if variant == 'gated':  # routed-style gates: some heads exactly 0
    gates = rng.uniform(0.5, 2.0, size=q.shape[:3]) * (rng.uniform(size=q.shape[:3]) < 0.6)
    gates = gates.astype(np.float32)
  if variant == 'xl':
    r = rng.normal(size=(s_len, n, h)).astype(np.float32)
    u, vb = rng.normal(size=(2, n, h)).astype(np.float32)
    rel = RelativeBias(r, u, vb)
    extra = dict(r_of=lambda d: r[d], u=u, vb=vb)
  got = jit(reference_attention, static_argnames=('window', 'num_global'))(
      q, k, v, q_pos, k_pos, q_seg, k_seg, window=window, num_global=num_global, gates=gates, rel=rel)
  want = oracles.attention(q, k, v, q_pos, k_pos, q_seg, k_seg, window, num_global, gates, **extra)
  assert got.shape == q.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_query_without_visible_keys_gives_zeros_and_finite_grads():
  _, q, k, v, q_pos, k_pos, q_seg, k_seg = make_inputs(1, 1, 6, 0, 2, 1, 4)
  q_seg = q_seg.copy()
  q_seg[0, 0] = 7  # a segment no key has

  def f(q, k, v):
    return reference_attention(q, k, v, q_pos, k_pos, q_seg, k_seg)

  out = jit(f)(q, k, v)
  np.testing.assert_array_equal(out[0, 0], 0.0)
  grads = jit(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2)))(q, k, v)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_attend_dispatch():
  _, q, k, v, q_pos, k_pos, q_seg, k_seg = make_inputs(0, 1, 4, 0, 2, 1, 4)
  np.testing.assert_array_equal(jit(attend, static_argnames='impl')(q, k, v, q_pos, k_pos, q_seg, k_seg),
                                jit(reference_attention)(q, k, v, q_pos, k_pos, q_seg, k_seg))
  with pytest.raises(ValueError, match='impl'):
    attend(q, k, v, q_pos, k_pos, q_seg, k_seg, impl='nope')


def test_bfloat16_inputs_keep_dtype_and_stay_close():
  _, q, k, v, q_pos, k_pos, q_seg, k_seg = make_inputs(3, 2, 8, 0, 4, 2, 8)
  bf = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
  got = jit(reference_attention)(*bf, q_pos, k_pos, q_seg, k_seg)
  assert got.dtype == jnp.bfloat16
  want = oracles.attention(*(np.asarray(a, np.float32) for a in bf), q_pos, k_pos, q_seg, k_seg)
  # Softmax is float32; the probabilities and the output are rounded to bf16 (2^-8 relative) once each.
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2)


# (kind, num_kv_heads): every kind, GQA (4 query heads on 2 kv heads) and MQA (on 1).
MODULE_CASES = [('full', 2), ('full', 1), ('sparse', 1), ('routed', 2), ('routed_sparse', 1), ('xl', 2),
                ('xl_mem_sparse', 1)]


@pytest.mark.parametrize('kind,kv_heads', MODULE_CASES)
def test_attention_module_matches_oracle(kind, kv_heads):
  cfg = tiny_config(kind, num_kv_heads=kv_heads, positions=dict(rope_scaling_factor=4.0))
  mem = 4 if kind.startswith('xl_mem') else 0
  rng = np.random.default_rng(kv_heads)
  batch, t_len, d = 2, 8, cfg.hidden_size
  pos, seg = random_packed(rng, batch, t_len)
  x = rng.normal(size=(batch, t_len, d)).astype(np.float32)
  memory = None
  if mem:
    pos = np.where(seg == 1, pos + mem, pos)
    memory = (rng.normal(size=(batch, mem, d)).astype(np.float32),
              np.arange(mem, dtype=np.int32)[None].repeat(batch, 0),
              np.where(np.arange(mem) < 1, -1, 1).astype(np.int32)[None].repeat(batch, 0))
  module = Attention(cfg)
  params = random_like(init_shapes(module, x, pos, seg, memory), seed=kv_heads, std=0.3)
  out, router_loss, _ = jit(module.apply)({'params': params}, x, pos, seg, memory)
  want = oracles.attention_module(params, cfg, x, pos, seg, memory)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
  assert (router_loss > 0) == kind.startswith('routed')
