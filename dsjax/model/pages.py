"""Page pools: the paged KV cache's storage, one pool per layer for keys and one for values.

  pool: [K, P, bs, H]  (kv heads, pages, tokens per page, head dim; latent attention: K = 1, H = its cache width)
  block_table: int32 [B, M]: row b's logical block m (positions m * bs .. m * bs + bs - 1) lives in page
  block_table[b, m]; page NULL_PAGE (0) is never allocated: an entry pointing at it is a block the row does not hold
  (not yet allocated, or freed after it fell out of a sparse model's window).

The layout is the one JAX's shipped paged-attention kernels read (jax.experimental.pallas.ops.gpu/tpu
paged_attention), so a decode step can hand the pools to them as they lie. The pure-jnp path gathers each row's
blocks into a contiguous [B, M * bs, K, H] view (`gather_pages`) and attends to it as to a full KV cache: logical
slot = position (dsjax/model/cache.py `paged_cache`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NULL_PAGE = 0


def physical_slots(block_table_BM: jax.Array, slot_BT: jax.Array, block_size: int, num_pages: int) -> jax.Array:
  """int32 [B, T]: the flat pool index (page * bs + offset) of logical slots [B, T]; num_pages * bs (dropped on
  write) for slots past the table (>= M * bs) and for slots whose block is NULL_PAGE."""
  num_blocks = block_table_BM.shape[1]
  block = slot_BT // block_size
  page = jnp.take_along_axis(block_table_BM, jnp.clip(block, 0, num_blocks - 1), axis=1)
  keep = (block < num_blocks) & (page != NULL_PAGE)
  return jnp.where(keep, page * block_size + slot_BT % block_size, num_pages * block_size).astype(jnp.int32)


def write_pages(pool_KPbH: jax.Array, new_BTKH: jax.Array, block_table_BM: jax.Array, slot_BT: jax.Array) -> jax.Array:
  """The pool with new tokens [B, T, K, H] written at logical slots [B, T] of their rows (slots >= M * bs, or in a
  NULL_PAGE block, are dropped)."""
  K, P, bs, H = pool_KPbH.shape
  B, T = slot_BT.shape
  flat = physical_slots(block_table_BM, slot_BT, bs, P).reshape(B * T)
  new = new_BTKH.reshape(B * T, K, H).transpose(1, 0, 2).astype(pool_KPbH.dtype)
  return pool_KPbH.reshape(K, P * bs, H).at[:, flat].set(new, mode='drop').reshape(K, P, bs, H)


def gather_pages(pool_KPbH: jax.Array, block_table_BM: jax.Array) -> jax.Array:
  """[B, M * bs, K, H]: each row's blocks in logical order (NULL_PAGE blocks read page 0: callers mask them)."""
  K, _, bs, H = pool_KPbH.shape
  B, M = block_table_BM.shape
  return pool_KPbH[:, block_table_BM].transpose(1, 2, 3, 0, 4).reshape(B, M * bs, K, H)


def init_pool(num_pages: int, block_size: int, token_shape: tuple[int, int], dtype) -> jax.Array:
  """An all-zero pool [K, num_pages, bs, H] for tokens of shape token_shape = (K, H)."""
  kh, h = token_shape
  return jnp.zeros((kh, num_pages, block_size, h), dtype)
