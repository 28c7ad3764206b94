"""Multi-head latent attention (DeepSeek-V2 section 2.1), as transformers' DeepseekV2/V3 attention computes it.

Per token, keys and values come from a compressed latent c = RMSNorm(x W_dkv) of `kv_lora_rank` numbers and one
RoPE key k_r shared by all heads (decoupled RoPE); each head's key is [c W_uk_n, k_r] and its value c W_uv_n.
Queries are projected from x, or from a compressed query latent (`q_lora_rank` > 0, DeepSeek-V2/V3; absent in
V2-Lite), and split into a part without position encoding and a RoPE part.

  training / prefill without a cache: keys and values expanded per head, then the usual masked attention (any
    `attention.kind` mask: full or sparse; any `impl`)
  decoding (a cache): the cache holds only c and k_r per token (kv_lora_rank + qk_rope_head_dim numbers: 576 for
    DeepSeek-V2-Lite against 2 x 16 x 128 = 4,096 for its heads uncompressed) and attention runs in the absorbed
    form: W_uk is folded into the query (q_n W_uk_n^T scores against c directly) and W_uv into the output
    (probabilities times c, then W_uv), so no per-head key or value is ever materialised.

The cache reuses the KV cache's structure (dsjax/model/cache.py): its 'k' arrays hold c as one "head" of
kv_lora_rank numbers and its 'v' arrays hold k_r, so slots, rings, truncation and engine rows work unchanged.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dsjax.model import positions as positions_lib
from dsjax.model.attention import LayerCache, attend, mask_args
from dsjax.model.layers import Linear, RMSNorm, to_dtype
from dsjax.model.masks import make_attention_mask


def cache_head_dims(cfg: ml_collections.ConfigDict) -> tuple[int, int]:
  """(k, v) sizes per token of one layer's decode cache for latent attention: (kv_lora_rank, qk_rope_head_dim)."""
  return cfg.mla.kv_lora_rank, cfg.mla.qk_rope_head_dim


def softmax_scale(cfg: ml_collections.ConfigDict) -> float:
  """The score scale of HF's DeepseekV2/V3 attention: (qk_nope + qk_rope)^-1/2, times mscale^2 under YaRN with
  `yarn_mscale_all_dim` set (mscale = 0.1 * mscale_all_dim * ln(factor) + 1)."""
  la = cfg.mla
  return (la.qk_nope_head_dim + la.qk_rope_head_dim) ** -0.5 * positions_lib.yarn_softmax_scale_multiplier(
      cfg.positions)


class UpProjection(Linear):
  """kv_b_proj: latent [.., R] -> per head [.., N, qk_nope + v]. Also hands its weight to the absorbed form."""

  def per_head_weight(self) -> jax.Array:
    """The kernel as [N, qk_nope + v, R] in the compute dtype (the decoding layout stores it so: no copy)."""
    if self.has_variable('params', 'kernel_t'):
      return self.get_variable('params', 'kernel_t').astype(self.dtype)
    stored = self.get_variable('params', 'kernel')
    value = stored.unbox() if hasattr(stored, 'unbox') else stored  # a quantized kernel: dequantized
    return jnp.transpose(value, (1, 2, 0)).astype(self.dtype)


def latent_attention(q_latent: jax.Array, q_rope: jax.Array, latent: jax.Array, k_rope: jax.Array,
                     mask: jax.Array, scale: float) -> jax.Array:
  """Absorbed-form attention scores and mix over the latent cache.

  Args:
    q_latent: [B, T, N, R] queries with W_uk folded in. q_rope: [B, T, N, Hr].
    latent: [B, S, R]. k_rope: [B, S, Hr]. mask: bool [B, T, S].
  Returns:
    float32 [B, T, N, R]: the probability-weighted latents (W_uv is applied by the caller). Queries with no
    visible key return zeros.
  """
  f32 = jnp.float32
  scores = (jnp.einsum('BTNR,BSR->BTNS', q_latent, latent, preferred_element_type=f32)
            + jnp.einsum('BTNH,BSH->BTNS', q_rope, k_rope, preferred_element_type=f32))
  scores = jnp.where(mask[:, :, None], scores * scale, jnp.finfo(f32).min)
  probs = jnp.where(mask[:, :, None], jax.nn.softmax(scores, axis=-1), 0.0)
  return jnp.einsum('BTNS,BSR->BTNR', probs, latent.astype(f32))


