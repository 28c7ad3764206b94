"""Where activations and kernel calls live on a device mesh, from the logical-axis rules in context.

The model names logical axes ('batch', 'heads', 'kv_heads', ...) and never mesh axes. When it is traced under a
mesh (`jax.set_mesh`) and flax's `logical_axis_rules` (dsjax.sharding.Placement sets both), the helpers here turn
those names into mesh axes: `constrain` pins an activation's sharding (the hidden states stay split over the batch
axes, so FSDP gathers weights, not activations), and `shard_plan` / `per_shard` run a kernel per shard in
`jax.shard_map`. Without a mesh in context (one device) every helper is a no-op.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

from dsjax import config as config_lib

Dims = tuple[str | None, ...]  # per array dimension: 'batch', 'heads' (query or kv heads) or None (replicated)


def mesh_axes(logical: str, mesh) -> tuple[str, ...]:
  """The mesh axes (of size > 1) that the context's logical-axis rules map `logical` to."""
  axes = nn.logical_to_mesh_axes((logical,))[0]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)


def context_mesh():
  """The mesh in context, or None without one (or with a single device)."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or mesh.size == 1 else mesh


@dataclasses.dataclass(frozen=True)
class ShardPlan:
  """The mesh axes the batch and the heads of one kernel call are split over (empty: replicated)."""
  batch: tuple[str, ...]
  heads: tuple[str, ...]

  def spec(self, dims: Dims) -> P:
    axes = {'batch': self.batch, 'heads': self.heads}
    return P(*(axes[d] or None if d else None for d in dims))


def shard_plan(batch_size: int, num_heads: int, num_kv_heads: int) -> ShardPlan | None:
  """How a kernel call of this size splits over the mesh in context; None without a mesh of several devices.

  A batch the batch axes do not divide (decoding one row on a data-parallel mesh) is replicated. Heads must divide:
  raises ConfigError naming the fields otherwise.
  """
  mesh = context_mesh()
  if mesh is None:
    return None
  size = lambda axes: math.prod(mesh.shape[a] for a in axes)
  batch = mesh_axes('batch', mesh)
  heads, kv_heads = mesh_axes('heads', mesh), mesh_axes('kv_heads', mesh)
  if heads != kv_heads:
    raise config_lib.ConfigError(f'config.mesh.rules: the attention kernels keep GQA groups whole, so `heads` and '
                                 f'`kv_heads` must map to the same mesh axes; got {heads} and {kv_heads}')
  if mesh_axes('head_dim', mesh):
    raise config_lib.ConfigError('config.mesh.rules: the attention kernels need whole heads; `head_dim` must not be '
                                 'sharded')
  for field, count in (('num_kv_heads', num_kv_heads), ('num_heads', num_heads)):
    if count % size(heads):
      raise config_lib.ConfigError(
          f'config.model.{field}={count}: the attention kernels split heads over mesh axes {heads} '
          f'({size(heads)} devices, config.mesh.tensor), which must divide it')
  if batch_size % size(batch):
    batch = ()
  return ShardPlan(batch, heads)


def per_shard(fn: Callable[..., jax.Array], plan: ShardPlan | None, in_dims: Sequence[Dims],
              out_dims: Dims) -> Callable[..., jax.Array]:
  """`fn` run per shard under `plan` (inputs and output split as their dims say), or `fn` itself without a plan."""
  if plan is None:
    return fn
  return jax.shard_map(fn, in_specs=tuple(plan.spec(d) for d in in_dims), out_specs=plan.spec(out_dims),
                       check_vma=False)


def constrain(x: jax.Array, dims: Dims) -> jax.Array:
  """x with its sharding pinned: dimension i split over the mesh axes of logical axis dims[i] in context, None
  dimensions replicated. x is left to XLA where those axes do not divide a dimension (a single decoded row; one
  example inside DP-SGD's per-example vmap, whose example axis the vmap places itself)."""
  mesh = context_mesh()
  if mesh is None:
    return x
  spec = []
  for size, dim in zip(x.shape, dims):
    axes = mesh_axes(dim, mesh) if dim else ()
    if size % math.prod(mesh.shape[a] for a in axes):
      return x
    spec.append(axes or None)
  return jax.lax.with_sharding_constraint(x, P(*spec))


def batch_axes() -> tuple[str, ...] | None:
  """The mesh axes the context's rules split the batch over (None without a mesh): `jax.vmap(spmd_axis_name=...)`
  of a per-example map keeps its example axis there."""
  mesh = context_mesh()
  return (mesh_axes('batch', mesh) or None) if mesh is not None else None
