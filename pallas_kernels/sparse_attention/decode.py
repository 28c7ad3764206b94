"""Decode attention: a few new query tokens against an unordered (ring-buffer) KV cache, read in place.

A few new query tokens (Tq, typically 1..16) attend to a cache of S slots. The cache may be in any
order (e.g. a ring buffer holding the `num_global + window` tokens a sparse model keeps) and empty
slots carry segment -1, so no block schedule is used: every key block is visited and masked exactly
with the same rule as the prefill kernels (`gpu._mask`). The cache may be one layer's [B, S, K, H] or every
layer's [L, B, S, K, H] with a traced `layer` index (a decoder's scan over layers): the kernels read that layer's
blocks straight from the stacked array, so no per-layer slice of the cache is copied out, and a cache whose
length is not a multiple of the key block is masked at its tail instead of padded (no copy either).

Backends (`backend`, None: 'tpu' on a TPU, else 'gpu'):
  gpu  Triton flash decoding (this file): grid (batch, kv head, split). Each split covers a contiguous range
       of key blocks and writes a partial (out, max, sum) in float32; `combine_splits` merges the splits with
       the log-sum-exp rule. The G = N/K query heads of one kv head times Tq form the rows of the query tile,
       so each K/V block is loaded once per kv head group.
  tpu  Mosaic (decode_tpu.py): grid (batch, key block) with the online softmax in VMEM scratch, every kv head
       of a key block from one lane-dense [block_k, K*H] tile.
Forward only. `return_lse=True` also returns each row's log-sum-exp, so a chunk's attention to the cache can
be merged exactly with its attention to itself (`merge_attention`).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.sparse_attention.api import _validate, default_backend
from pallas_kernels.sparse_attention.gpu import LN2, online_softmax_step, triton_params

_F32 = jnp.float32
MIN_ROWS = 16  # Triton's tl.dot needs at least 16 rows on GPU.
MAX_SPLITS = 32  # the combine reads P * R * H floats per (batch row, kv head): small next to the cache
DEFAULT_BLOCK_K = {'gpu': 64, 'tpu': 128}
# Programs the split count aims for: 2 waves over the GPU's cores (SMs), so the last wave's tail idles little.
WAVES = 2
DEFAULT_NUM_CORES = 132  # an H100 SXM's SMs; used when the device does not say (CPU, interpret mode, TPU)
# (head_dim, dtype name) -> (block_k, num_warps, num_stages) of the Triton decode kernel. Unmeasured: these are
# the settings the kernel used before the table existed; refresh them from `bench/attention_sweep.py --decode` on
# the target GPU. Shapes missing from the table get DECODE_FALLBACK_TILES.
DECODE_TILES = {
    (64, 'bfloat16'): (64, 4, 2),
    (64, 'float16'): (64, 4, 2),
    (64, 'float32'): (64, 4, 2),
    (128, 'bfloat16'): (64, 4, 2),
    (128, 'float16'): (64, 4, 2),
    (128, 'float32'): (64, 4, 2),
}
DECODE_FALLBACK_TILES = (64, 4, 2)


def default_decode_tiles(head_dim, dtype):
  """(block_k, num_warps, num_stages) of the Triton decode kernel from DECODE_TILES, else DECODE_FALLBACK_TILES."""
  return DECODE_TILES.get((int(head_dim), jnp.dtype(dtype).name), DECODE_FALLBACK_TILES)


def device_num_cores():
  """Streaming multiprocessors of the first device when it is a GPU that reports them (`core_count`), else
  DEFAULT_NUM_CORES."""
  device = jax.devices()[0]
  cores = getattr(device, 'core_count', None) if device.platform == 'gpu' else None
  return int(cores) if cores else DEFAULT_NUM_CORES


def default_num_splits(batch, kv_heads, s, block_k=64, num_cores=None):
  """Key splits of the Triton decode kernel, whose grid is (batch, kv heads, splits): enough programs for WAVES
  waves over `num_cores` (None: `device_num_cores()`), never more splits than key blocks or MAX_SPLITS:
  P = clip(ceil(WAVES * num_cores / (batch * kv_heads)), 1, min(ceil(s / block_k), MAX_SPLITS)), then reduced to
  the fewest splits with the same whole blocks per split (no empty split). `batch` and `kv_heads` are per shard."""
  num_cores = device_num_cores() if num_cores is None else int(num_cores)
  num_blocks = -(-s // block_k)
  want = -(-WAVES * num_cores // max(1, batch * kv_heads))
  splits = max(1, min(want, num_blocks, MAX_SPLITS))
  per_split = -(-num_blocks // splits)
  return int(-(-num_blocks // per_split))


def _decode_kernel(layer_ref, q_ref, k_ref, v_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref, o_ref, m_ref, l_ref,
                   *, scale, block_k, split_len, num_slots, window, num_global, softcap):
  b, g, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  layer = layer_ref[0]
  q = q_ref[...]  # [R, H]: rows = (query head in group, token), padded rows have segment -1
  qp = qpos_ref[...]
  qs = qseg_ref[...]
  rows, h = q.shape
  first = s * split_len
  num_blocks = pl.cdiv(jnp.clip(num_slots - first, 0, split_len), block_k)  # the last split may be short

  def body(j, carry):
    start = first + j * block_k
    valid = start + jnp.arange(block_k) < num_slots  # the cache's tail block is masked, not padded
    load = lambda ref, other, rows=False: pltriton.load(ref, mask=valid[:, None] if rows else valid, other=other)
    k = load(k_ref.at[layer, b, pl.ds(start, block_k), g, :], 0.0, rows=True)
    v = load(v_ref.at[layer, b, pl.ds(start, block_k), g, :], 0.0, rows=True)
    kp = load(kpos_ref.at[b, pl.ds(start, block_k)], 0)
    ks = load(kseg_ref.at[b, pl.ds(start, block_k)], -1)
    return online_softmax_step(q, qp, qs, k, v, kp, ks, carry, scale=scale, window=window, num_global=num_global,
                               softcap=softcap)

  carry = (jnp.zeros((rows, h), _F32), jnp.full((rows,), -jnp.inf, _F32), jnp.zeros((rows,), _F32))
  acc, m, l = lax.fori_loop(0, num_blocks, body, carry)
  l_safe = jnp.where(l > 0, l, 1.0)
  o_ref[...] = acc / l_safe[:, None]  # normalised within the split; 0 for rows with nothing visible
  m_ref[...] = m * LN2  # natural log (the step keeps base-2 units); -inf where this split has no visible key
  l_ref[...] = l  # sum of exp(s - m) = sum of exp2(s2 - m2): the same number in either base


def decode_partials(q, k, v, layer, q_pos, k_pos, q_seg, k_seg, *, num_splits, scale, block_k, window,
                    num_global, interpret, softcap=None, num_warps=4, num_stages=2):
  """Split-K Triton kernel on grouped inputs.

  q [B, K, R, H] (R rows per kv head), k/v [L, B, S, K, H] (any S) with `layer` int32 [1], q_pos/q_seg [B, R],
  k_pos/k_seg [B, S]. Returns (out [B,K,P,R,H], max [B,K,P,R], sum [B,K,P,R]) float32, P = num_splits; out is
  each split's softmax-normalised output.
  """
  B, K, R, H = q.shape
  S = k.shape[2]
  split_len = -(-S // (block_k * num_splits)) * block_k  # key slots per split, whole blocks
  kernel = functools.partial(_decode_kernel, scale=scale, block_k=block_k, split_len=split_len, num_slots=S,
                             window=window, num_global=num_global, softcap=softcap)
  row = pl.BlockSpec((None, R), lambda b, g, s: (b, 0))
  stat = pl.BlockSpec((None, None, None, R), lambda b, g, s: (b, g, s, 0))
  whole = pl.no_block_spec  # the cache and its metadata: indexed in the kernel (layer, batch row, masked tail)
  return pl.pallas_call(
      kernel,
      grid=(B, K, num_splits),
      in_specs=[whole, pl.BlockSpec((None, None, R, H), lambda b, g, s: (b, g, 0, 0)), whole, whole, row, row,
                whole, whole],
      out_specs=[
          pl.BlockSpec((None, None, None, R, H), lambda b, g, s: (b, g, s, 0, 0)),
          stat, stat,
      ],
      out_shape=[
          jax.ShapeDtypeStruct((B, K, num_splits, R, H), _F32),
          jax.ShapeDtypeStruct((B, K, num_splits, R), _F32),
          jax.ShapeDtypeStruct((B, K, num_splits, R), _F32),
      ],
      compiler_params=triton_params(num_warps, num_stages),
      interpret=interpret,
      name='sparse_decode_attention',
  )(layer, q, k, v, q_pos, q_seg, k_pos, k_seg)


def combine_splits(out, m, l):
  """Log-sum-exp merge over the split axis (-2 of m/l, -3 of out) -> (out [..., R, H], lse [..., R]); rows with
  nothing visible get out 0 and lse -inf."""
  m_max = jnp.max(m, axis=-2, keepdims=True)
  m_max = jnp.where(m_max == -jnp.inf, 0.0, m_max)
  w = jnp.exp(m - m_max) * l  # [..., P, R]; 0 for empty splits
  total = jnp.sum(w, axis=-2)
  num = jnp.sum(w[..., None] * out, axis=-3)
  lse = jnp.where(total > 0, m_max[..., 0, :] + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)
  return num / jnp.where(total > 0, total, 1.0)[..., None], lse


def merge_attention(parts, dtype=None):
  """Attention over the union of disjoint key sets from each set's (out [B,T,N,H], lse float32 [B,N,T]): the
  log-sum-exp weighted mean, exact (rows that see nothing in a part have lse -inf there). Output in `dtype`
  (default: the first part's)."""
  outs, lses = zip(*parts)
  lse = jnp.stack(lses)  # [P, B, N, T]
  m = jnp.max(lse, axis=0)
  m = jnp.where(m == -jnp.inf, 0.0, m)
  w = jnp.exp(lse - m)  # 0 where a part sees nothing
  total = jnp.sum(w, axis=0)
  w = jnp.swapaxes(w / jnp.where(total > 0, total, 1.0), -1, -2)[..., None]  # [P, B, T, N, 1]
  out = sum(wi * o.astype(_F32) for wi, o in zip(w, outs))
  return out.astype(dtype or outs[0].dtype)


def sparse_decode_attention(q, k_cache, v_cache, q_pos, k_pos, q_seg, k_seg, *, window=None,
                            num_global=0, scale=None, softcap=None, layer=None, block_k=None, num_splits=None,
                            backend=None, interpret=None, return_lse=False, num_warps=None, num_stages=None):
  """Decode attention of a few new tokens against a (possibly unordered) KV cache.

  q [B, Tq, N, H]; k_cache/v_cache [B, S, K, H] (K | N), or every layer's [L, B, S, K, H] with `layer` an int32
  scalar (may be traced) naming the one to read; q_pos/q_seg [B, Tq], k_pos/k_seg [B, S] int32. Cache slots may
  be in any order; empty slots have segment -1. Key j is visible to query i iff q_seg == k_seg, k_seg != -1,
  k_pos <= q_pos and (window is None or q_pos - k_pos < window or k_pos < num_global) -- exactly
  `sparse_attention_reference` (including `softcap`). Softmax in float32, rows with no visible key give 0,
  output [B, Tq, N, H] in q.dtype; with return_lse also lse float32 [B, N, Tq] (-inf: nothing visible).

  backend: 'gpu' (Triton, split-K), 'tpu' (Mosaic); None: 'tpu' on a TPU, else 'gpu'.
  block_k: key slots per block (None: `default_decode_tiles(H, k dtype)` on GPU, 128 on TPU). num_splits (GPU):
  key splits (flash decoding); None -> `default_num_splits(B, K, S, block_k)` (fills the GPU's cores).
  num_warps/num_stages: Triton launch settings (None: `default_decode_tiles`). The cache is never copied: no pad
  to a multiple of block_k * num_splits (the tail block is masked), no per-layer slice of a stacked cache.
  interpret: None -> True unless the default backend is the kernel's. Forward only.
  """
  stacked = layer is not None
  if stacked and k_cache.ndim != 5:
    raise ValueError(f'with `layer`, k_cache/v_cache must be [L, B, S, K, H]; got {k_cache.shape}')
  per_layer = lambda c: jax.ShapeDtypeStruct(c.shape[1:] if stacked else c.shape, c.dtype)
  _validate(q, per_layer(k_cache), per_layer(v_cache), q_pos, k_pos, q_seg, k_seg, window, num_global, softcap)
  B, Tq, N, H = q.shape
  S, K = k_cache.shape[-3], k_cache.shape[-2]
  if S < 1 or Tq < 1:
    raise ValueError(f'need at least one query token and one cache slot; got Tq={Tq}, S={S}')
  backend = default_backend() if backend is None else backend
  if backend not in ('gpu', 'tpu'):
    raise ValueError(f"backend must be None, 'gpu' or 'tpu'; got {backend!r}")
  tiles = default_decode_tiles(H, k_cache.dtype)
  if block_k is None:
    block_k = tiles[0] if backend == 'gpu' else DEFAULT_BLOCK_K[backend]
  num_warps = tiles[1] if num_warps is None else num_warps
  num_stages = tiles[2] if num_stages is None else num_stages
  if int(block_k) != block_k or block_k < 1:
    raise ValueError(f'block_k must be a positive int; got {block_k!r}')
  block_k = int(block_k)
  scale = 1.0 / math.sqrt(H) if scale is None else float(scale)
  window = None if window is None else int(window)
  num_global = int(num_global)
  softcap = None if softcap is None else float(softcap)
  if interpret is None:
    interpret = jax.default_backend() != backend
  if not stacked:
    k_cache, v_cache, layer = k_cache.reshape(1, *k_cache.shape), v_cache.reshape(1, *v_cache.shape), 0  # free
  layer = jnp.asarray(layer, jnp.int32).reshape(1)
  k_pos, k_seg = k_pos.astype(jnp.int32), k_seg.astype(jnp.int32)
  G = N // K

  # Query tile per kv head: rows r = g * Tq + t, padded (segment -1) to what the backend's tiles need.
  rows = G * Tq
  R = max(MIN_ROWS, 1 << (rows - 1).bit_length()) if backend == 'gpu' else -(-rows // 8) * 8
  qg = q.reshape(B, Tq, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, rows, H)
  qg = jnp.pad(qg, [(0, 0), (0, 0), (0, R - rows), (0, 0)])
  qp = jnp.pad(jnp.tile(q_pos.astype(jnp.int32), (1, G)), [(0, 0), (0, R - rows)])
  qs = jnp.pad(jnp.tile(q_seg.astype(jnp.int32), (1, G)), [(0, 0), (0, R - rows)], constant_values=-1)
  kw = dict(scale=scale, window=window, num_global=num_global, softcap=softcap, interpret=bool(interpret))

  if backend == 'tpu':
    from pallas_kernels.sparse_attention import decode_tpu  # pylint: disable=g-import-not-at-top
    o, lse = decode_tpu.decode(qg, k_cache, v_cache, layer, qp, qs, k_pos, k_seg, block_k=block_k, **kw)
  else:
    num_splits = default_num_splits(B, K, S, block_k) if num_splits is None else num_splits
    if int(num_splits) != num_splits or num_splits < 1:
      raise ValueError(f'num_splits must be None or a positive int; got {num_splits!r}')
    num_splits = min(int(num_splits), -(-S // block_k))  # no split without a key block
    partials = decode_partials(qg, k_cache, v_cache, layer, qp, k_pos, qs, k_seg, num_splits=num_splits,
                               block_k=block_k, num_warps=num_warps, num_stages=num_stages, **kw)
    if num_splits == 1:  # one split is already normalised: no merge over splits
      o, m, l = (x[:, :, 0] for x in partials)
      lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
    else:
      o, lse = combine_splits(*partials)  # [B, K, R, H], [B, K, R]
  o = o[:, :, :rows].reshape(B, K, G, Tq, H).transpose(0, 3, 1, 2, 4).reshape(B, Tq, N, H).astype(q.dtype)
  if not return_lse:
    return o
  return o, lse[:, :, :rows].reshape(B, K, G, Tq).reshape(B, N, Tq)
