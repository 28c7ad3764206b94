"""The attention mask as an explicit set of visible keys, directly and through gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.model import make_attention_mask, reference_attention
from tests.model.helpers import jit, random_packed

make_mask = jit(make_attention_mask, static_argnames=('window', 'num_global'))


def visible_set(qp, qs, kpos, kseg, window, num_global):
  """{same doc, q_pos - window < k_pos <= q_pos} | {same doc, k_pos < num_global, k_pos <= q_pos}."""
  same = {j for j in range(len(kpos)) if kseg[j] == qs}
  if window is None:
    return {j for j in same if kpos[j] <= qp}
  recent = {j for j in same if qp - window < kpos[j] <= qp}
  sinks = {j for j in same if kpos[j] < num_global and kpos[j] <= qp}
  return recent | sinks


def random_case(seed, batch=3, t_len=12, mem=0):
  rng = np.random.default_rng(seed)
  q_pos, q_seg = random_packed(rng, batch, t_len)
  if mem:  # memory slots before the row: some empty (-1), the rest continuing the first document
    m_pos = np.tile(np.arange(-mem, 0), (batch, 1))
    m_seg = np.where(np.arange(mem) < mem // 2, -1, 1)[None].repeat(batch, 0)
    q_pos = np.where(q_seg == 1, q_pos + mem, q_pos)
    m_pos = m_pos + mem
    return q_pos, np.concatenate([m_pos, q_pos], 1), q_seg, np.concatenate([m_seg, q_seg], 1)
  return q_pos, q_pos, q_seg, q_seg


@pytest.mark.parametrize('window,num_global', [(None, 0), (3, 2), (1, 0), (4, 1), (100, 3)])
@pytest.mark.parametrize('mem', [0, 4])
def test_mask_equals_visible_sets(window, num_global, mem):
  for seed in range(3):
    q_pos, k_pos, q_seg, k_seg = random_case(seed, mem=mem)
    mask = np.asarray(make_mask(q_pos, k_pos, q_seg, k_seg, window=window, num_global=num_global))
    for b in range(q_pos.shape[0]):
      for i in range(q_pos.shape[1]):
        got = set(np.nonzero(mask[b, i])[0])
        assert got == visible_set(q_pos[b, i], q_seg[b, i], k_pos[b], k_seg[b], window, num_global), (b, i)


def test_padding_sees_only_padding_and_empty_memory_is_never_seen():
  q_pos, k_pos, q_seg, k_seg = random_case(5, mem=4)
  mask = np.asarray(make_mask(q_pos, k_pos, q_seg, k_seg, window=3, num_global=1))
  assert not mask[:, :, :2].any()  # the empty (-1) slots
  pad_q = q_seg == 0
  assert (mask & ~(k_seg[:, None, :] == 0))[pad_q].sum() == 0


@pytest.mark.parametrize('window,num_global', [(None, 0), (3, 2), (2, 0)])
def test_value_gradients_are_nonzero_exactly_for_visible_keys(window, num_global):
  rng = np.random.default_rng(7)
  q_pos, k_pos, q_seg, k_seg = random_case(3, batch=1, t_len=10)
  q = rng.normal(size=(1, 10, 2, 4)).astype(np.float32)
  k = rng.normal(size=(1, 10, 1, 4)).astype(np.float32)
  v = rng.normal(size=(1, 10, 1, 4)).astype(np.float32)

  def out(v):
    return reference_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, window=window, num_global=num_global)

  jac = np.asarray(jit(jax.jacrev(out))(jnp.asarray(v)))  # [1, T, N, H, 1, S, K, H]
  touched = np.abs(jac).sum(axis=(2, 3, 4, 6, 7))[0] > 0  # [T, S]
  for i in range(10):
    assert set(np.nonzero(touched[i])[0]) == visible_set(q_pos[0, i], q_seg[0, i], k_pos[0], k_seg[0],
                                                         window, num_global), i
