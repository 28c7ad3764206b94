"""Multi-head attention (MHA / GQA / MQA) with full, sparse (window + global) and routed (MoH) kinds.

Every attention call goes through one pure dispatch function, `dispatch.choose(model.attention.impl, call)`, which
names the path: the pure-jnp reference here, or the Pallas / cuDNN kernels (`attention_kernels`, which run them per
shard on a device mesh). Every implementation takes positions and segment ids, never a dense mask, so block-sparse
kernels can skip empty blocks.
"""
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dsjax import config as config_lib
from dsjax.model import attention_kernels
from dsjax.model import dispatch
from dsjax.model import pages as pages_lib
from dsjax.model.layers import Linear, to_dtype
from dsjax.model.masks import make_attention_mask
from dsjax.model.positions import apply_rope, rope_kwargs, sinusoid_embedding
from dsjax.model.routing import HeadRouter



class LayerCache(NamedTuple):
  """The KV cache seen by one layer while decoding, plus where this call's tokens go (see dsjax/model/cache.py).

  k/v are this layer's own arrays (the cache keeps one per layer), so the layer writes its new keys in place and
  reads them where they lie.
  """
  k: jax.Array            # [B, S, K, H] cached keys (RoPE already applied)
  v: jax.Array            # [B, S, K, H]
  positions: jax.Array    # [B, S] int32 positions of the cached tokens
  segment_ids: jax.Array  # [B, S] int32, -1 for empty slots
  write_slot: jax.Array   # [B, T] int32 slot of each new token; S (out of range) for tokens not kept
  written_positions: jax.Array    # [B, S] positions once this call's tokens are written (shared by all layers)
  written_segment_ids: jax.Array  # [B, S]
  # A paged cache (dsjax/model/pages.py): k/v are this layer's page pools [K, P, bs, H] and each row reads its
  # blocks through this table [B, M] (S = M * bs logical slots, slot = position).
  block_table: jax.Array | None = None

  def store(self, pool_or_cache: jax.Array, new_BTKH: jax.Array) -> jax.Array:
    """This layer's k or v storage with the new tokens written at write_slot."""
    if self.block_table is None:
      return write_to_slots(pool_or_cache, new_BTKH, self.write_slot)
    return pages_lib.write_pages(pool_or_cache, new_BTKH, self.block_table, self.write_slot)

  def view(self, stored: jax.Array) -> jax.Array:
    """[B, S, K, H]: the rows' keys or values as a contiguous cache (a paged cache's blocks gathered)."""
    return stored if self.block_table is None else pages_lib.gather_pages(stored, self.block_table)

  def in_place(self, cfg: ml_collections.ConfigDict, num_new: int) -> bool:
    """Whether this call's tokens may attend to the cache with themselves written (see attends_in_place; a paged
    cache is a full cache)."""
    return self.block_table is not None or attends_in_place(cfg, self.k.shape[1], num_new)


class RelativeBias(NamedTuple):
  """Transformer-XL position term: score += (q + v) . r[q_pos - k_pos]; content uses (q + u) . k."""
  r: jax.Array  # [L, N, H]: r[d] for distances d = 0..L-1 (larger distances are clipped to L-1)
  u: jax.Array  # [N, H]
  v: jax.Array  # [N, H]


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
                        q_seg: jax.Array, k_seg: jax.Array, *, window: int | None = None,
                        num_global: int = 0, gates: jax.Array | None = None,
                        rel: RelativeBias | None = None, scale: float | None = None) -> jax.Array:
  """Pure-jnp masked softmax attention; softmax in float32.

  Args:
    q: [B, T, N, H]. k, v: [B, S, K, H] with K dividing N (query head n uses kv head n // (N // K)).
    q_pos, q_seg: int [B, T]; k_pos, k_seg: int [B, S] (see `make_attention_mask`).
    window, num_global: sparse mask parameters (window None = causal only).
    gates: optional [B, T, N] per-head output multipliers (routed attention).
    rel: optional Transformer-XL relative position term.
    scale: score scale, default 1/sqrt(H).
  Returns:
    [B, T, N, H] in v.dtype. Queries with no visible key return zeros.
  """
  b, t, n, h = q.shape
  kh = k.shape[2]
  g = n // kh
  scale = h ** -0.5 if scale is None else scale
  qg = q.reshape(b, t, kh, g, h)
  q_content = qg if rel is None else qg + rel.u.reshape(kh, g, h).astype(q.dtype)
  scores = jnp.einsum('BTKGH,BSKH->BKGTS', q_content, k, preferred_element_type=jnp.float32)
  if rel is not None:
    length = rel.r.shape[0]
    q_position = qg + rel.v.reshape(kh, g, h).astype(q.dtype)
    by_distance = jnp.einsum('BTKGH,LKGH->BKGTL', q_position, rel.r.reshape(length, kh, g, h).astype(q.dtype),
                             preferred_element_type=jnp.float32)
    distance = jnp.clip(q_pos[:, :, None] - k_pos[:, None, :], 0, length - 1)  # [B, T, S]
    scores += jnp.take_along_axis(by_distance, distance[:, None, None], axis=-1)
  mask = make_attention_mask(q_pos, k_pos, q_seg, k_seg, window=window, num_global=num_global)[:, None, None]
  scores = jnp.where(mask, scores * scale, jnp.finfo(jnp.float32).min)
  probs = jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)
  out = jnp.einsum('BKGTS,BSKH->BTKGH', probs.astype(v.dtype), v).reshape(b, t, n, v.shape[-1])
  if gates is not None:
    out = out * gates[..., None].astype(out.dtype)
  return out


