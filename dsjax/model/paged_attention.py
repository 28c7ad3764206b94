"""Decode attention over a paged KV cache: one new query token per row against that row's pages.

Layout (per layer), as JAX's shipped paged-attention kernels take it:
  k_pages, v_pages  [K, P, bs, H]  kv heads, pages, tokens per page, head dim. Page 0 is the null page: never
                    allocated; a block-table entry of 0 means "no page" (unallocated, or freed because the block
                    fell out of a sparse model's window) and its tokens are never attended to.
  block_table       int32 [B, M]   logical block m of row b (positions m*bs .. m*bs+bs-1) lives in page
                    block_table[b, m].
  lengths           int32 [B]      positions 0..lengths-1 are valid; the new token (the query) is already written at
                    position lengths-1. A row of length 0 is empty and gives zeros.
  q                 [B, N, H]      N query heads, N % K == 0, query head n reads kv head n // (N // K); RoPE is
                    already applied to q and to the cached keys.
A query at position t = lengths-1 sees key position p iff p <= t and (window is None or t - p < window or
p < num_global).

Which computation runs (`paged_kernel`, decided from static shapes and options only):
  full causal (window None, or a window covering all M*bs positions)
    path 'pallas', platform 'gpu' (or 'cpu', interpreted): `jax.experimental.pallas.ops.gpu.paged_attention`
      (Triton). It does not scale scores (q is scaled here, in float32, then cast to the pages' dtype) and masks
      only by length, so every block below a row's length must hold a real page (true for full causal, where
      nothing is freed). The block table is padded with null pages to partitions x pages per compute block.
      Needs head_dim and bs powers of two with head_dim >= 16 (Triton tile shapes); otherwise the reference runs.
      float32 pools get TF32 scores (Triton's dot at default precision), as XLA's float32 matmuls on GPU do.
    path 'pallas', platform 'tpu': `jax.experimental.pallas.ops.tpu.paged_attention` (Mosaic), same contract.
      Needs head_dim % 128 == 0 (block shapes) and bfloat16 pools (it rounds K/V to bfloat16 inside); otherwise
      the reference runs.
    path 'reference': `reference_paged_attention` (gather every block, masked softmax in float32).
  window set (with or without global tokens): `windowed_paged_attention` on every path and platform: pure jnp that
    gathers only the ceil(num_global / bs) global blocks and the blocks the window can touch (a bounded copy of
    B * (num_global + window + 2 bs) tokens, not the row's whole view), then a masked float32 softmax. No shipped
    kernel takes global (sink) tokens. TPU's `ragged_paged_attention` takes a sliding window without globals, but
    it reads one combined pool kv_pages [P, bs, 2K, H] with k and v interleaved on the head axis (k head i at
    2i, v head i at 2i+1); building it from separate [K, P, bs, H] pools is a copy of the whole pool every step,
    so it is not used. A pool stored in that combined layout could call it directly (sm_scale=scale,
    sliding_window=window, kv_lens=lengths, page_indices=block_table, one query per sequence).

On a device mesh the kernel calls must run inside `shard_map` (XLA cannot partition a pallas_call); this module
does not: its caller wraps it (rows over the batch axes, kv heads over the head axes: axis 0 of the pools, q's
heads in whole GQA groups; block_table and lengths follow the rows).
"""
from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.gpu import paged_attention as gpu_paged
from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention_kernel as tpu_paged

from dsjax.model.pages import NULL_PAGE
from dsjax.model.pages import gather_pages  # [K, P, bs, H] pages, [B, M] table -> [B, M*bs, K, H] row views

__all__ = ['NULL_PAGE', 'gather_pages', 'paged_decode_attention', 'paged_kernel', 'reference_paged_attention',
           'windowed_blocks', 'windowed_paged_attention']
_F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST

