"""Tests for the Mosaic TPU kernels (pallas_kernels.sparse_attention.tpu), run in TPU interpret mode on CPU."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_attention import tpu
from pallas_kernels.sparse_attention.reference import sparse_attention_mask
from pallas_kernels.sparse_attention.schedule import count_visited_blocks, make_schedule, transpose_schedule


def layout(rows, pad=0):
  """Positions/segments [B, T] of packed rows of documents (segments 1, 2, ...), each followed by `pad`
  kernel-padding tokens (segment -1, position 0)."""
  pos, seg = [], []
  for doc_lens in rows:
    pos.append(np.concatenate([np.arange(n) for n in doc_lens] + [np.zeros(pad)]))
    seg.append(np.concatenate([np.full(n, d + 1) for d, n in enumerate(doc_lens)] + [np.full(pad, -1)]))
  return jnp.asarray(np.stack(pos), jnp.int32), jnp.asarray(np.stack(seg), jnp.int32)


def routed_rows(rng, pos, seg, num_heads):
  """Per-head query metadata [B, N, T]: each head's rows are a random subset of the valid tokens,
  compacted to the front, the rest padded with segment -1. Returns (q_pos, q_seg, q_index)."""
  B, T = pos.shape
  out = np.zeros((3, B, num_heads, T), np.int32)
  out[1] = -1
  for b in range(B):
    for n in range(num_heads):
      idx = np.flatnonzero((np.asarray(seg[b]) != -1) & (rng.random(T) < 0.6))
      out[:, b, n, :idx.size] = np.asarray(pos[b])[idx], np.asarray(seg[b])[idx], idx
  return tuple(jnp.asarray(x) for x in out)


@functools.partial(jax.jit, static_argnames=('scale', 'window', 'num_global', 'softcap'))
def dense_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, *, scale, window, num_global, softcap):
  """Float32 oracle. q [B, T, N, H], k/v [B, S, K, H]; query metadata [B, T] or per head [B, N, T]."""
  N, K = q.shape[2], k.shape[2]
  if q_pos.ndim == 2:
    q_pos, q_seg = q_pos[:, None], q_seg[:, None]
  mask = sparse_attention_mask(q_pos, k_pos[:, None], q_seg, k_seg[:, None], window=window,
                               num_global=num_global)  # [B, N or 1, T, S]
  kf = jnp.repeat(k.astype(jnp.float32), N // K, axis=2)
  vf = jnp.repeat(v.astype(jnp.float32), N // K, axis=2)
  s = jnp.einsum('btnh,bsnh->bnts', q.astype(jnp.float32), kf, precision='highest') * scale
  if softcap is not None:
    s = softcap * jnp.tanh(s / softcap)
  s = jnp.where(mask, s, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  return jnp.einsum('bnts,bsnh->btnh', p, vf, precision='highest')


@functools.partial(jax.jit, static_argnames=('T', 'block_q', 'block_k', 'window', 'num_global'))
def schedules(q_pos, q_seg, q_index, *, T, block_q, block_k, window, num_global):
  """Forward and transposed schedules, per head ((B*N) as the batch) when q_pos is [B, N, T]."""
  kw = dict(block_q=block_q, block_k=block_k, window=window, num_global=num_global)
  nk = T // block_k
  if q_pos.ndim == 2:
    sched = make_schedule(q_pos, q_seg, **kw)
    return sched, transpose_schedule(sched, nk)
  B, N, _ = q_pos.shape
  flat = lambda x: x.reshape(B * N, T)
  sched = make_schedule(flat(q_pos), flat(q_seg), q_index=flat(q_index), **kw)
  tsched = transpose_schedule(sched, nk)
  return sched.reshape(B, N, -1, 4), tsched.reshape(B, N, nk, 2)


# Each case compiles three interpret-mode kernels (~2 s each), so batch rows carry the layout variety.
# (name, dtype, N, K, H, rows, pad, window, num_global, softcap, block_q, block_k, per_head)
CASES = [
    ('f32_causal_single_doc_and_packed_mha', jnp.float32, 2, 2, 32, [[64], [20, 30, 14]], 0, None, 0, None,
     32, 16, False),
    ('f32_window_globals_packed_tail_gqa2_softcap', jnp.float32, 2, 1, 16, [[40, 30, 18], [75, 13]], 8, 12,
     3, 1.0, 32, 16, False),
    ('bf16_window_packed_tail_gqa4', jnp.bfloat16, 4, 1, 128, [[45, 30, 13]], 8, 16, 0, None, 16, 32, False),
    ('f32_per_head_window_globals_gqa2_softcap', jnp.float32, 4, 2, 16, [[30, 28], [58]], 6, 16, 2, 1.0,
     16, 32, True),
    ('bf16_per_head_causal_gqa4_softcap', jnp.bfloat16, 4, 1, 32, [[40, 18]], 6, None, 0, 2.0, 32, 32, True),
]


# Two cases by default (shared metadata with window, globals, softcap and a padded tail; per-head rows); the
# rest under -m slow (interpret mode costs ~7 s a case on 2 cores).
DEFAULT_CASES = ('f32_window_globals_packed_tail_gqa2_softcap', 'bf16_per_head_causal_gqa4_softcap')


@pytest.mark.parametrize('case', [c if c[0] in DEFAULT_CASES else pytest.param(c, marks=pytest.mark.slow)
                                  for c in CASES], ids=[c[0] for c in CASES])
def test_kernels_match_dense_oracle(case):
  name, dtype, N, K, H, rows, pad, window, num_global, softcap, block_q, block_k, per_head = case
  pos, seg = layout(rows, pad)
  B, T = pos.shape
  rng = np.random.default_rng(len(name))
  q_pos, q_seg, q_index = routed_rows(rng, pos, seg, N) if per_head else (pos, seg, None)
  q, do = (jnp.asarray(rng.standard_normal((B, T, N, H)), dtype) for _ in range(2))
  k, v = (jnp.asarray(rng.standard_normal((B, T, K, H)), dtype) for _ in range(2))
  sched, tsched = schedules(q_pos, q_seg, q_index, T=T, block_q=block_q, block_k=block_k, window=window,
                            num_global=num_global)
  kw = dict(scale=1 / math.sqrt(H), window=window, num_global=num_global, softcap=softcap)
  out, lse = tpu.flash_forward(q, k, v, q_pos, pos, q_seg, seg, sched, block_q=block_q, block_k=block_k,
                               interpret=True, **kw)
  grads = tpu.flash_backward(q, k, v, q_pos, pos, q_seg, seg, sched, tsched, out, lse, do, block_q=block_q,
                             block_k=block_k, interpret=True, **kw)
  want, vjp = jax.vjp(lambda q, k, v: dense_attention(q, k, v, q_pos, pos, q_seg, seg, **kw), q, k, v)
  # float32: the same math up to summation order. bfloat16: the kernels round p (and ds in the backward)
  # to bf16 before the matmuls, as flash attention does, while the oracle stays in float32 throughout;
  # bf16 has a 2^-8 relative step, and sums of up to T such terms give errors of a few 1e-3 of the
  # largest value, so 2e-2 of max |ref| is the bound.
  tol = 2e-5 if dtype == jnp.float32 else 2e-2
  assert lse.shape == (B, N, T) and lse.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(lse)))
  for got, ref, what in zip((out, *grads), (want, *vjp(do.astype(jnp.float32))), ('out', 'dq', 'dk', 'dv')):
    assert got.shape == ref.shape and got.dtype == dtype, what
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref)))
    bound = tol * float(jnp.max(jnp.abs(ref)))
    assert err <= bound, f'{name} {what}: max abs err {err} > {bound}'
  # Queries that see nothing (segment -1) give exactly 0.
  blind = np.broadcast_to(np.asarray(q_seg if per_head else q_seg[:, None]) == -1, (B, N, T))
  assert np.all(np.asarray(out, np.float32).transpose(0, 2, 1, 3)[blind] == 0)


def _max_counts(sched, tsched):
  fwd = (sched[..., 1] - sched[..., 0]) + (sched[..., 3] - sched[..., 2])
  return int(jnp.max(fwd)), int(jnp.max(tsched[..., 1] - tsched[..., 0]))


@pytest.mark.parametrize('window,num_global', [(None, 0), (7, 0), (7, 3), (33, 1), (40, 0), (500, 2)])
@pytest.mark.parametrize('bq,bk', [(16, 16), (32, 16), (16, 32), (48, 16)])
def test_step_bounds_cover_every_schedule(window, num_global, bq, bk):
  # Documents of many lengths, block-aligned and not, a padded tail.
  pos, seg = layout([[30, 3, 50, 20, 41, 32], [1, 40, 60, 43, 32], [176], [2] * 88], pad=16)
  T = pos.shape[1]
  sched, tsched = schedules(pos, seg, None, T=T, block_q=bq, block_k=bk, window=window, num_global=num_global)
  bounds = dict(block_q=bq, block_k=bk, window=window, num_global=num_global, per_head=False)
  fwd, dkv = _max_counts(sched, tsched)
  assert fwd <= tpu.forward_steps(T, **bounds)
  assert dkv <= tpu.dkv_steps(T, **bounds)


def test_step_bounds_are_tight():
  T, b = 256, 16
  kw = dict(T=T, block_q=b, block_k=b)
  bounds = lambda window, num_global: dict(block_q=b, block_k=b, window=window, num_global=num_global,
                                           per_head=False)
  pos, seg = layout([[T]])
  for window, num_global in [(None, 0), (b, 0), (3 * b + 5, 0), (b, 2)]:
    sched, tsched = schedules(pos, seg, None, window=window, num_global=num_global, **kw)
    fwd, dkv = _max_counts(sched, tsched)
    assert dkv == tpu.dkv_steps(T, **bounds(window, num_global))
    if not num_global:
      assert fwd == tpu.forward_steps(T, **bounds(window, num_global))
  # Global keys straddling a block boundary (a document starting at 79): 2 global + 2 local blocks.
  pos, seg = layout([[79, T - 79]])
  sched, tsched = schedules(pos, seg, None, window=b, num_global=2, **kw)
  assert _max_counts(sched, tsched)[0] == tpu.forward_steps(T, **bounds(b, 2)) == 4
  # Skipping is real: 4 or 2 steps instead of 16.
  assert tpu.dkv_steps(T, **bounds(b, 0)) == 2
  assert tpu.forward_steps(T, block_q=b, block_k=b, window=b, num_global=2, per_head=True) == T // b


def test_dead_steps_repeat_the_last_block():
  """Steps past a row's count map to the block of its last live step, so the pipeline fetches nothing new."""
  pos, seg = layout([[40, 70, 18], [128]], pad=0)
  T, bq, bk = pos.shape[1], 16, 16
  sched, tsched = schedules(pos, seg, None, T=T, block_q=bq, block_k=bk, window=20, num_global=3)
  cases = [(tpu.sched_step, np.asarray(sched).reshape(-1), 4, tpu.forward_steps),
           (tpu.tsched_step, np.asarray(tsched).reshape(-1), 2, tpu.dkv_steps)]
  for step, table, width, bound in cases:
    steps = bound(T, block_q=bq, block_k=bk, window=20, num_global=3, per_head=False)
    for row in range(table.size // width):
      blocks, live = zip(*[(int(x), bool(y)) for x, y in (step(table, row, s) for s in range(steps))])
      n_live = sum(live)
      assert live == (True,) * n_live + (False,) * (steps - n_live)
      if n_live:
        assert set(blocks[n_live:]) <= {blocks[n_live - 1]}
        assert len(set(blocks[:n_live])) == n_live  # no block is visited twice


def test_only_scheduled_blocks_compute(monkeypatch):
  """Counts the grid steps that reach the score computation (a host callback in interpret mode)."""
  calls = {'n': 0}
  scores = tpu._scores

  def counting_scores(*args):
    jax.debug.callback(lambda: calls.__setitem__('n', calls['n'] + 1))
    return scores(*args)

  monkeypatch.setattr(tpu, '_scores', counting_scores)
  pos, seg = layout([[40, 70, 18]])
  B, T = pos.shape
  N, K, H, bq, bk, window, num_global = 2, 1, 8, 16, 16, 20, 3
  sched, tsched = schedules(pos, seg, None, T=T, block_q=bq, block_k=bk, window=window, num_global=num_global)
  q = jnp.ones((B, T, N, H))
  k = jnp.ones((B, T, K, H))
  kw = dict(scale=1.0, block_q=bq, block_k=bk, window=window, num_global=num_global, softcap=None,
            interpret=True)
  out, lse = tpu.flash_forward(q, k, k, pos, pos, seg, seg, sched, **kw)
  jax.block_until_ready(out)
  visited = count_visited_blocks(pos, seg, block_q=bq, block_k=bk, window=window, num_global=num_global)
  grid = B * N * (T // bq) * tpu.forward_steps(T, block_q=bq, block_k=bk, window=window,
                                               num_global=num_global, per_head=False)
  assert calls['n'] == N * visited < grid
  calls['n'] = 0
  jax.block_until_ready(tpu.flash_backward(q, k, k, pos, pos, seg, seg, sched, tsched, out, lse, q, **kw))
  covered = int(jnp.sum(tsched[..., 1] - tsched[..., 0]))
  assert calls['n'] == N * (visited + covered)  # dq visits the forward's blocks, dk/dv the transposed ranges


@pytest.mark.parametrize('per_head', [False, True])
def test_lowers_to_mosaic_with_128_blocks(per_head):
  """Real-TPU block sizes pass the Pallas TPU lowering (block-shape rules, index maps, kernel ops); Mosaic's
  own compilation needs a TPU and is not checked here. 64-row blocks are rejected by the same lowering."""
  B, T, N, K, H = 1, 512, 4, 2, 128
  keys = jnp.zeros((B, T), jnp.int32)  # k_pos, k_seg
  rows = jnp.zeros((B, N, T), jnp.int32) if per_head else keys  # q_pos, q_seg
  sched = jnp.zeros((*rows.shape[:-1], T // 128, 4), jnp.int32)
  tsched = jnp.zeros((*rows.shape[:-1], T // 128, 2), jnp.int32)
  q = jnp.zeros((B, T, N, H), jnp.bfloat16)
  k = jnp.zeros((B, T, K, H), jnp.bfloat16)

  def attention(q, k, v, do, block):
    kw = dict(scale=0.1, block_q=block, block_k=block, window=256, num_global=4, softcap=30.0, interpret=False)
    out, lse = tpu.flash_forward(q, k, v, rows, keys, rows, keys, sched, **kw)
    return tpu.flash_backward(q, k, v, rows, keys, rows, keys, sched, tsched, out, lse, do, **kw)

  def lower(block):
    traced = jax.jit(functools.partial(attention, block=block)).trace(q, k, k, q)
    return traced.lower(lowering_platforms=('tpu',))

  assert lower(128).as_text().count('tpu_custom_call') == 3
  with pytest.raises(ValueError, match='divisible by 8 and 128'):
    lower(64)