FEW_QUERIES = 8  # cached calls with at most this many tokens per row (decode steps, verification chunks)


def few_query_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
                        q_seg: jax.Array, k_seg: jax.Array, *, window: int | None = None, num_global: int = 0,
                        gates: jax.Array | None = None) -> jax.Array:
  """`reference_attention` (no relative term) for a few queries per row against a KV cache (a decode step, a
  speculative verification chunk), written as multiply-reduce over the cache in its [B, S, K, H] layout. As batched
  dots over (B, K), XLA would first copy each layer's cache into the [B, K, S, H] order its matmuls need, on every
  step; a reduction reads it in place, and a few queries make this memory-bound anyway. Same arguments and result
  as reference_attention."""
  b, t, n, h = q.shape
  kh = k.shape[2]
  g = n // kh
  f32 = jnp.float32
  qg = q.reshape(b, t, 1, kh, g, h).astype(f32) * h ** -0.5
  scores = jnp.sum(qg * k[:, None, :, :, None, :].astype(f32), axis=-1)  # [B, T, S, K, G]
  mask = make_attention_mask(q_pos, k_pos, q_seg, k_seg, window=window, num_global=num_global)[..., None, None]
  scores = jnp.where(mask, scores, jnp.finfo(f32).min)
  probs = jnp.where(mask, jax.nn.softmax(scores, axis=2), 0.0).astype(v.dtype)
  out = jnp.sum(probs[..., None].astype(f32) * v[:, None, :, :, None, :].astype(f32), axis=2)  # [B, T, K, G, H]
  out = out.astype(v.dtype).reshape(b, t, n, h)
  if gates is not None:
    out = out * gates[..., None].astype(out.dtype)
  return out


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, q_seg: jax.Array,
           k_seg: jax.Array, *, impl: str = 'auto', platform: str = '', packed: bool = True,
           window: int | None = None, num_global: int = 0, gates: jax.Array | None = None,
           rel: RelativeBias | None = None, scale: float | None = None) -> jax.Array:
  """Attention without a cache on the path `dispatch.choose(impl, ...)` names (arguments as reference_attention).

  The kernel paths are self-attention over rows whose positions increase by 1 within each document (as packing
  and the sampler lay them out); `packed=False` says each row is one document without padding (cuDNN's case).
  platform: what to build for ('' = this process's default backend; see `resolve_platform`).
  """
  call = dispatch.AttentionCall(platform=resolve_platform(platform), dtype=jnp.dtype(q.dtype).name,
                                mask=mask_kind(window, num_global), routed=gates is not None, packed=packed,
                                relative=rel is not None or k.shape[1] != q.shape[1], head_dim=q.shape[-1])
  path = dispatch.choose(impl, call)
  if path == 'reference':
    return reference_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, window=window, num_global=num_global,
                               gates=gates, rel=rel, scale=scale)
  if scale is not None:
    raise ValueError(f'attend: a custom scale runs on impl=reference only (the {path} path scales by 1/sqrt(H))')
  hv = v.shape[-1]
  if hv != q.shape[-1]:  # the kernels take one head size: values padded with zeros (latent attention: 128 vs 192)
    v = jnp.pad(v, ((0, 0),) * 3 + ((0, q.shape[-1] - hv),)) if hv < q.shape[-1] else None
    if v is None:
      raise ValueError(f'attend: value heads ({hv}) larger than query heads ({q.shape[-1]}) need impl=reference')
  out = attention_kernels.self_attention(path, q, k, v, q_pos, q_seg, window=window, num_global=num_global,
                                         gates=gates, platform=call.platform)
  return out[..., :hv]