class LatentAttention(nn.Module):
  """Multi-head latent attention with the interface of `dsjax.model.attention.Attention` (`cfg`: the model config).

  Params (HF DeepseekV2/V3 names): q_proj [D, N, Hq] or q_a_proj [D, Rq] + q_a_layernorm + q_b_proj [Rq, N, Hq]
  (Hq = qk_nope + qk_rope); kv_a_proj_with_mqa [D, R + Hr]; kv_a_layernorm [R]; kv_b_proj [R, N, qk_nope + v];
  o_proj [N, v, D]. The RoPE dimensions are in rotate-half order (HF's interleaved pairs are permuted on import).
  """
  cfg: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
               memory: tuple[jax.Array, jax.Array, jax.Array] | None = None, cache: LayerCache | None = None
               ) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array] | None]:
    """x [B, T, D], positions / segment_ids int [B, T] -> (out [B, T, D], 0.0 (no router), the cache's
    (latent [B, S, 1, R], rope key [B, S, 1, Hr]) with the new tokens written, or None)."""
    if memory is not None:
      raise ValueError('latent attention has no Transformer-XL memory (positions.kind must be rope)')
    cfg, la = self.cfg, self.cfg.mla
    d, n = cfg.hidden_size, cfg.num_heads
    hn, hr, hv, r = la.qk_nope_head_dim, la.qk_rope_head_dim, la.v_head_dim, la.kv_lora_rank
    dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
    kw = dict(init_std=cfg.init_std, dtype=dtype, param_dtype=param_dtype)
    norm = dict(eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype)
    packed = segment_ids is not None
    if not packed:
      segment_ids = jnp.ones_like(positions)

    if la.q_lora_rank:
      q_latent = Linear((d, la.q_lora_rank), ('embed', 'q_lora'), 'BTD,DR->BTR', name='q_a_proj', **kw)(x)
      q = Linear((la.q_lora_rank, n, hn + hr), ('q_lora', 'heads', 'head_dim'), 'BTR,RNH->BTNH', name='q_b_proj',
                 **kw)(RMSNorm(name='q_a_layernorm', **norm)(q_latent))
    else:
      q = Linear((d, n, hn + hr), ('embed', 'heads', 'head_dim'), 'BTD,DNH->BTNH', name='q_proj', **kw)(x)
    compressed = Linear((d, r + hr), ('embed', 'kv_lora'), 'BTD,DR->BTR', name='kv_a_proj_with_mqa', **kw)(x)
    latent = RMSNorm(name='kv_a_layernorm', **norm)(compressed[..., :r])  # [B, T, R]
    rope = positions_lib.rope_kwargs(cfg.positions)
    q_nope, q_rope = q[..., :hn], positions_lib.apply_rope(q[..., hn:], positions, **rope)
    k_rope = positions_lib.apply_rope(compressed[..., None, r:], positions, **rope)  # [B, T, 1, Hr]
    kv_b = UpProjection((r, n, hn + hv), ('kv_lora', 'heads', 'head_dim'), 'BTR,RNH->BTNH', name='kv_b_proj', **kw)
    o_proj = Linear((n, hv, d), ('heads', 'head_dim', 'embed'), 'BTNH,NHD->BTD', name='o_proj', **kw)
    window, num_global = mask_args(cfg.attention)
    scale = softmax_scale(cfg)
    no_router_loss = jnp.zeros((), jnp.float32)

    if cache is None:
      kv = kv_b(latent)  # [B, T, N, hn + hv]
      k = jnp.concatenate([kv[..., :hn], jnp.broadcast_to(k_rope, (*k_rope.shape[:2], n, hr)).astype(kv.dtype)], -1)
      qk = jnp.concatenate([q_nope, q_rope], axis=-1)
      # The kernels scale scores by 1/sqrt(head dim): fold the rest of the scale into the queries.
      qk = (qk.astype(jnp.float32) * (scale * (hn + hr) ** 0.5)).astype(qk.dtype)
      out = attend(qk, k, kv[..., hn:], positions, positions, segment_ids, segment_ids, impl=cfg.attention.impl,
                   platform=cfg.attention.platform, packed=packed, window=window, num_global=num_global)
      return o_proj(out), no_router_loss, None

    # Decoding: write c and k_r into the cache, then attend in the absorbed form.
    new_latent = cache.store(cache.k, latent[:, :, None])
    new_rope = cache.store(cache.v, k_rope)
    if cache.in_place(cfg, x.shape[1]):
      keys, ropes = cache.view(new_latent)[:, :, 0], cache.view(new_rope)[:, :, 0]
      k_pos, k_seg = cache.written_positions, cache.written_segment_ids
    else:  # the cache as it was, then this call's tokens (exact when they wrap a ring)
      keys = jnp.concatenate([cache.k[:, :, 0].astype(latent.dtype), latent], axis=1)
      ropes = jnp.concatenate([cache.v[:, :, 0].astype(k_rope.dtype), k_rope[:, :, 0]], axis=1)
      k_pos = jnp.concatenate([cache.positions, positions], axis=1)
      k_seg = jnp.concatenate([cache.segment_ids, segment_ids], axis=1)
    w = kv_b.per_head_weight()  # [N, hn + hv, R]
    q_absorbed = jnp.einsum('BTNH,NHR->BTNR', q_nope, w[:, :hn], preferred_element_type=jnp.float32)
    mask = make_attention_mask(positions, k_pos, segment_ids, k_seg, window=window, num_global=num_global)
    mixed = latent_attention(q_absorbed.astype(dtype), q_rope, keys.astype(dtype), ropes.astype(dtype), mask, scale)
    out = jnp.einsum('BTNR,NHR->BTNH', mixed.astype(dtype), w[:, hn:], preferred_element_type=jnp.float32)
    return o_proj(out.astype(dtype)), no_router_loss, (new_latent, new_rope)
