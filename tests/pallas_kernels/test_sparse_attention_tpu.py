"""Tests for the Mosaic TPU kernels (pallas_kernels.sparse_attention.tpu) in TPU interpret mode on CPU: forward, dq
and dk/dv against a dense float32 oracle, the inner compute loop over wide key blocks, the Mosaic lowering at the
default block sizes. The live-pair lists and grid-step counts are tested in test_tpu_live_pairs.py."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_attention import api, tpu
from pallas_kernels.sparse_attention import live_pairs as lp
from pallas_kernels.sparse_attention.reference import sparse_attention_mask


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


def count_calls(monkeypatch, module, **attrs) -> dict:
  """Wraps module.<attr> for each key=attr so that every run of a traced call adds 1 to counts[key] (a host
  callback, so kernel bodies in interpret mode count per grid step); returns counts."""
  counts = dict.fromkeys(attrs, 0)
  for key, attr in attrs.items():
    def wrapped(*args, _fn=getattr(module, attr), _key=key, **kwargs):
      jax.debug.callback(lambda: counts.__setitem__(_key, counts[_key] + 1))
      return _fn(*args, **kwargs)
    monkeypatch.setattr(module, attr, wrapped)
  return counts


def run_kernels(q, k, v, do, q_pos, k_pos, q_seg, k_seg, q_index=None, *, block_q, block_k, block_k_compute=None,
                **kw):
  """(out, lse, dq, dk, dv) of the three kernels over the live-pair lists of the metadata."""
  blocks = dict(block_q=block_q, block_k=block_k, window=kw['window'], num_global=kw['num_global'])
  pairs = lp.live_pairs(q_pos, q_seg, k_pos, k_seg, q_index=q_index, **blocks)
  dkv_pairs = lp.dkv_live_pairs(q_pos, q_seg, k_pos, k_seg, q_index=q_index, group=q.shape[2] // k.shape[2],
                                **blocks)
  kw = dict(kw, block_q=block_q, block_k=block_k, block_k_compute=block_k_compute, interpret=True)
  args = (q, k, v, q_pos, k_pos, q_seg, k_seg)
  out, lse = tpu.flash_forward(*args, pairs, **kw)
  dq = tpu.flash_dq(*args, pairs, out, lse, do, **kw)
  return (out, lse, dq, *tpu.flash_dkv(*args, dkv_pairs, out, lse, do, **kw))


# Each case compiles three interpret-mode kernels (~2 s each), so batch rows carry the layout variety.
# (name, dtype, N, K, H, rows, pad, window, num_global, softcap, block_q, block_k, block_k_compute, per_head)
CASES = [
    ('f32_causal_packed_gqa2', jnp.float32, 2, 1, 16, [[64, 16], [20, 30, 14, 16]], 16, None, 0, None, 16, 16, None,
     False),
    ('f32_window_globals_packed_tail_softcap', jnp.float32, 2, 2, 16, [[40, 30, 18], [75, 13]], 8, 12, 3, 1.0,
     32, 16, None, False),
    ('bf16_per_head_window_globals_gqa2', jnp.bfloat16, 4, 2, 32, [[30, 28], [58]], 6, 16, 2, None, 16, 32, None,
     True),
    ('f32_window_packed_gqa4', jnp.float32, 4, 1, 16, [[50, 30], [80]], 16, 20, 0, None, 16, 16, None, False),
    ('bf16_causal_packed_tail', jnp.bfloat16, 2, 2, 32, [[40, 24], [64]], 32, None, 0, None, 32, 16, None, False),
    ('f32_per_head_causal_gqa2', jnp.float32, 4, 2, 16, [[30, 20], [50]], 14, None, 0, None, 16, 16, None, True),
    # Wide key blocks walked in chunks: the online softmax across chunks, chunks fully masked for some rows.
    ('f32_wide_keys_window_globals_chunks_softcap', jnp.float32, 2, 1, 16, [[40, 30, 18], [75, 13]], 40, 12, 3,
     1.0, 32, 64, 16, False),
    ('bf16_wide_keys_causal_packed_chunks_gqa2', jnp.bfloat16, 4, 2, 32, [[70, 50], [120]], 8, None, 0, None, 16,
     64, 32, False),
    ('f32_per_head_wide_keys_window_chunks', jnp.float32, 4, 2, 16, [[30, 28], [58]], 6, 16, 2, None, 16, 32, 8,
     True),
    ('f32_causal_single_doc_and_packed_mha', jnp.float32, 2, 2, 32, [[64], [20, 30, 14]], 0, None, 0, None,
     32, 16, None, False),
    ('bf16_window_packed_tail_gqa4', jnp.bfloat16, 4, 1, 128, [[45, 30, 13]], 8, 16, 0, None, 16, 32, None, False),
    ('bf16_per_head_causal_gqa4_softcap', jnp.bfloat16, 4, 1, 32, [[40, 18]], 6, None, 0, 2.0, 32, 32, None,
     True),
]
# ~7-15 s each on 2 cores; run with -m slow. The default cases still cover causal, window, window + globals, softcap,
# padding, GQA 1/2/4, per-head rows, f32 and bf16, one chunk and several.
SLOW_CASES = ('f32_causal_single_doc_and_packed_mha', 'bf16_window_packed_tail_gqa4',
              'bf16_per_head_causal_gqa4_softcap', 'f32_per_head_causal_gqa2', 'bf16_causal_packed_tail')


@pytest.mark.parametrize('case', [pytest.param(c, marks=pytest.mark.slow) if c[0] in SLOW_CASES else c
                                  for c in CASES], ids=[c[0] for c in CASES])
def test_kernels_match_dense_oracle(case):
  name, dtype, N, K, H, rows, pad, window, num_global, softcap, block_q, block_k, chunk, per_head = case
  pos, seg = layout(rows, pad)
  B, T = pos.shape
  rng = np.random.default_rng(len(name))
  q_pos, q_seg, q_index = routed_rows(rng, pos, seg, N) if per_head else (pos, seg, None)
  q, do = (jnp.asarray(rng.standard_normal((B, T, N, H)), dtype) for _ in range(2))
  k, v = (jnp.asarray(rng.standard_normal((B, T, K, H)), dtype) for _ in range(2))
  kw = dict(scale=1 / math.sqrt(H), window=window, num_global=num_global, softcap=softcap)
  out, lse, *grads = run_kernels(q, k, v, do, q_pos, pos, q_seg, seg, q_index, block_q=block_q, block_k=block_k,
                                 block_k_compute=chunk, **kw)
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
  # Queries that see nothing (segment -1) give exactly 0, and lse 0; padding keys get dk = dv = 0.
  blind = np.broadcast_to(np.asarray(q_seg if per_head else q_seg[:, None]) == -1, (B, N, T))
  assert np.all(np.asarray(out, np.float32).transpose(0, 2, 1, 3)[blind] == 0)
  assert np.all(np.asarray(lse)[blind] == 0)
  unseen = np.asarray(seg) == -1
  for g in grads[1:]:
    assert np.all(np.asarray(g, np.float32)[unseen] == 0)


def test_compute_chunk():
  assert tpu.compute_chunk(512) == tpu.compute_chunk(128) == 128
  assert tpu.compute_chunk(48) == 48  # interpret-mode blocks below a lane tile: one chunk
  assert tpu.compute_chunk(512, 256) == 256
  with pytest.raises(ValueError, match='block_k_compute=96 must be a positive divisor of block_k=512'):
    tpu.compute_chunk(512, 96)


def test_inner_loop_computes_every_chunk_once(monkeypatch):
  """With 64-wide key blocks in 16-column chunks, each live pair computes scores 4 times and each edge pair
  evaluates 4 chunk masks, counted with host callbacks in interpret mode; the grid is still one step per pair."""
  counts = count_calls(monkeypatch, tpu, scores='_scores', masks='_fwd_mask', steps='_fwd_kernel')
  pos, seg = layout([[100, 60, 32], [192]])
  B, T = pos.shape
  N, K, H, bq, bk, chunk = 2, 1, 8, 32, 64, 16
  blocks = dict(block_q=bq, block_k=bk, window=None, num_global=0)
  mask = np.asarray(sparse_attention_mask(pos, pos, seg, seg, window=None, num_global=0))
  pair_blocks = mask.reshape(B, T // bq, bq, T // bk, bk)
  live, full = pair_blocks.any(axis=(2, 4)), pair_blocks.all(axis=(2, 4))
  pairs = lp.live_pairs(pos, seg, pos, seg, **blocks)
  q = jnp.ones((B, T, N, H))
  k = jnp.ones((B, T, K, H))
  out, _ = tpu.flash_forward(q, k, k, pos, pos, seg, seg, pairs, scale=1.0, softcap=None, interpret=True,
                             block_k_compute=chunk, **blocks)
  jax.block_until_ready(out)
  assert counts['steps'] == B * N * int(pairs.steps)
  assert counts['scores'] == N * int(live.sum()) * (bk // chunk)
  assert counts['masks'] == N * int((live & ~full).sum()) * (bk // chunk) < counts['scores']


def test_default_tpu_blocks():
  """512 where T (rounded up to 128) allows it, never more padding than 128-blocks."""
  assert [api.tpu_block(t) for t in (57, 128, 300, 512, 640, 1000, 1536, 32768)] == [
      128, 128, 128, 512, 128, 512, 512, 512]
  q = jnp.zeros((1, 1000, 2, 128), jnp.bfloat16)
  cfg = api.kernel_config(q, window=None, num_global=0, scale=None, softcap=None, block_q=None, block_k=None,
                          backend='tpu', interpret=True)
  assert (cfg.block_q, cfg.block_k) == (512, 512)
  assert api.padded_length(1000, cfg.block_q, cfg.block_k) == 1024


@pytest.mark.parametrize('per_head,window,num_global,T,block', [
    (False, None, 0, 2048, 512), (False, 256, 4, 1024, 512), (True, 256, 4, 1024, 256), (True, None, 0, 256, 128),
    (False, 1024, 0, 1536, 512)])
def test_kernels_lower_to_mosaic(per_head, window, num_global, T, block):
  """The default blocks (512 x 512 computed in 128-column chunks, and 256 / 128) pass the Pallas TPU lowering with
  the dynamic pair-axis grid (block shapes, index maps, kernel ops); Mosaic's own compilation needs a TPU. 64-row
  blocks are rejected by the same lowering."""
  B, N, K, H = 2, 4, 2, 128
  keys = jnp.zeros((B, T), jnp.int32)
  rows = jnp.zeros((B, N, T), jnp.int32) if per_head else keys
  q = jnp.zeros((B, T, N, H), jnp.bfloat16)
  k = jnp.zeros((B, T, K, H), jnp.bfloat16)

  def attention(q, k, v, do, pos, seg, block):
    qp, qs = (jnp.broadcast_to(x[:, None], rows.shape) if per_head else x for x in (pos, seg))
    blocks = dict(q_index=qp if per_head else None, block_q=block, block_k=block, window=window,
                  num_global=num_global)
    pairs = lp.live_pairs(qp, qs, pos, seg, **blocks)
    dkv_pairs = lp.dkv_live_pairs(qp, qs, pos, seg, group=N // K, **blocks)
    kw = dict(scale=0.1, block_q=block, block_k=block, window=window, num_global=num_global, softcap=30.0,
              interpret=False)
    args = (q, k, v, qp, pos, qs, seg)
    out, lse = tpu.flash_forward(*args, pairs, **kw)
    return (tpu.flash_dq(*args, pairs, out, lse, do, **kw), *tpu.flash_dkv(*args, dkv_pairs, out, lse, do, **kw))

  def lower(block):
    traced = jax.jit(functools.partial(attention, block=block)).trace(q, k, k, q, keys, keys)
    return traced.lower(lowering_platforms=('tpu',)).as_text()

  text = lower(block)
  assert text.count('tpu_custom_call') == 3
  for name in ('sparse_attention_fwd', 'sparse_attention_dq', 'sparse_attention_dkv'):
    assert name in text
  if block == 512:
    with pytest.raises(ValueError, match='divisible by 8 and 128'):
      lower(64)


@pytest.mark.parametrize('window,num_global', [(None, 0), (1024, 4)])
def test_public_training_call_lowers_at_32k_with_512_blocks(window, num_global):
  """The public sparse_attention forward + backward at the size users train (T = 32768, 16 heads of 128, GQA 2),
  traced from shapes only and lowered for TPU: the default blocks are 512 x 512, and each kernel's prefetched list
  has room for one int32 word per possibly live pair: the causal triangle of 64 query blocks, 64 * 65 / 2 = 2080
  words (about 128 KiB at 128-blocks: 32896), or with a window of 1024 three local blocks plus two for the sink
  run (a document starting mid-block puts its 4 sinks across a boundary), fewer for the first four query blocks:
  1 + 2 + 3 + 4 + 60 * 5 = 310 words."""
  B, T, N, K, H = 1, 32768, 16, 8, 128
  q = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16)
  meta = jax.ShapeDtypeStruct((B, T), jnp.int32)

  def loss(q, k, v, pos, seg):
    from pallas_kernels.sparse_attention import sparse_attention  # pylint: disable=g-import-not-at-top
    out = sparse_attention(q, k, v, pos, pos, seg, seg, window=window, num_global=num_global, backend='tpu',
                           interpret=False)
    return jnp.sum(out.astype(jnp.float32))

  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, meta, meta).lower(
      lowering_platforms=('tpu',))
  text = lowered.as_text()
  assert text.count('tpu_custom_call') == 3
  nq = T // 512
  words = nq * (nq + 1) // 2 if window is None else 1 + 2 + 3 + 4 + (nq - 4) * 5
  # The forward's list is an int32 [B * words] operand of the kernel call (scalar prefetch).
  assert f'tensor<{B * words}xi32>' in text
