"""Grouping the tokens routed to each head into dense rows, as grouped-matmul MoE kernels do.

Head n's active tokens, in token order, become rows 0..count[n]-1 of a [B, C, N, H] array (C = T: a head
may be chosen by every token); rows past count are padding with segment -1, which the block schedule skips
without loading anything. The attention kernel then runs on these rows with per-head query metadata, so the
work done for head n is proportional to the number of tokens that chose it.

Only jnp gathers happen here (O(B*T*N*H) memory traffic, no sort: a cumulative sum gives each active token
its row). gather_rows and scatter_rows are a permutation of the active (token, head) pairs and its inverse (zeros
elsewhere), so each is the other's transpose: their custom VJPs say so, and the backward runs the other gather
instead of the scatter-add that autodiff of a gather gives (atomics on GPU, serialised updates on TPU).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class HeadGroups(NamedTuple):
  index: jax.Array  # [B, N, C] int32: the token in row c of head n (0 for padding rows)
  valid: jax.Array  # [B, N, C] bool: row c of head n holds a routed token
  slot: jax.Array  # [B, T, N] int32: the row of token t in head n (C when inactive)


def group_by_head(active: jax.Array) -> HeadGroups:
  """active bool [B, T, N] -> HeadGroups with capacity C = T."""
  B, T, N = active.shape
  slot = jnp.where(active, jnp.cumsum(active, axis=1, dtype=jnp.int32) - 1, T)
  b = jnp.arange(B)[:, None, None]
  n = jnp.arange(N)[None, None, :]
  tokens = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :, None], (B, T, N))
  # Row T is a dump slot for inactive pairs; it is cut off below.
  index = jnp.zeros((B, N, T + 1), jnp.int32).at[b, n, slot].set(tokens)[..., :T]
  count = jnp.sum(active, axis=1, dtype=jnp.int32)  # [B, N]
  valid = jnp.arange(T, dtype=jnp.int32)[None, None, :] < count[..., None]
  return HeadGroups(index, valid, slot.astype(jnp.int32))


@jax.custom_vjp
def gather_rows(x: jax.Array, groups: HeadGroups) -> jax.Array:
  """x [B, T, N, H] -> rows [B, C, N, H]: rows[b, c, n] = x[b, index[b, n, c], n] on valid rows, 0 on padding."""
  idx = jnp.swapaxes(groups.index, 1, 2)[..., None]  # [B, C, N, 1]
  valid = jnp.swapaxes(groups.valid, 1, 2)[..., None]
  return jnp.where(valid, jnp.take_along_axis(x, idx, axis=1), jnp.zeros((), x.dtype))


def gather_metadata(x: jax.Array, groups: HeadGroups, fill: int) -> jax.Array:
  """Per-token int metadata x [B, T] -> per-head rows [B, N, C]; padding rows get `fill`."""
  rows = jnp.take_along_axis(x[:, None, :], groups.index, axis=2)
  return jnp.where(groups.valid, rows, fill)


@jax.custom_vjp
def scatter_rows(rows: jax.Array, groups: HeadGroups) -> jax.Array:
  """Inverse of gather_rows: rows [B, C, N, H] -> [B, T, N, H], zeros at inactive (token, head) pairs."""
  C = rows.shape[1]
  slot = jnp.minimum(groups.slot, C - 1)[..., None]  # [B, T, N, 1]
  out = jnp.take_along_axis(rows, slot, axis=1)
  return jnp.where((groups.slot < C)[..., None], out, jnp.zeros((), rows.dtype))


def _no_grad(groups: HeadGroups) -> HeadGroups:
  return HeadGroups(*(None for _ in groups))


gather_rows.defvjp(lambda x, groups: (gather_rows(x, groups), groups),
                   lambda groups, ct: (scatter_rows(ct, groups), _no_grad(groups)))
scatter_rows.defvjp(lambda rows, groups: (scatter_rows(rows, groups), groups),
                    lambda groups, ct: (gather_rows(ct, groups), _no_grad(groups)))
