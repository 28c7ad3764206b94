"""Device mesh and logical-axis sharding: where parameters and batches live.

Model code names logical axes (`embed`, `heads`, `mlp`, ...); the config's `mesh.rules` map them to the mesh axes
('data', 'fsdp', 'tensor'). This module is the one place that turns names into `NamedSharding`s.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from flax import linen as nn
import jax
import ml_collections
import numpy as np

from dsjax import config as config_lib

MESH_AXES = ('data', 'fsdp', 'tensor')


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Sizes of ('data', 'fsdp', 'tensor'); one -1 takes the devices the others leave."""
  sizes = [int(mesh_cfg[axis]) for axis in MESH_AXES]
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
  """The ('data', 'fsdp', 'tensor') mesh over `devices` (default: all), sized from the config."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def rules(mesh_cfg: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  """The logical-axis rules as flax expects them: ((logical, mesh axis or tuple or None), ...)."""
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in mesh_cfg.rules)


def param_shardings(boxed_params: Any, mesh: jax.sharding.Mesh,
                    mesh_cfg: ml_collections.ConfigDict) -> Any:
  """NamedSharding per parameter, from the logical axis names the model boxed them with (shapes may be abstract).

  Returns a tree shaped like the unboxed params.
  """
  specs = nn.get_partition_spec(boxed_params)
  return nn.logical_to_mesh_sharding(specs, mesh, rules(mesh_cfg))
