"""The train state pytree, its abstract (shape and sharding) form, and its initialisation on a mesh."""
from __future__ import annotations

from typing import Any

import flax
from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from dsjax import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  """Everything a train step reads and writes: a pure pytree, so it can be jitted, sharded and checkpointed."""
  step: jax.Array       # int32 scalar: train steps taken (including ones whose update was skipped)
  params: Any           # master parameters (param_dtype, fp32 by default)
  opt_state: Any        # optax state, same dtype as the params
  nonfinite: jax.Array  # int32 scalar: consecutive steps whose loss or gradient was not finite (update skipped)


def init_params(model: nn.Module, rng: jax.Array, seq_len: int) -> Any:
  """Initialises parameters with their logical-axis boxes (nn.Partitioned), shapes from a [1, seq_len] batch."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  positions = jnp.arange(seq_len, dtype=jnp.int32)[None]
  return model.init({'params': rng}, tokens, positions)['params']


def _state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, opt_state=optimizer.init(params), nonfinite=zero)


def state_shardings(model: nn.Module, optimizer: optax.GradientTransformation, seq_len: int,
                    mesh: jax.sharding.Mesh, mesh_cfg: ml_collections.ConfigDict) -> TrainState:
  """NamedSharding of every leaf of the train state: params and the optimizer moments follow the params' logical
  axes through `mesh.rules` (fsdp shards `embed`, tensor shards heads/mlp/vocab); counters are replicated."""
  # optax maps over the boxed params, so the moments keep the params' nn.Partitioned boxes and axis names.
  boxed = jax.eval_shape(lambda rng: _state(init_params(model, rng, seq_len), optimizer), jax.random.key(0))
  return sharding_lib.logical_shardings(boxed, mesh, mesh_cfg)


def init_train_state(model: nn.Module, optimizer: optax.GradientTransformation, rng: jax.Array, seq_len: int,
                     shardings: TrainState | None = None) -> TrainState:
  """A fresh state. With `shardings`, every leaf is created directly in its shards (no full copy on one device)."""
  build = lambda rng: _state(nn.meta.unbox(init_params(model, rng, seq_len)), optimizer)
  return jax.jit(build, out_shardings=shardings)(rng)


def train_state_from_params(params: Any, optimizer: optax.GradientTransformation,
                            shardings: TrainState | None = None) -> TrainState:
  """A state at step 0 around existing params (e.g. an imported checkpoint), with a fresh optimizer state."""
  return jax.jit(lambda p: _state(p, optimizer), out_shardings=shardings)(params)


def param_count(params: Any) -> int:
  """Number of scalars in a (possibly abstract, possibly boxed) params tree."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(nn.meta.unbox(params)))
