"""LLaMA-style decoder: embedding, a scanned stack of pre-norm blocks, final norm, LM head; XL memory."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dsjax import config as config_lib
from dsjax.model import cache as cache_lib
from dsjax.model import layout
from dsjax.model import partitioning
from dsjax.model import moe as moe_lib
from dsjax.model.attention import Attention, LayerCache, write_to_slots
from dsjax.model.layers import MLP, Embedder, Linear, RMSNorm, to_dtype
from dsjax.model.mla import LatentAttention

Memory = dict[str, jax.Array]  # hidden [L, B, M, D], positions [B, M] int32, segment_ids [B, M] int32

REMAT_POLICIES = {
    'full': None,  # save nothing, recompute the whole block
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def uses_memory(cfg: ml_collections.ConfigDict) -> bool:
  """True when the model carries Transformer-XL memory (positions.kind 'xl' and mem_len > 0)."""
  return cfg.positions.kind == 'xl' and cfg.positions.mem_len > 0


def init_memory(cfg: ml_collections.ConfigDict, batch_size: int, dtype: Any = None) -> Memory:
  """Empty XL memory for the `model` config: all slots carry segment id -1, so no query sees them."""
  m = cfg.positions.mem_len
  return dict(
      hidden=jnp.zeros((cfg.num_layers, batch_size, m, cfg.hidden_size), to_dtype(dtype or cfg.dtype)),
      positions=jnp.zeros((batch_size, m), jnp.int32),
      segment_ids=jnp.full((batch_size, m), -1, jnp.int32))


class Block(nn.Module):
  """x + attention(rmsnorm(x)); x + mlp(rmsnorm(x)). Called by nn.scan (stacked params: training) or once per
  layer (params in the decoding layout): ((x, this layer's cache k/v [B, S, K, H] or None), this layer's memory, ...)
  -> ((x, cache k/v with the new tokens written in place), (losses: dict of float32 scalars and the expert load,
  new memory)). The attention is latent (dsjax/model/mla.py) when model.mla.kv_lora_rank > 0; the MLP is
  DeepSeekMoE (dsjax/model/moe.py) when `moe`, else the dense SwiGLU of model.mlp_dim."""
  cfg: ml_collections.ConfigDict
  deterministic: bool = True
  moe: bool = False

  @nn.compact
  def __call__(self, carry: tuple[jax.Array, tuple[jax.Array, jax.Array] | None], mem_hidden: jax.Array | None,
               positions: jax.Array, segment_ids: jax.Array, mem_pos: jax.Array | None,
               mem_seg: jax.Array | None, cache_meta: tuple[jax.Array, ...] | None):
    x, cache_kv = carry
    # The hidden states stay split over the batch axes (FSDP gathers weights, not activations; the attention
    # kernels' shard_map finds its inputs where it needs them).
    x = partitioning.constrain(x, ('batch', None, None))
    cfg = self.cfg
    dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
    norm = dict(eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype)
    attn_norm = RMSNorm(name='attn_norm', **norm)
    # Memory holds raw layer inputs; keys/values see them through the same norm as the current inputs.
    memory = None if mem_hidden is None else (attn_norm(mem_hidden), mem_pos, mem_seg)

    cache = None if cache_kv is None else LayerCache(*cache_kv, *cache_meta)
    attention = LatentAttention if cfg.mla.kv_lora_rank else Attention
    h, router_loss, new_kv = attention(cfg, name='attention')(attn_norm(x), positions, segment_ids, memory, cache)
    y = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)
    mlp_in = RMSNorm(name='mlp_norm', **norm)(y)
    losses = dict(router_loss=router_loss)
    if self.moe:
      valid = jnp.ones(x.shape[:2], bool) if segment_ids is None else segment_ids > 0
      h, moe_aux = moe_lib.MoE(cfg, name='mlp')(mlp_in, valid)
      losses.update(moe_balance_loss=moe_aux['balance_loss'], expert_load=moe_aux['expert_load'])
    else:
      h = MLP(cfg.hidden_size, cfg.mlp_dim, cfg.init_std, dtype, param_dtype, name='mlp')(mlp_in)
    y = y + nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)

    new_mem = None
    if mem_hidden is not None:  # keep the last M layer inputs of (old memory, this segment)
      m = mem_hidden.shape[1]
      new_mem = jax.lax.stop_gradient(
          jnp.concatenate([mem_hidden, x.astype(mem_hidden.dtype)], axis=1)[:, -m:])
    return (y, new_kv), (losses, new_mem)


def moe_layers(cfg: ml_collections.ConfigDict) -> list[bool]:
  """Per layer, whether its MLP is DeepSeekMoE: every layer after the first moe.first_dense_layers, when the model
  has routed experts (moe.layer_freq is 1, as in every published DeepSeek-V2/V3 model)."""
  num_dense = cfg.moe.first_dense_layers if cfg.moe.num_experts else cfg.num_layers
  return [i >= num_dense for i in range(cfg.num_layers)]


def cache_inputs(cfg: ml_collections.ConfigDict, cache: cache_lib.Cache, positions: jax.Array,
                 segment_ids: jax.Array) -> tuple[tuple[Any, Any], tuple[jax.Array, ...]]:
  """The per-layer caches ((k arrays), (v arrays)) and what every layer's attention needs to write and read them:
  (cached positions, cached segment ids, write slot [B, T], positions and segment ids once written [B, S])."""
  cache_lib.check_cache(cfg, cache)
  slot = cache_lib.write_slots(cfg, cache, positions, segment_ids)
  written = (write_to_slots(cache['positions'], positions, slot),
             write_to_slots(cache['segment_ids'], segment_ids, slot))
  paged = (cache['block_table'],) if cache_lib.is_paged(cache) else ()
  return (cache['k'], cache['v']), (cache['positions'], cache['segment_ids'], slot, *written, *paged)


# Params of multi-token-prediction depth k: 'mtp_{k-1}' (the module) and 'mtp_{k-1}_norm' (its head's norm).
MTP_PREFIX = 'mtp_'


class MultiTokenPredictor(nn.Module):
  """One multi-token-prediction depth (DeepSeek-V3 section 2.2): h' = Block(eh_proj([RMSNorm(emb); RMSNorm(h)])).
  The embedding comes first in the concatenation, as in the published checkpoint's consumers (vLLM, sglang).
  (h [B, T, D], emb [B, T, D], positions, segment_ids) -> h' [B, T, D] (before the head's norm)."""
  cfg: ml_collections.ConfigDict
  deterministic: bool = True
  moe: bool = False

  @nn.compact
  def __call__(self, h: jax.Array, emb: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
               cache_kv: tuple[jax.Array, jax.Array] | None = None, cache_meta: tuple[jax.Array, ...] | None = None
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """-> (h', its block's cache k/v with the new tokens written, or None without a cache)."""
    cfg = self.cfg
    dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
    norm = dict(eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype)
    joined = jnp.concatenate([RMSNorm(name='enorm', **norm)(emb), RMSNorm(name='hnorm', **norm)(h)], axis=-1)
    x = Linear((2 * cfg.hidden_size, cfg.hidden_size), (None, 'embed'), 'BTE,ED->BTD', cfg.init_std, dtype,
               param_dtype, name='eh_proj')(joined)
    (x, new_kv), _ = Block(cfg, self.deterministic, self.moe, name='block')(
        (x, cache_kv), None, positions, segment_ids, None, None, cache_meta)
    return x, new_kv


class MultiTokenDrafter(nn.Module):
  """Decoding with the first multi-token-prediction depth (the speculative drafter `--draft=mtp`), on the
  Transformer's own params (their 'embedder', 'mtp_0', 'mtp_0_norm' and 'lm_head'): (tokens [B, T] whose
  embeddings enter, main-model or previous-MTP states h [B, T, D], positions, segment_ids, the depth's KV cache:
  one layer, `cache.init_cache` of the config with num_layers=1) -> (logits float32 [B, T, V], h' [B, T, D], cache).
  Position i takes h at i and the token at i + 1, and predicts the token at i + 2."""
  cfg: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, tokens: jax.Array, h: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               cache: cache_lib.Cache) -> tuple[jax.Array, jax.Array, cache_lib.Cache]:
    cfg = self.cfg
    dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
    one_layer = cfg.copy_and_resolve_references()
    with one_layer.unlocked():
      one_layer.num_layers = 1
    cache_kv, cache_meta = cache_inputs(one_layer, cache, positions, segment_ids)
    embedder = Embedder(cfg.vocab_size, cfg.hidden_size, cfg.init_std, dtype, param_dtype, name='embedder')
    h, new_kv = MultiTokenPredictor(cfg, True, moe_layers(cfg)[-1], name=f'{MTP_PREFIX}0')(
        h.astype(dtype), embedder.encode(tokens), positions, segment_ids, (cache_kv[0][0], cache_kv[1][0]),
        cache_meta)
    normed = RMSNorm(cfg.norm_eps, dtype, param_dtype, name=f'{MTP_PREFIX}0_norm')(h)
    if cfg.tie_embeddings:
      logits = embedder.decode(normed)
    else:
      logits = Linear((cfg.hidden_size, cfg.vocab_size), ('embed', 'vocab'), 'BTD,DV->BTV', cfg.init_std, dtype,
                      param_dtype, preferred_element_type=jnp.float32, name='lm_head')(normed)
    new_cache = dict(k=(new_kv[0],), v=(new_kv[1],), positions=cache_meta[3], segment_ids=cache_meta[4])
    return logits.astype(jnp.float32), h, new_cache


def layer_losses(dense: dict[str, jax.Array] | None, moe: dict[str, jax.Array] | None) -> dict[str, jax.Array]:
  """The model's aux losses from the per-layer ones ([L', ...] stacked per group of layers): router_loss (mean over
  layers), moe_balance_loss (mean over MoE layers; 0 without) and expert_load [L_moe, E] (tokens per routed expert
  per MoE layer; [0, 0] without)."""
  router = [g['router_loss'] for g in (dense, moe) if g is not None]
  aux = dict(router_loss=jnp.mean(jnp.concatenate(router)), moe_balance_loss=jnp.zeros((), jnp.float32),
             expert_load=jnp.zeros((0, 0), jnp.float32))
  if moe is not None:
    aux.update(moe_balance_loss=jnp.mean(moe['moe_balance_loss']), expert_load=moe['expert_load'])
  return aux


class Transformer(nn.Module):
  """Decoder-only LM. `cfg` is the `model` config section.

  apply({'params': p}, tokens [B, T], positions [B, T], segment_ids=None, memory=None, cache=None,
        deterministic=True)
  -> (logits float32 [B, T, V], aux dict(router_loss=float32 scalar, memory=Memory | None, cache=Cache | None,
  hidden=the final-normed hidden states [B, T, D], moe_balance_loss, expert_load (see `layer_losses`),
  mtp_logits=float32 [D, B, T, V] of the multi-token-prediction depths (depth k at position i predicts token
  i + k + 1) or None (no MTP, or decoding with a cache))).
  Positions restart at 0 in each document; segment_ids None means one document per row; 0 marks padding.
  cache (decoding, dsjax/model/cache.py): the tokens attend to the cached ones and are added to the returned cache;
  with a cache, XL memory is not used (the cache holds every past token).
  The layer loop follows the params' layout (dsjax/model/layout.py): the training layout (stacked layers: training,
  checkpoints) runs an `nn.scan`; the decoding layout (`layout.for_decoding`) runs the blocks unrolled, so that every
  weight is read where it lies. A cache needs the decoding layout.
  """
  cfg: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None,
               memory: Memory | None = None, cache: cache_lib.Cache | None = None,
               deterministic: bool = True) -> tuple[jax.Array, dict[str, Any]]:
    cfg = self.cfg
    config_lib.validate_model(cfg)
    dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
    positions = positions.astype(jnp.int32)
    # Attention sees None when rows are single documents without padding (cuDNN can take those); the cache does not.
    row_segments = None if segment_ids is None else segment_ids.astype(jnp.int32)
    segment_ids = jnp.ones_like(positions) if segment_ids is None else row_segments

    cache_kv = cache_meta = None
    if cache is not None:
      if memory is not None:
        raise ValueError('pass either a KV cache or XL memory, not both')
      cache_kv, cache_meta = cache_inputs(cfg, cache, positions, segment_ids)
      written = cache_meta[3:]
      mem_hidden = mem_pos = mem_seg = None
    elif uses_memory(cfg):
      memory = init_memory(cfg, tokens.shape[0], dtype) if memory is None else memory
      mem_hidden, mem_pos, mem_seg = memory['hidden'], memory['positions'], memory['segment_ids']
    elif memory is not None:
      raise ValueError('memory given, but the model has none (needs positions.kind=xl and mem_len > 0)')
    else:
      mem_hidden = mem_pos = mem_seg = None

    embedder = Embedder(cfg.vocab_size, cfg.hidden_size, cfg.init_std, dtype, param_dtype, name='embedder')
    x = embedder.encode(tokens)

    block = Block
    if cfg.remat != 'none':
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
    layer_args = (positions, row_segments, mem_pos, mem_seg, cache_meta)
    is_moe = moe_layers(cfg)
    group_losses = {False: None, True: None}  # per-layer losses stacked, of the dense and of the MoE layers
    if self.has_variable('params', layout.layer_name(0)):  # the decoding layout: an unrolled loop
      kv, losses, hidden = [], [], []
      for i in range(cfg.num_layers):
        layer_kv = None if cache_kv is None else (cache_kv[0][i], cache_kv[1][i])
        (x, new_layer_kv), (loss, layer_hidden) = block(cfg, deterministic, is_moe[i], name=layout.layer_name(i))(
            (x, layer_kv), None if mem_hidden is None else mem_hidden[i], *layer_args)
        kv.append(new_layer_kv)
        losses.append(loss)
        hidden.append(layer_hidden)
      new_kv = None if cache_kv is None else tuple(tuple(layer[j] for layer in kv) for j in range(2))
      for moe in (False, True):
        group = [loss for loss, m in zip(losses, is_moe) if m == moe]
        group_losses[moe] = jax.tree.map(lambda *xs: jnp.stack(xs), *group) if group else None
      new_hidden = None if mem_hidden is None else jnp.stack(hidden)
    else:
      if cache is not None:
        raise ValueError('decoding with a KV cache needs params in the decoding layout: pass '
                         'dsjax.model.layout.for_decoding(params) (Sampler and Engine convert the params they get)')
      # Layers that differ (a dense prefix before the MoE layers) scan as separate stacks.
      hidden = []
      for name, start, stop, moe in layout.layer_groups(is_moe):
        stack = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                        length=stop - start, metadata_params={nn.PARTITION_NAME: layout.STACKED})
        (x, _), (group_losses[moe], group_hidden) = stack(cfg, deterministic, moe, name=name)(
            (x, None), None if mem_hidden is None else mem_hidden[start:stop], *layer_args)
        hidden.append(group_hidden)
      new_kv = None
      new_hidden = None if mem_hidden is None else jnp.concatenate(hidden)

    x = RMSNorm(cfg.norm_eps, dtype, param_dtype, name='final_norm')(x)
    if cfg.tie_embeddings:
      head = embedder.decode
    else:
      head = Linear((cfg.hidden_size, cfg.vocab_size), ('embed', 'vocab'), 'BTD,DV->BTV', cfg.init_std,
                    dtype, param_dtype, preferred_element_type=jnp.float32, name='lm_head')
    logits = head(x)
    mtp_logits = None
    if cfg.mtp.num_layers and cache is None:
      # Depth k (1-based) sees, at position i, its predecessor's state and the embedding of token i + k, and
      # predicts token i + k + 1 (DeepSeek-V3 eq. 21-23); depth 1 starts from the final-normed main states.
      h, depths = x, []
      for k in range(1, cfg.mtp.num_layers + 1):
        ahead = jnp.pad(tokens[:, k:], ((0, 0), (0, k)))  # token i + k at position i (0 past the row's end)
        h, _ = MultiTokenPredictor(cfg, deterministic, is_moe[-1], name=f'{MTP_PREFIX}{k - 1}')(
            h, embedder.encode(ahead), positions, row_segments)
        depths.append(head(RMSNorm(cfg.norm_eps, dtype, param_dtype, name=f'{MTP_PREFIX}{k - 1}_norm')(h)))
      mtp_logits = jnp.stack(depths).astype(jnp.float32)

    new_memory = None
    if mem_hidden is not None:
      m = cfg.positions.mem_len
      new_memory = dict(
          hidden=new_hidden,
          positions=jax.lax.stop_gradient(jnp.concatenate([mem_pos, positions], axis=1)[:, -m:]),
          segment_ids=jax.lax.stop_gradient(jnp.concatenate([mem_seg, segment_ids], axis=1)[:, -m:]))
    new_cache = None
    if cache is not None:
      new_cache = dict(cache, k=new_kv[0], v=new_kv[1], positions=written[0], segment_ids=written[1])
    # `hidden` (the final-normed states [B, T, D]) serves as a text embedding (dsjax/retrieval); jit drops it when
    # the caller does not use it.
    return logits.astype(jnp.float32), dict(memory=new_memory, cache=new_cache, hidden=x, mtp_logits=mtp_logits,
                                            **layer_losses(group_losses[False], group_losses[True]))
