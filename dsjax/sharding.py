"""Device mesh and logical-axis sharding: where parameters and batches live.

Model code names logical axes (`embed`, `heads`, `mlp`, ...); the config's `mesh.rules` map them to the mesh axes
('data', 'fsdp', 'expert', 'tensor'). This module is the one place that turns names into `NamedSharding`s.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Iterator, NamedTuple, Sequence

from flax import linen as nn
import jax
import ml_collections
import numpy as np

from dsjax import config as config_lib
from dsjax import quant

MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Sizes of MESH_AXES; one -1 takes the devices the others leave. (A config written before the expert axis
  existed has no mesh.expert: size 1.)"""
  sizes = [int(mesh_cfg.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise config_lib.ConfigError(f'config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}')
  for axis, size in zip(MESH_AXES, sizes):
    if size == 0 or size < -1:
      raise config_lib.ConfigError(f'config.mesh.{axis}={size}: must be a positive size or -1')
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise config_lib.ConfigError(f'config.mesh={dict(zip(MESH_AXES, sizes))}: the fixed axes ({fixed}) do not '
                                   f'divide the {num_devices} devices')
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise config_lib.ConfigError(f'config.mesh={dict(zip(MESH_AXES, sizes))}: needs {math.prod(sizes)} devices, '
                                 f'{num_devices} are present')
  return tuple(sizes)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The ('data', 'fsdp', 'expert', 'tensor') mesh over `devices` (default: all, across processes), sized from the
  config.

  `jax.make_mesh` orders the devices for the physical topology (ICI rings on TPU, NVLink islands on GPU). Axes are
  `Auto`: shardings are given at the jit boundary and XLA's SPMD partitioner places the intermediates.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def rules(mesh_cfg: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  """The logical-axis rules as flax expects them: ((logical, mesh axis or tuple or None), ...)."""
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in mesh_cfg.rules)


class Placement(NamedTuple):
  """A device mesh and the logical-axis rules that place a model on it.

  Jitted functions that run the model on a mesh are called (and so traced) inside `placement.activate()`:
  `jax.set_mesh(mesh)` plus flax's `logical_axis_rules(rules)`. That is what the attention kernels read to run per
  shard in `shard_map` (dsjax/model/attention_kernels.py); XLA cannot partition a kernel call itself. Activate it
  around the top-level jitted calls only (`placed`): `jax.set_mesh` is refused inside a trace, and under it flax
  applies sharding constraints whenever boxed params are unboxed, which eager code outside jit does not expect.
  """
  mesh: jax.sharding.Mesh
  rules: tuple[tuple[str, Any], ...]

  @classmethod
  def of(cls, mesh: jax.sharding.Mesh, mesh_cfg: ml_collections.ConfigDict) -> Placement:
    return cls(mesh, rules(mesh_cfg))

  @contextlib.contextmanager
  def activate(self) -> Iterator[None]:
    """Trace (and call jitted functions) under this mesh and these rules. Per thread: an engine thread enters its
    own."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield


def activate(placement: Placement | None) -> contextlib.AbstractContextManager:
  """`placement.activate()`, or nothing for None (one device / no mesh)."""
  return contextlib.nullcontext() if placement is None else placement.activate()


def placed(fn: Callable[..., Any], placement: Placement | None) -> Callable[..., Any]:
  """`fn` (a jitted function) called under `placement`, in whatever thread calls it; `fn` itself for None."""
  if placement is None:
    return fn

  @functools.wraps(fn)
  def call(*args, **kwargs):
    with placement.activate():
      return fn(*args, **kwargs)
  return call


def logical_shardings(boxed_tree: Any, mesh: jax.sharding.Mesh, mesh_cfg: ml_collections.ConfigDict) -> Any:
  """NamedSharding per leaf of any tree whose leaves are boxed with logical axis names (params, optimizer moments);
  unboxed leaves (step counters, scalars) are replicated; a quantized kernel (dsjax.quant.QTensor) gets one sharding
  per array from its axis names. A box around no array (optax's MaskedNode: the state a masked-out transform keeps
  for a param, e.g. AdamW's for an MoE correction bias) stays that empty node. Returns a tree shaped like the unboxed
  tree, exactly (a checkpoint restore maps over both)."""
  def spec(x):
    if quant.is_qtensor(x):
      return x.partition_specs()
    if isinstance(x, nn.Partitioned):
      return x.get_partition_spec() if jax.tree_util.tree_leaves(x.value) else x.value
    return jax.sharding.PartitionSpec() if hasattr(x, 'shape') else None
  specs = jax.tree_util.tree_map(spec, boxed_tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  return nn.logical_to_mesh_sharding(specs, mesh, rules(mesh_cfg))


def check_heads_divide(model_cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                       mesh_cfg: ml_collections.ConfigDict) -> None:
  """Raises ConfigError unless the devices the rules split `heads` and `kv_heads` over divide model.num_heads and
  model.num_kv_heads (the attention kernels run whole GQA groups per shard; the projections' params need it too)."""
  for logical, field in (('heads', 'num_heads'), ('kv_heads', 'num_kv_heads')):
    axes = nn.logical_to_mesh_axes((logical,), rules(mesh_cfg))[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    devices = math.prod(mesh.shape[a] for a in axes)
    if model_cfg[field] % devices:
      raise config_lib.ConfigError(
          f'config.model.{field}={model_cfg[field]}: must be divisible by the {devices} devices of mesh axes '
          f'{axes} that config.mesh.rules split `{logical}` over (config.mesh.tensor={mesh_cfg.tensor})')


def local_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's rows of a global batch (process p holds the p-th contiguous block of rows)."""
  per_process = len(batch['inputs']) // jax.process_count()
  rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
  return {k: v[rows] for k, v in batch.items()}


def batch_sharding(mesh: jax.sharding.Mesh, mesh_cfg: ml_collections.ConfigDict) -> jax.sharding.NamedSharding:
  """Sharding of [batch, seq] arrays: the batch dimension over the mesh axes the `batch` rule names."""
  spec = nn.logical_to_mesh_axes(('batch', None), rules(mesh_cfg))
  return jax.sharding.NamedSharding(mesh, spec)


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def global_batch(local_batch: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process's rows into global arrays (rows of process 0 first), without moving data across hosts."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def param_shardings(boxed_params: Any, mesh: jax.sharding.Mesh,
                    mesh_cfg: ml_collections.ConfigDict) -> Any:
  """NamedSharding per parameter, from the logical axis names the model boxed them with (shapes may be abstract).

  Returns a tree shaped like the unboxed params.
  """
  return logical_shardings(boxed_params, mesh, mesh_cfg)