def resolve_platform(platform: str = '') -> str:
  """'cpu', 'gpu' or 'tpu': `platform` ('' = this process's default JAX backend; other backends count as 'cpu').

  Set model.attention.platform to build for another platform than the one tracing, e.g. 'tpu' to lower the model
  for TPU on a CPU machine (`jax.jit(f).trace(...).lower(lowering_platforms=('tpu',))`)."""
  platform = platform or jax.default_backend()
  return platform if platform in dispatch.PLATFORMS else 'cpu'


def mask_kind(window: int | None, num_global: int) -> str:
  """The dispatch's mask name for (window, num_global)."""
  if window is None:
    return 'causal'
  return 'window+global' if num_global else 'window'


def mask_args(attention_cfg: ml_collections.ConfigDict) -> tuple[int | None, int]:
  """(window, num_global) for the configured attention kind; (None, 0) means plain causal."""
  a = attention_cfg
  if a.kind == 'sparse' or (a.kind == 'routed' and a.sparse_mask):
    return a.window, a.num_global
  return None, 0


def uses_ring(cfg: ml_collections.ConfigDict) -> bool:
  """Whether decoding keeps a bounded ring cache (sparse attention with RoPE; see dsjax/model/cache.py)."""
  return mask_args(cfg.attention)[0] is not None and cfg.positions.kind == 'rope'


def attends_in_place(cfg: ml_collections.ConfigDict, slots: int, num_new: int) -> bool:
  """Whether `num_new` tokens may be written into a cache of `slots` slots first and then attend to it (no copy of
  the cache plus the chunk). True for one token, and for any chunk with a full cache (a slot per position). In a
  ring of R = slots - num_global slots, token i of the chunk displaces the key R positions back, which the chunk's
  first query can still see when R - i < window: safe iff num_new - 1 <= R - window (the ring's extra slots, as
  speculative verification of gamma + 1 tokens with Sampler(extra_slots >= gamma + 1) has)."""
  if num_new == 1 or not uses_ring(cfg):
    return True
  window, num_global = mask_args(cfg.attention)
  return num_new - 1 <= slots - num_global - window


