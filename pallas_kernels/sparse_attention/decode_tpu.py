"""Mosaic TPU decode attention kernel (called through `decode.sparse_decode_attention(backend='tpu')`).

Grid (batch, key block): "parallel" over batch rows, "arbitrary" over key blocks, the online-softmax state of every
kv head in VMEM scratch across the key blocks (as splash attention keeps it across its key axis). One grid step
loads a lane-dense [block_k, K*H] tile of the keys and of the values, every kv head of block_k cache slots, from
the cache viewed as [L, B, S, K*H] (a free reshape of [L, B, S, K, H]); the layer is a scalar-prefetched index
into it, so no per-layer slice of the cache is copied. Each kv head's G*Tq query rows (padded to a multiple of
8 sublanes, segment -1) attend to its H-lane slice of the tile. A cache length S that is not a multiple of
block_k leaves a partial last block: its out-of-range slots are masked (and their values zeroed, since the
bytes past the cache are undefined), so the cache is never padded.

Key metadata is lane-dense [B, 2, S] (positions, segments) read as [1, block_k] rows; query metadata is
[B, R, 2] read as [R, 1] columns. Real TPUs need block_k a multiple of 128 (or the whole cache when shorter)
and H a multiple of 128 for free lane slices. No TPU was available: this kernel runs in TPU interpret mode on
CPU in the tests and passes the Pallas TPU lowering there; Mosaic's own compilation is unverified.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.sparse_attention.tpu import _interpret, _scores, _semantics, _visible

_F32 = jnp.float32
_LANES = 128


def _kernel(layer_ref, q_ref, k_ref, v_ref, qrows_ref, krows_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *,
            num_kv_heads, head_dim, block_k, num_slots, scale, window, num_global, softcap):
  del layer_ref  # used by the index maps only
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full_like(m_sc, -jnp.inf)
    l_sc[...] = jnp.zeros_like(l_sc)
    acc_sc[...] = jnp.zeros_like(acc_sc)

  first = j * block_k
  in_cache_row = first + lax.broadcasted_iota(jnp.int32, (1, block_k), 1) < num_slots  # [1, bk]
  in_cache_col = first + lax.broadcasted_iota(jnp.int32, (block_k, 1), 0) < num_slots  # [bk, 1]
  mask = _visible(qrows_ref[:, 0:1], qrows_ref[:, 1:2], krows_ref[0:1, :], krows_ref[1:2, :], window,
                  num_global) & in_cache_row  # [R, bk]
  for h in range(num_kv_heads):  # static: every kv head of this key tile
    lanes = slice(h * head_dim, (h + 1) * head_dim)
    k = jnp.where(in_cache_col, k_ref[:, lanes], 0)
    v = jnp.where(in_cache_col, v_ref[:, lanes], 0)
    s = jnp.where(mask, _scores(q_ref[h], k, scale, softcap)[0], -jnp.inf)  # [R, bk]
    m_prev = m_sc[h]  # [R, 128], lane-replicated
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    p = jnp.exp(s - m_safe[:, :1])
    alpha = jnp.exp(m_prev - m_safe)
    m_sc[h] = m_next
    l_sc[h] = alpha * l_sc[h] + jnp.sum(p, axis=-1, keepdims=True)
    acc_sc[h] = alpha[:, :1] * acc_sc[h] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=_F32)

  @pl.when(j == pl.num_programs(1) - 1)
  def _finish():
    l = l_sc[...]
    nonempty = l > 0
    l_safe = jnp.where(nonempty, l, 1.0)
    o_ref[...] = acc_sc[...] / l_safe[..., :1]
    lse_ref[...] = jnp.where(nonempty, m_sc[...] + jnp.log(l_safe), -jnp.inf)


def decode(q, k, v, layer, q_pos, q_seg, k_pos, k_seg, *, block_k, scale, window, num_global, softcap,
           interpret):
  """q [B, K, R, H] (R a multiple of 8), k/v [L, B, S, K, H], layer int32 [1], q_pos/q_seg [B, R], k_pos/k_seg
  [B, S]. Returns (out [B, K, R, H] float32, lse [B, K, R] float32, -inf where nothing is visible)."""
  B, K, R, H = q.shape
  L, _, S = k.shape[:3]
  block_k = min(block_k, S)  # a cache shorter than one block is one whole-array block
  kernel = functools.partial(_kernel, num_kv_heads=K, head_dim=H, block_k=block_k, num_slots=S, scale=scale,
                             window=window, num_global=num_global, softcap=softcap)
  tile = pl.BlockSpec((None, None, block_k, K * H), lambda b, j, layer_ref: (layer_ref[0], b, j, 0))
  whole_row = lambda *shape: pl.BlockSpec((None, *shape), lambda b, j, _: (b,) + (0,) * len(shape))
  out, lse = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(B, pl.cdiv(S, block_k)),
          in_specs=[whole_row(K, R, H), tile, tile, whole_row(R, 2),
                    pl.BlockSpec((None, 2, block_k), lambda b, j, _: (b, 0, j))],
          out_specs=[whole_row(K, R, H), whole_row(K, R, _LANES)],
          scratch_shapes=[pltpu.VMEM((K, R, _LANES), _F32), pltpu.VMEM((K, R, _LANES), _F32),
                          pltpu.VMEM((K, R, H), _F32)],
      ),
      out_shape=[jax.ShapeDtypeStruct((B, K, R, H), _F32), jax.ShapeDtypeStruct((B, K, R, _LANES), _F32)],
      compiler_params=_semantics(1, 2),
      interpret=_interpret(interpret),
      name='sparse_decode_attention_tpu',
  )(layer, q, k.reshape(L, B, S, K * H), v.reshape(L, B, S, K * H), jnp.stack([q_pos, q_seg], axis=-1),
    jnp.stack([k_pos, k_seg], axis=1))
  return out, lse[..., 0]
