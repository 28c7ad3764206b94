"""Public entry point: `routed_attention`, head-routed attention that computes only the selected
(token, head) pairs.

Design: token grouping per head (see grouping.py), not routing at query-block granularity. Grouping keeps
the model's per-token routing exact and makes the work for head n proportional to the tokens that chose it;
its cost is two gathers of q/o-sized arrays and, under a sliding window, a key range per compacted block
that is wider than for contiguous tokens (a block of bq rows spans about bq * N / k tokens, so it visits
about (window + bq * N / k) / block_k key blocks instead of (window + bq) / block_k). Routing whole query
blocks to heads would avoid the gathers but would force all tokens of a block to share their heads, a
different (coarser) model. Under a sliding window the span decides the work, so the default query tile there is
32 rows on GPU; without a window a tile's keys run from the document start to its last row whatever its span, so
64-row tiles (half the grid steps, each K/V block loaded half as often, tensor-core tiles twice as tall) cost only
the ~11% more masked area of their longer diagonal edge (B 2, T 1024, N 8, k 4: `default_block_q`'s test).

The attention itself is the block-sparse flash kernel of `pallas_kernels.sparse_attention` run with
per-head query metadata; its custom VJP gives dq, dk, dv, and the gate products around it are plain jnp,
so gradients flow to both the attention inputs and the gates.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp

from pallas_kernels.routed_attention import grouping
from pallas_kernels.routed_attention.reference import routed_attention_reference
from pallas_kernels.sparse_attention import api as sparse_api
from pallas_kernels.sparse_attention.schedule import visited_blocks


DEFAULT_BLOCK_Q = {'gpu': 32, 'tpu': 128}  # under a sliding window; GPU without one: WINDOWLESS_BLOCK_Q
WINDOWLESS_BLOCK_Q = 64


def default_block_q(backend: str | None, window: int | None) -> int | None:
  """The compacted query tile: on GPU 64 rows without a window (the span of a tile does not widen its causal key
  range), 32 under one (it does); 128 on TPU (Mosaic lane tiles). None for an unknown backend (rejected later)."""
  backend = backend or sparse_api.default_backend()
  if backend == 'gpu' and window is None:
    return WINDOWLESS_BLOCK_Q
  return DEFAULT_BLOCK_Q.get(backend)


def _validate_gates(q, gates, active):
  want = q.shape[:3]
  if gates.ndim != 3 or gates.shape != want:
    raise ValueError(f'gates must have shape [B, T, N] = {want}; got {gates.shape}')
  if active is not None and active.shape != want:
    raise ValueError(f'active must have shape [B, T, N] = {want}; got {active.shape}')


def _grouped_inputs(q_pos, q_seg, active, cfg, length, k_pos=None, k_seg=None, group=1):
  """Pads the routing to `length` tokens and groups it: (groups, per-head q_pos, q_seg, schedule); padded key
  metadata k_pos, k_seg [B, length] give the TPU kernels their live-pair lists (see sparse_api.block_schedule),
  `group` = N // K query heads per kv head."""
  groups = grouping.group_by_head(sparse_api.pad_tokens(active, length, value=False))
  q_pos = grouping.gather_metadata(sparse_api.pad_tokens(q_pos.astype(jnp.int32), length), groups, 0)
  q_seg = grouping.gather_metadata(sparse_api.pad_tokens(q_seg.astype(jnp.int32), length, value=-1), groups, -1)
  sched = sparse_api.block_schedule(q_pos, q_seg, cfg, q_index=jnp.where(groups.valid, groups.index, 0), k_pos=k_pos,
                                    k_seg=k_seg, group=group)
  return groups, q_pos, q_seg, sched


def routed_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, gates, active=None, *, window=None, num_global=0,
                     scale=None, softcap=None, block_q=None, block_k=None, backend=None, interpret=None):
  """Mixture-of-Head attention. q [B,T,N,H], k/v [B,T,K,H] (K | N), positions/segments int32 [B,T],
  gates float [B,T,N], active bool [B,T,N] (default gates != 0).

  out[b, t, n] = gates[b, t, n] * attention(q[b, t, n], keys) for active pairs and 0 otherwise, with the
  visibility rule of `sparse_attention` (segments, causality, window, num_global) and its soft-capping.
  Only active pairs are computed: each head's active tokens are gathered into dense rows and the block-sparse
  kernel skips the empty rest. Output in q.dtype.

  backend: 'gpu', 'tpu' or 'reference' as in `sparse_attention` (the reference computes every head densely).
  block_q: rows of a compacted query tile (None: `default_block_q`); block_k as in `sparse_attention`.
  """
  sparse_api._validate(q, k, v, q_pos, k_pos, q_seg, k_seg, window, num_global, softcap)  # pylint: disable=protected-access
  _validate_gates(q, gates, active)
  if active is None:
    active = gates != 0
  if backend == 'reference':
    return routed_attention_reference(q, k, v, q_pos, k_pos, q_seg, k_seg, gates, active, window=window,
                                      num_global=num_global, scale=scale, softcap=softcap)
  if block_q is None:
    block_q = default_block_q(backend, window)
  cfg = sparse_api.kernel_config(q, window=window, num_global=num_global, scale=scale, softcap=softcap,
                                 block_q=block_q, block_k=block_k, backend=backend, interpret=interpret)
  T = q.shape[1]
  if k.shape[1] != T:
    raise ValueError(f'the kernel path is self-attention and needs S == T; got S={k.shape[1]}, T={T}')
  Tp = sparse_api.padded_length(T, cfg.block_q, cfg.block_k)
  pad = functools.partial(sparse_api.pad_tokens, length=Tp)
  keys = pad(k_pos.astype(jnp.int32)), pad(k_seg.astype(jnp.int32), value=-1)
  group = q.shape[2] // k.shape[2]
  groups, rows_pos, rows_seg, sched = _grouped_inputs(q_pos, q_seg, active, cfg, Tp, *keys, group=group)
  rows = sparse_api.flash_attention(grouping.gather_rows(pad(q), groups), pad(k), pad(v), rows_pos, keys[0],
                                    rows_seg, keys[1], sched, cfg)
  out = grouping.scatter_rows(rows, groups)[:, :T].astype(jnp.float32)
  return jnp.where(active[..., None], out * gates[..., None].astype(jnp.float32), 0.0).astype(q.dtype)


def count_routed_visited_blocks(q_pos, q_seg, active, *, block_q, block_k, window=None, num_global=0) -> int:
  """(query-row block, key block) pairs the routed forward kernel visits, summed over batch and heads.

  q_pos/q_seg [B, T] (T a multiple of both block sizes), active bool [B, T, N]. With every head active this
  is N times the count of `sparse_attention`, so the ratio of the two is the fraction of attention work done.
  """
  cfg = sparse_api.FlashConfig(window, num_global, 1.0, None, block_q, block_k, 'gpu', True)
  _, _, _, sched = _grouped_inputs(q_pos, q_seg, active, cfg, q_pos.shape[1])
  return int(jnp.sum(visited_blocks(sched, q_pos.shape[1] // block_k)))
