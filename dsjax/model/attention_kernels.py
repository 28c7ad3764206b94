"""The attention kernels as the model calls them, each call run per shard inside `jax.shard_map` on a device mesh.

XLA cannot partition a kernel call: Mosaic TPU refuses ("Mosaic kernels cannot be automatically partitioned"),
and a Triton or cuDNN custom call gets its operands all-gathered to every device. So when the model is traced under
a mesh (`jax.set_mesh`; dsjax.sharding.Placement sets it with the logical-axis rules), every kernel call here runs
inside `shard_map` over that mesh: the batch over the mesh axes of the logical `batch` axis, query and kv heads over
those of `heads` / `kv_heads` (GQA groups stay whole), sequence and head_dim replicated. The specs come from flax's
logical-axis rules in context, the same rules that place the parameters, never from a spec written per call site.
The kernels themselves (`pallas_kernels`) are per-shard functions that know nothing of meshes.

Outside a mesh (one device, or no mesh in context) the kernels are called directly.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dsjax.model import paged_attention
from dsjax.model import partitioning
from dsjax.model.partitioning import per_shard
from pallas_kernels.routed_attention import routed_attention
from pallas_kernels.sparse_attention import merge_attention, sparse_attention, sparse_attention_with_lse
from pallas_kernels.sparse_attention import sparse_decode_attention

# A cached call with at most this many query rows per kv head (G * T) attends with the decode kernel alone; longer
# chunks (prompt prefill) run the flash kernel over the chunk and the decode kernel over the cache, merged.
DECODE_MAX_ROWS = 64

Dims = partitioning.Dims
Q_DIMS: Dims = ('batch', None, 'heads', None)       # q, k, v, out [B, T, N|K, H]
ROW_DIMS: Dims = ('batch', None)                    # positions, segment ids [B, T|S]
GATE_DIMS: Dims = ('batch', None, 'heads')          # gates [B, T, N]
CACHE_DIMS: Dims = (None, 'batch', None, 'heads', None)  # every layer's cache [L, B, S, K, H]
SCALAR_DIMS: Dims = ()


def kernel_backend(platform: str) -> tuple[str, bool]:
  """(pallas_kernels backend, interpret) for the platform the model is built for: Triton kernels on GPU (interpreted
  on CPU), Mosaic kernels on TPU."""
  if platform == 'tpu':
    return 'tpu', False
  return 'gpu', platform == 'cpu'


def _plan(q: jax.Array, k: jax.Array) -> partitioning.ShardPlan | None:
  return partitioning.shard_plan(q.shape[0], q.shape[2], k.shape[-2])


def self_attention(path: str, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                   segment_ids: jax.Array, *, window: int | None, num_global: int, gates: jax.Array | None,
                   platform: str) -> jax.Array:
  """Self-attention over packed rows without a cache on `path` ('pallas' or 'cudnn').

  q [B, T, N, H], k/v [B, T, K, H], positions/segment_ids int32 [B, T] (positions increase by 1 within each
  document), gates [B, T, N] (routed) or None. Returns [B, T, N, H] in q.dtype.
  """
  plan = _plan(q, k)
  if path == 'cudnn':
    local = None if window is None else (window - 1, 0)

    def cudnn(q, k, v):
      return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local, implementation='cudnn')
    return per_shard(cudnn, plan, (Q_DIMS,) * 3, Q_DIMS)(q, k, v)

  backend, interpret = kernel_backend(platform)
  kw = dict(window=window, num_global=num_global, backend=backend, interpret=interpret)
  if gates is None:
    def flash(q, k, v, pos, seg):
      return sparse_attention(q, k, v, pos, pos, seg, seg, **kw)
    return per_shard(flash, plan, (Q_DIMS,) * 3 + (ROW_DIMS,) * 2, Q_DIMS)(q, k, v, positions, segment_ids)

  def routed(q, k, v, pos, seg, gates):  # each shard groups the tokens of its own heads
    return routed_attention(q, k, v, pos, pos, seg, seg, gates, **kw)
  return per_shard(routed, plan, (Q_DIMS,) * 3 + (ROW_DIMS,) * 2 + (GATE_DIMS,), Q_DIMS)(
      q, k, v, positions, segment_ids, gates)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                     cache_before: tuple[jax.Array, ...], cache_after: tuple[jax.Array, ...] | None,
                     layer: jax.Array, *, window: int | None, num_global: int, gates: jax.Array | None,
                     platform: str) -> jax.Array:
  """New tokens attending to a KV cache with the Pallas kernels (decode steps, verification chunks, prefill).

  q [B, T, N, H] and the new tokens' k/v [B, T, K, H] with positions/segment_ids [B, T]. cache_before and
  cache_after are (k, v, positions, segment_ids) of the cache before and after this call's write: every layer's
  keys/values [L, B, S, K, H], read at `layer` in place, and [B, S] metadata. cache_after is None when the write
  displaces keys the chunk's queries still see (dsjax.model.attention's `attends_in_place`). A short chunk
  (G * T <= DECODE_MAX_ROWS query rows per kv head) with a cache_after runs the decode kernel over it alone;
  any other chunk runs the flash kernel over itself merged (log-sum-exp) with the decode kernel over
  cache_before: exact for any chunk, ring caches that it wraps included. Routed gates multiply each head's
  output (every head is computed: a decode step is one token). Returns [B, T, N, H] in q.dtype.
  """
  group = q.shape[2] // cache_before[0].shape[-2]
  decode_only = cache_after is not None and group * q.shape[1] <= DECODE_MAX_ROWS
  cache_k, cache_v, cache_pos, cache_seg = cache_after if decode_only else cache_before
  backend, interpret = kernel_backend(platform)
  kw = dict(window=window, num_global=num_global, backend=backend, interpret=interpret)

  def attention(q, k, v, pos, seg, cache_k, cache_v, layer, cache_pos, cache_seg, gates):
    past = sparse_decode_attention(q.astype(cache_k.dtype), cache_k, cache_v, pos, cache_pos, seg, cache_seg,
                                   layer=layer, return_lse=not decode_only, **kw)
    if decode_only:
      out = past.astype(q.dtype)
    else:
      chunk = sparse_attention_with_lse(q, k, v, pos, pos, seg, seg, **kw)
      out = merge_attention([chunk, past], dtype=q.dtype)
    if gates is not None:
      out = out * gates[..., None].astype(out.dtype)
    return out

  in_dims = (Q_DIMS,) * 3 + (ROW_DIMS,) * 2 + (CACHE_DIMS,) * 2 + (SCALAR_DIMS,) + (ROW_DIMS,) * 2
  args = (q, k, v, positions, segment_ids, cache_k, cache_v, layer, cache_pos, cache_seg)
  if gates is None:
    fn = lambda *args: attention(*args, None)
  else:
    fn, in_dims, args = attention, in_dims + (GATE_DIMS,), args + (gates,)
  return per_shard(fn, _plan(q, cache_k), in_dims, Q_DIMS)(*args)


POOL_DIMS: Dims = ('heads', None, None, None)  # a layer's page pool [K, P, bs, H]


def paged_decode(path: str, q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_table: jax.Array,
                 positions: jax.Array, segment_ids: jax.Array, *, window: int | None, num_global: int,
                 gates: jax.Array | None, platform: str) -> jax.Array:
  """One new token per row [B, 1, N, H] attending to its paged cache (pools [K, P, bs, H] with the token written,
  block_table [B, M]) through dsjax.model.paged_attention: JAX's shipped paged-attention kernel where it fits
  (`path` 'pallas'), else the gather reference; a sparse window gathers only the blocks it can see. Rows with
  segment 0 (padding) give zeros. Routed gates multiply each head's output. Returns [B, 1, N, H] in q.dtype."""
  lengths = jnp.where(segment_ids[:, 0] > 0, positions[:, 0] + 1, 0).astype(jnp.int32)

  def attention(q, k_pages, v_pages, block_table, lengths):
    return paged_attention.paged_decode_attention(q, k_pages, v_pages, block_table, lengths, window=window,
                                                  num_global=num_global, path=path, platform=platform)

  plan = partitioning.shard_plan(q.shape[0], q.shape[2], k_pages.shape[0])  # the pools' kv heads are on axis 0
  out = per_shard(attention, plan, (('batch', 'heads', None), POOL_DIMS, POOL_DIMS, ('batch', None), ('batch',)),
                  ('batch', 'heads', None))(q[:, 0], k_pages, v_pages, block_table, lengths)[:, None]
  if gates is not None:
    out = out * gates[..., None].astype(out.dtype)
  return out.astype(q.dtype)