class Attention(nn.Module):
  """Attention block body: projections, RoPE or XL encoding, masked attention, optional head routing.

  `cfg` is the `model` config section.
  """
  cfg: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
               memory: tuple[jax.Array, jax.Array, jax.Array] | None = None, cache: LayerCache | None = None
               ) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Attention over x [B, T, D] with positions, segment_ids int [B, T] (None: one document per row).

    memory: optional (hidden [B, M, D], positions [B, M], segment ids [B, M]) prepended to the keys/values.
    cache: optional KV cache (decoding): the new tokens attend to the cached keys and to each other, and their
      keys/values are written to `cache.write_slot`.
    Returns (out [B, T, D], router load-balance loss: float32 scalar, 0 unless routed, (k, v) this layer's cache
    [B, S, K, H] with the new tokens written, or None).
    """
    cfg, a = self.cfg, self.cfg.attention
    d, n, kh, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, config_lib.head_dim(cfg)
    dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
    kw = dict(init_std=cfg.init_std, dtype=dtype, param_dtype=param_dtype)
    packed = segment_ids is not None  # None: each row is one document, no padding (what cuDNN can express)
    if not packed:
      segment_ids = jnp.ones_like(positions)

    kv_in, k_pos, k_seg = x, positions, segment_ids
    if memory is not None:
      mem_hidden, mem_pos, mem_seg = memory
      kv_in = jnp.concatenate([mem_hidden.astype(x.dtype), x], axis=1)
      k_pos = jnp.concatenate([mem_pos, positions], axis=1)
      k_seg = jnp.concatenate([mem_seg, segment_ids], axis=1)

    qkv = dict(kw, use_bias=bool(cfg.get('qkv_bias', False)))  # Qwen2: biases on q, k, v (not o)
    q = Linear((d, n, h), ('embed', 'heads', 'head_dim'), 'BTD,DNH->BTNH', name='q_proj', **qkv)(x)
    k = Linear((d, kh, h), ('embed', 'kv_heads', 'head_dim'), 'BSD,DKH->BSKH', name='k_proj', **qkv)(kv_in)
    v = Linear((d, kh, h), ('embed', 'kv_heads', 'head_dim'), 'BSD,DKH->BSKH', name='v_proj', **qkv)(kv_in)

    if cfg.positions.kind not in ('rope', 'xl'):
      raise ValueError(f'model.positions.kind: unknown {cfg.positions.kind!r}, expected rope or xl')
    if cfg.positions.kind == 'rope':
      rope = rope_kwargs(cfg.positions)  # linear or YaRN scaling
      q, k = apply_rope(q, positions, **rope), apply_rope(k, k_pos, **rope)
    window, num_global = mask_args(a)
    gates, router_loss = None, jnp.zeros((), jnp.float32)
    if a.kind == 'routed':
      gates, router_loss = HeadRouter(n, a.num_shared_heads, a.top_k, cfg.init_std, param_dtype,
                                      name='router')(x, segment_ids > 0)
    call = dispatch.AttentionCall(platform=resolve_platform(a.platform), dtype=dtype.name,
                                  mask=mask_kind(window, num_global), routed=gates is not None, packed=packed,
                                  cached=cache is not None, relative=cfg.positions.kind == 'xl', head_dim=h)
    path = dispatch.choose(a.impl, call)

    new_kv = out = None
    if cache is not None:
      new_kv = (cache.store(cache.k, k), cache.store(cache.v, v))
      # Decoding one token, or a short chunk (speculative verification): its tokens are in the updated cache and
      # the keys they displaced from a ring are out of their windows, so it attends to the updated cache itself (no
      # copy of the cache per step). Otherwise to the cache as it was (before this call's write), then this call's
      # tokens: exact even when they wrap a ring.
      in_place = cache.in_place(cfg, x.shape[1])
      if cache.block_table is not None and x.shape[1] == 1 and cfg.positions.kind == 'rope':  # paged decode step
        out = attention_kernels.paged_decode(path, q, *new_kv, cache.block_table, positions, segment_ids,
                                             window=window, num_global=num_global, gates=gates,
                                             platform=call.platform)
      elif path != 'reference':  # the kernels take stacked [L, ...] caches and an index: this layer's as [1, ...]
        stacked = lambda kv: tuple(cache.view(t)[None] for t in kv)
        out = attention_kernels.cached_attention(
            q, k, v, positions, segment_ids, (*stacked((cache.k, cache.v)), cache.positions, cache.segment_ids),
            (*stacked(new_kv), cache.written_positions, cache.written_segment_ids) if in_place else None,
            jnp.int32(0), window=window, num_global=num_global, gates=gates, platform=call.platform)
      elif in_place:
        k, v = (cache.view(t).astype(k.dtype) for t in new_kv)
        k_pos, k_seg = cache.written_positions, cache.written_segment_ids
      else:
        k = jnp.concatenate([cache.k.astype(k.dtype), k], axis=1)
        v = jnp.concatenate([cache.v.astype(v.dtype), v], axis=1)
        k_pos = jnp.concatenate([cache.positions, k_pos], axis=1)
        k_seg = jnp.concatenate([cache.segment_ids, k_seg], axis=1)
    if out is not None:
      pass
    elif path == 'reference':
      rel = None
      if cfg.positions.kind == 'xl':
        zeros = nn.with_logical_partitioning(nn.initializers.zeros, ('heads', 'head_dim'))
        u = self.param('u_bias', zeros, (n, h), param_dtype)
        vb = self.param('v_bias', zeros, (n, h), param_dtype)
        # 0..S-1 covers every visible distance when positions step by 1 within a document.
        distances = jnp.arange(k.shape[1])
        r = Linear((d, n, h), ('embed', 'heads', 'head_dim'), 'LD,DNH->LNH', name='r_proj',
                   **kw)(sinusoid_embedding(distances, d))
        rel = RelativeBias(r, u, vb)
      if cache is not None and rel is None and x.shape[1] <= FEW_QUERIES:  # a decode step, a short chunk
        out = few_query_attention(q, k, v, positions, k_pos, segment_ids, k_seg, window=window,
                                  num_global=num_global, gates=gates)
      else:
        out = reference_attention(q, k, v, positions, k_pos, segment_ids, k_seg, window=window,
                                  num_global=num_global, gates=gates, rel=rel)
    elif cache is None:
      out = attention_kernels.self_attention(path, q, k, v, positions, segment_ids, window=window,
                                             num_global=num_global, gates=gates, platform=call.platform)
    out = Linear((n, h, d), ('heads', 'head_dim', 'embed'), 'BTNH,NHD->BTD', name='o_proj', **kw)(out)
    return out, router_loss, new_kv


def write_to_slots(cache: jax.Array, new: jax.Array, slot: jax.Array) -> jax.Array:
  """cache [B, S, ...] with new [B, T, ...] written at slot [B, T]; slots >= S are dropped."""
  rows = jnp.arange(new.shape[0])[:, None]
  return cache.at[rows, slot].set(new.astype(cache.dtype), mode='drop')
