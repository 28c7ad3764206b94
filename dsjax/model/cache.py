"""The KV cache for decoding: per layer keys/values of past tokens, with their positions and segment ids.

  cache = {'k', 'v': L arrays [B, S, K, H] (a tuple, one per layer), 'positions': [B, S] int32,
           'segment_ids': [B, S] int32 (-1: empty slot)}
  (latent attention: 'k' holds the compressed latent [B, S, 1, kv_lora_rank], 'v' the RoPE key [B, S, 1, Hr])

One array per layer, not a stacked [L, ...] one: the decoding model runs its layers unrolled (dsjax/model/layout.py)
and each layer writes its new keys into its own array in place and reads it where it lies; a stacked array would be
sliced into a copy per layer and token.

Slots are addressed by position, so one jitted step serves rows at different positions. A full cache has a slot
per position (S = max_len). Sparse attention with RoPE keeps a bounded ring cache of S = num_global + R slots,
R = window + extra_slots: positions < num_global keep their own slot (the global "sink" tokens), later positions
share the R ring slots round-robin, so the cache holds the keys a future query can see. `extra_slots` lets a
caller write tokens it may take back (speculative decoding: `truncate`) without overwriting keys still in the
window. (Transformer-XL keeps a full cache: its relative-position term must see the true distances of the global
tokens.) A chunk of several tokens attends to the cache as it was plus the chunk, so a chunk longer than the
window is exact too, and a single token, or a chunk whose writes displace no key its queries can see (always with a
full cache), attends to the cache with itself written (see Attention).

A paged cache (serving: dsjax/sample/paged_engine.py) keeps every request's keys in shared page pools
(dsjax/model/pages.py) and gives the model, per call, the same dict plus 'block_table' [B, M]:
  {'k', 'v': L pools [K, P, bs, H], 'block_table': [B, M] int32, 'positions', 'segment_ids': [B, M * bs]}
Its rows are full caches addressed through the table (logical slot = position, never a ring: a sparse model's
bound comes from freeing the blocks that left the window), so writes, truncation and masks work as for a full cache.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from dsjax import config as config_lib
from dsjax.model import pages as pages_lib
from dsjax.model.attention import mask_args, uses_ring
from dsjax.model.layers import to_dtype

Cache = dict[str, jax.Array]


def cache_length(cfg: ml_collections.ConfigDict, max_len: int, extra_slots: int = 0) -> int:
  """Slots S of the cache for sequences of up to max_len tokens (`cfg` is the model config)."""
  window, num_global = mask_args(cfg.attention)
  if not uses_ring(cfg):
    return max_len
  return min(max_len, num_global + window + extra_slots)


def cache_token_shape(cfg: ml_collections.ConfigDict) -> tuple[tuple[int, int], tuple[int, int]]:
  """Per token and layer, the shapes of the cached 'k' and 'v' entries: ([K, H], [K, H]) for attention with key and
  value heads; ([1, kv_lora_rank], [1, qk_rope_head_dim]) for latent attention, whose cache holds the compressed
  latent and the shared RoPE key (dsjax/model/mla.py)."""
  if cfg.mla.kv_lora_rank:
    return (1, cfg.mla.kv_lora_rank), (1, cfg.mla.qk_rope_head_dim)
  heads = (cfg.num_kv_heads, config_lib.head_dim(cfg))
  return heads, heads


def init_cache(cfg: ml_collections.ConfigDict, batch_size: int, max_len: int, dtype: Any = None,
               extra_slots: int = 0) -> Cache:
  """An empty cache (every slot segment -1) for `batch_size` rows of up to max_len tokens."""
  slots = cache_length(cfg, max_len, extra_slots)
  dtype = to_dtype(dtype or cfg.dtype)
  per_layer = lambda size: tuple(jnp.zeros((batch_size, slots, *size), dtype) for _ in range(cfg.num_layers))
  return dict(**{name: per_layer(size) for name, size in zip(('k', 'v'), cache_token_shape(cfg))},
              positions=jnp.zeros((batch_size, slots), jnp.int32),
              segment_ids=jnp.full((batch_size, slots), -1, jnp.int32))


def init_pages(cfg: ml_collections.ConfigDict, num_pages: int, block_size: int, dtype: Any = None) -> Cache:
  """Empty page pools {'k', 'v': L arrays [K, num_pages, block_size, H]} for a paged cache (page 0 is the null
  page: allocate pages 1..num_pages - 1)."""
  dtype = to_dtype(dtype or cfg.dtype)
  return {name: tuple(pages_lib.init_pool(num_pages, block_size, size, dtype) for _ in range(cfg.num_layers))
          for name, size in zip(('k', 'v'), cache_token_shape(cfg))}


def paged_cache(pools: Cache, block_table_BM: jax.Array, lengths_B: jax.Array) -> Cache:
  """The cache the model reads for rows whose first lengths_B tokens are in the pools at the blocks block_table_BM
  [B, M] gives: positions 0 .. M * bs - 1 per row, segment 1 where a token is held (position < length, in an
  allocated block), -1 elsewhere."""
  block_size = pools['k'][0].shape[2]
  B, M = block_table_BM.shape
  positions = jnp.broadcast_to(jnp.arange(M * block_size, dtype=jnp.int32), (B, M * block_size))
  held = (positions < lengths_B[:, None]) & (jnp.repeat(block_table_BM, block_size, axis=1) != pages_lib.NULL_PAGE)
  return dict(k=pools['k'], v=pools['v'], block_table=block_table_BM.astype(jnp.int32), positions=positions,
              segment_ids=jnp.where(held, 1, -1).astype(jnp.int32))


def is_paged(cache: Cache) -> bool:
  return 'block_table' in cache


def check_cache(cfg: ml_collections.ConfigDict, cache: Cache) -> None:
  """ValueError unless `cache` has the structure `init_cache` (or `paged_cache`) gives for the model config `cfg`
  (shapes aside)."""
  if not isinstance(cache, dict) or set(cache) - {'block_table'} != {'k', 'v', 'positions', 'segment_ids'}:
    raise ValueError(f'a KV cache is a dict with k, v, positions and segment_ids (dsjax.model.cache.init_cache), '
                     f'got {type(cache).__name__} {sorted(cache) if isinstance(cache, dict) else ""}')
  for name in ('k', 'v'):
    layers = cache[name]
    if not isinstance(layers, (tuple, list)) or len(layers) != cfg.num_layers or any(
        getattr(x, 'ndim', None) != 4 for x in layers):
      raise ValueError(f"cache['{name}'] must hold one [B, S, K, H] array per layer (model.num_layers="
                       f'{cfg.num_layers}), as dsjax.model.cache.init_cache makes it')


def write_slots(cfg: ml_collections.ConfigDict, cache: Cache, positions: jax.Array,
                segment_ids: jax.Array) -> jax.Array:
  """int32 [B, T]: the slot each new token is written to, S (dropped) for padding and for tokens a later token
  of the same call overwrites in a ring."""
  slots = cache['segment_ids'].shape[1]
  valid = segment_ids > 0
  if not uses_ring(cfg) or is_paged(cache):
    keep = valid & (positions < slots)
    return jnp.where(keep, positions, slots).astype(jnp.int32)
  # Ring of R = S - num_global slots; a full-length cache is the ring that never wraps (slot = position).
  num_global = min(mask_args(cfg.attention)[1], slots)
  ring = slots - num_global
  slot = jnp.where(positions < num_global, positions, num_global + (positions - num_global) % max(ring, 1))
  last = jnp.max(jnp.where(valid, positions, -1), axis=1, keepdims=True)
  keep = valid & ((positions < num_global) | (positions > last - ring))
  return jnp.where(keep, slot, slots).astype(jnp.int32)


def truncate(cache: Cache, lengths: jax.Array) -> Cache:
  """Forgets cached tokens at positions >= lengths [B] (e.g. rejected speculative tokens): their slots become
  empty. With a ring, call it only for tokens written within the last `extra_slots` positions."""
  stale = cache['positions'] >= lengths[:, None]
  return {**cache, 'segment_ids': jnp.where(stale, -1, cache['segment_ids'])}


def insert_row(cache: Cache, row: Cache, index: jax.Array) -> Cache:
  """`cache` with its row `index` replaced by the 1-row cache `row` (e.g. a request prefilled into an engine slot)."""
  return jax.tree.map(lambda value, new: jax.lax.dynamic_update_slice_in_dim(value, new.astype(value.dtype), index, 0),
                      cache, row)  # every leaf is [B, ...]