# GPU kernel tiling: query heads of one kv head are padded to 16 rows (Triton's dot minimum); a compute block covers
# 64 tokens (pages_per_compute_block = 64 // bs pages, at least one page); the pages of a row are split into at most
# 16 partitions that run in parallel and are merged with the log-sum-exp rule.
GPU_BLOCK_H = 16
GPU_BLOCK_TOKENS = 64
GPU_MAX_SPLITS = 16
# TPU kernel: one compute block (pages DMA'd to VMEM together, double-buffered) covers up to 512 tokens.
TPU_BLOCK_TOKENS = 512


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _is_pow2(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


def _visible(pos_BS: jax.Array, page_BS: jax.Array, lengths_B: jax.Array, window: int | None,
             num_global: int) -> jax.Array:
  """bool [B, S]: the query at t = lengths-1 sees key position pos (held in page `page`)."""
  t_B1 = lengths_B.astype(jnp.int32)[:, None] - 1
  vis = (pos_BS <= t_B1) & (pos_BS >= 0) & (page_BS != NULL_PAGE)
  if window is not None:
    vis &= (t_B1 - pos_BS < window) | (pos_BS < num_global)
  return vis


def _masked_attention(q_BNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BS: jax.Array,
                      scale: float) -> jax.Array:
  """Masked softmax attention in float32; rows with no visible key give zeros. Returns [B, N, H] in q's dtype."""
  B, N, H = q_BNH.shape
  K = k_BSKH.shape[2]
  q_BKGH = q_BNH.astype(_F32).reshape(B, K, N // K, H)
  s_BKGS = jnp.einsum('bkgh,bskh->bkgs', q_BKGH, k_BSKH.astype(_F32), precision=_HIGHEST) * scale
  mask_B11S = mask_BS[:, None, None, :]
  s_BKGS = jnp.where(mask_B11S, s_BKGS, -jnp.inf)
  m_BKG1 = jnp.max(s_BKGS, axis=-1, keepdims=True)
  m_BKG1 = jnp.where(jnp.isfinite(m_BKG1), m_BKG1, 0.0)
  p_BKGS = jnp.where(mask_B11S, jnp.exp(s_BKGS - m_BKG1), 0.0)
  l_BKG1 = jnp.sum(p_BKGS, axis=-1, keepdims=True)
  o_BKGH = jnp.einsum('bkgs,bskh->bkgh', p_BKGS, v_BSKH.astype(_F32), precision=_HIGHEST)
  o_BKGH = o_BKGH / jnp.where(l_BKG1 > 0, l_BKG1, 1.0)
  return o_BKGH.reshape(B, N, H).astype(q_BNH.dtype)


def _check(q_BNH: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_table_BM: jax.Array,
           lengths_B: jax.Array, window: int | None, num_global: int) -> None:
  B, N, H = q_BNH.shape
  if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
    raise ValueError(f'k_pages and v_pages must both be [K, P, bs, H]; got {k_pages.shape} and {v_pages.shape}')
  K, _, _, Hk = k_pages.shape
  if Hk != H or N % K:
    raise ValueError(f'q [B, N, H] = {q_BNH.shape} does not fit pages [K, P, bs, H] = {k_pages.shape} '
                     '(need the same H and N % K == 0)')
  if block_table_BM.ndim != 2 or block_table_BM.shape[0] != B or lengths_B.shape != (B,):
    raise ValueError(f'block_table must be [B, M] and lengths [B] with B = {B}; got {block_table_BM.shape} and '
                     f'{lengths_B.shape}')
  if window is not None and window < 1:
    raise ValueError(f'window must be >= 1 or None; got {window}')
  if num_global < 0:
    raise ValueError(f'num_global must be >= 0; got {num_global}')


def reference_paged_attention(q_BNH: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_table_BM: jax.Array,
                              lengths_B: jax.Array, *, window: int | None = None, num_global: int = 0,
                              scale: float | None = None) -> jax.Array:
  """Pure-jnp paged decode attention: gather every row's [M*bs] view, masked softmax in float32.

  q [B, N, H]; k_pages/v_pages [K, P, bs, H]; block_table int32 [B, M]; lengths int32 [B]. Null-page entries are
  invisible; rows with length 0 give zeros. scale None: 1/sqrt(H). Returns [B, N, H] in q's dtype.
  """
  _check(q_BNH, k_pages, v_pages, block_table_BM, lengths_B, window, num_global)
  bs = k_pages.shape[2]
  B, M = block_table_BM.shape
  scale = 1.0 / math.sqrt(q_BNH.shape[-1]) if scale is None else scale
  pos_BS = jnp.broadcast_to(jnp.arange(M * bs, dtype=jnp.int32), (B, M * bs))
  page_BS = jnp.repeat(block_table_BM, bs, axis=1)
  mask_BS = _visible(pos_BS, page_BS, lengths_B, window, num_global)
  k_BSKH = gather_pages(k_pages, block_table_BM)
  v_BSKH = gather_pages(v_pages, block_table_BM)
  return _masked_attention(q_BNH, k_BSKH, v_BSKH, mask_BS, scale)


def windowed_blocks(bs: int, num_blocks: int, *, window: int, num_global: int) -> tuple[int, int]:
  """(global blocks, window blocks) a sparse decode step reads: ceil(num_global / bs) leading blocks and the
  ceil((window - 1) / bs) + 1 blocks ending at the query's block (a window of w tokens touches at most that many)."""
  return min(_cdiv(num_global, bs), num_blocks), min(_cdiv(window - 1, bs) + 1, num_blocks)


def windowed_paged_attention(q_BNH: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_table_BM: jax.Array,
                             lengths_B: jax.Array, *, window: int, num_global: int = 0,
                             scale: float | None = None) -> jax.Array:
  """Sparse (window + global tokens) paged decode attention that gathers only the blocks the mask can reach.

  Reads the Gb = ceil(num_global / bs) global blocks and the Wb = ceil((window-1)/bs) + 1 blocks ending at block
  (lengths-1) // bs of each row: gathered K/V are [B, (Gb + Wb)*bs, K, H] whatever M is. A global block counts only
  positions < num_global, a window block only positions >= num_global, so a block in both parts is not counted
  twice. Falls back to `reference_paged_attention` when Gb + Wb >= M (nothing to save). Shapes as there.
  """
  _check(q_BNH, k_pages, v_pages, block_table_BM, lengths_B, window, num_global)
  bs = k_pages.shape[2]
  B, M = block_table_BM.shape
  gb, wb = windowed_blocks(bs, M, window=window, num_global=num_global)
  if gb + wb >= M:
    return reference_paged_attention(q_BNH, k_pages, v_pages, block_table_BM, lengths_B, window=window,
                                     num_global=num_global, scale=scale)
  scale = 1.0 / math.sqrt(q_BNH.shape[-1]) if scale is None else scale
  last_B1 = jnp.clip((lengths_B.astype(jnp.int32) - 1) // bs, 0, M - 1)[:, None]
  blocks_BW = jnp.concatenate([jnp.broadcast_to(jnp.arange(gb, dtype=jnp.int32), (B, gb)),
                               last_B1 - (wb - 1) + jnp.arange(wb, dtype=jnp.int32)], axis=1)  # may be < 0
  table_BW = jnp.take_along_axis(block_table_BM, jnp.clip(blocks_BW, 0, M - 1), axis=1)
  table_BW = jnp.where(blocks_BW >= 0, table_BW, NULL_PAGE)
  pos_BS = (blocks_BW[:, :, None] * bs + jnp.arange(bs, dtype=jnp.int32)).reshape(B, -1)
  is_global_S = jnp.arange((gb + wb) * bs) < gb * bs
  part_BS = jnp.where(is_global_S, pos_BS < num_global, pos_BS >= num_global)
  mask_BS = part_BS & _visible(pos_BS, jnp.repeat(table_BW, bs, axis=1), lengths_B, window, num_global)
  k_BSKH = gather_pages(k_pages, table_BW)
  v_BSKH = gather_pages(v_pages, table_BW)
  return _masked_attention(q_BNH, k_BSKH, v_BSKH, mask_BS, scale)


def paged_kernel(path: str, platform: str, *, head_dim: int, page_size: int, num_blocks: int, window: int | None,
                 dtype: jnp.dtype) -> tuple[str, str]:
  """(computation, reason) that `paged_decode_attention` runs for these static options (dtype: the pages').

  computation: 'gpu_paged_attention' | 'tpu_paged_attention' (JAX's shipped kernels), 'windowed'
  (`windowed_paged_attention`) or 'reference' (`reference_paged_attention`, also the fallback where a kernel's
  constraints are not met; the reason says which). Constraints, checked by lowering in the tests:
    GPU (Triton): head_dim a power of two >= 16 (tile shapes; tl.dot needs 16), page size a power of two.
    TPU (Mosaic): head_dim % 128 == 0 (block shapes), bfloat16 pages (the kernel rounds K/V to bfloat16, so a
      float32 pool would silently lose precision). Mosaic's own compile (not checkable on CPU) may add more.
  """
  if path not in ('reference', 'pallas'):
    raise ValueError(f"path must be 'reference' or 'pallas'; got {path!r}")
  if platform not in ('cpu', 'gpu', 'tpu'):
    raise ValueError(f"platform must be 'cpu', 'gpu' or 'tpu'; got {platform!r}")
  if window is not None and window < num_blocks * page_size:
    return 'windowed', 'a sliding window: only its blocks and the global blocks are gathered (no shipped kernel)'
  if path == 'reference':
    return 'reference', "path 'reference'"
  if platform == 'tpu':
    if head_dim % 128:
      return 'reference', f'the TPU paged kernel needs head_dim % 128 == 0 (Mosaic block shapes); got {head_dim}'
    if jnp.dtype(dtype) != jnp.bfloat16:
      return 'reference', f'the TPU paged kernel rounds K/V pages to bfloat16 inside; pages are {jnp.dtype(dtype)}'
    return 'tpu_paged_attention', 'full causal on TPU'
  if not (_is_pow2(head_dim) and head_dim >= 16):
    return 'reference', f'the GPU paged kernel needs head_dim a power of two >= 16 (Triton tiles); got {head_dim}'
  if not _is_pow2(page_size):
    return 'reference', f'the GPU paged kernel needs a power-of-two page size (Triton tiles); got {page_size}'
  return 'gpu_paged_attention', 'full causal on GPU' + (' (interpreted on CPU)' if platform == 'cpu' else '')


def _gpu_paged_attention(q_BNH: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_table_BM: jax.Array,
                         lengths_B: jax.Array, scale: float, interpret: bool) -> jax.Array:
  """JAX's Triton paged attention, full causal, with the block table padded (with null pages, which the kernel
  masks by length) to a multiple of partitions * pages per compute block. Returns [B, N, H] in q's dtype."""
  bs = k_pages.shape[2]
  M = block_table_BM.shape[1]
  pages_per_block = max(1, GPU_BLOCK_TOKENS // bs)
  k_splits = min(GPU_MAX_SPLITS, _cdiv(M, pages_per_block))
  padded = _cdiv(M, k_splits * pages_per_block) * k_splits * pages_per_block
  table_BM = jnp.pad(block_table_BM.astype(jnp.int32), ((0, 0), (0, padded - M)), constant_values=NULL_PAGE)
  qs_BNH = (q_BNH.astype(_F32) * scale).astype(k_pages.dtype)  # the kernel does not scale scores
  out_BNH = gpu_paged.paged_attention(qs_BNH, k_pages, v_pages, table_BM, lengths_B.astype(jnp.int32),
                                      block_h=GPU_BLOCK_H, pages_per_compute_block=pages_per_block,
                                      k_splits=k_splits, interpret=interpret)
  return out_BNH.astype(q_BNH.dtype)


def _tpu_paged_attention(q_BNH: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_table_BM: jax.Array,
                         lengths_B: jax.Array, scale: float, interpret: bool) -> jax.Array:
  """JAX's Mosaic paged attention, full causal, the block table padded with null pages to a multiple of the pages
  per compute block. interpret: run it in TPU interpret mode (on CPU). Returns [B, N, H] in q's dtype."""
  bs = k_pages.shape[2]
  M = block_table_BM.shape[1]
  pages_per_block = max(1, min(M, TPU_BLOCK_TOKENS // bs))
  padded = _cdiv(M, pages_per_block) * pages_per_block
  table_BM = jnp.pad(block_table_BM.astype(jnp.int32), ((0, 0), (0, padded - M)), constant_values=NULL_PAGE)
  qs_BNH = (q_BNH.astype(_F32) * scale).astype(k_pages.dtype)  # the kernel does not scale scores
  ctx = pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext()
  with ctx:
    out_BNH = tpu_paged.paged_attention(qs_BNH, k_pages, v_pages, lengths_B.astype(jnp.int32), table_BM,
                                        pages_per_compute_block=pages_per_block)
  return out_BNH.astype(q_BNH.dtype)


def paged_decode_attention(q_BNH: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_table_BM: jax.Array,
                           lengths_B: jax.Array, *, window: int | None = None, num_global: int = 0,
                           scale: float | None = None, path: str = 'reference', platform: str = 'cpu',
                           interpret: bool | None = None) -> jax.Array:
  """One decode step's attention over a paged KV cache (layout and mask in the module docstring).

  q [B, N, H]; k_pages/v_pages [K, P, bs, H]; block_table int32 [B, M]; lengths int32 [B] (>= 1 for a live row,
  0 for an empty one, which gives zeros). window None: full causal (num_global is then irrelevant). scale None:
  1/sqrt(H). path: 'reference' or 'pallas' (the model's dispatch); platform: 'cpu' | 'gpu' | 'tpu' (on 'cpu',
  'pallas' runs the GPU kernel interpreted, as the other dsjax kernels do). interpret None: True on 'cpu'; True on
  'tpu' runs the Mosaic kernel in TPU interpret mode. `paged_kernel` says which computation runs and why: a window
  narrower than M*bs takes `windowed_paged_attention` on every path (path 'reference' included), full causal takes
  the shipped kernel of the platform under 'pallas' (where its constraints hold) and `reference_paged_attention`
  otherwise. Returns [B, N, H] in q's dtype.
  """
  _check(q_BNH, k_pages, v_pages, block_table_BM, lengths_B, window, num_global)
  _, _, bs, H = k_pages.shape
  M = block_table_BM.shape[1]
  kernel, _ = paged_kernel(path, platform, head_dim=H, page_size=bs, num_blocks=M, window=window,
                           dtype=k_pages.dtype)
  scale = 1.0 / math.sqrt(H) if scale is None else scale
  interpret = platform == 'cpu' if interpret is None else interpret
  if kernel == 'windowed':
    return windowed_paged_attention(q_BNH, k_pages, v_pages, block_table_BM, lengths_B, window=window,
                                    num_global=num_global, scale=scale)
  if kernel == 'reference':
    return reference_paged_attention(q_BNH, k_pages, v_pages, block_table_BM, lengths_B, scale=scale)
  fn = _gpu_paged_attention if kernel == 'gpu_paged_attention' else _tpu_paged_attention
  return fn(q_BNH, k_pages, v_pages, block_table_BM, lengths_B, scale, interpret)
