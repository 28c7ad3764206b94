"""The train state pytree, its abstract (shape and sharding) form, and its initialisation on a mesh."""
from __future__ import annotations

from typing import Any

import flax
from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from dsjax import quant
from dsjax import sharding as sharding_lib
from dsjax.train import partition


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


def _mask(params: Any, mask: Any) -> Any:
  return partition.trainable_mask(params, partition.ALL) if mask is None else mask


def _state(params: Any, optimizer: optax.GradientTransformation, mask: Any = None) -> TrainState:
  """Step 0 around `params`: optimizer state for the trainable part (`mask`, default all) only."""
  zero = jnp.zeros((), jnp.int32)
  trainable = partition.split(params, _mask(params, mask))[0]
  return TrainState(step=zero, params=params, opt_state=optimizer.init(trainable), nonfinite=zero)


def state_shardings(model: nn.Module, optimizer: optax.GradientTransformation, seq_len: int,
                    mesh: jax.sharding.Mesh, mesh_cfg: ml_collections.ConfigDict, *, params: Any = None,
                    mask: Any = None) -> TrainState:
  """NamedSharding of every leaf of the train state: params and the optimizer moments follow the params' logical
  axes through `mesh.rules` (fsdp shards `embed`, tensor shards heads/mlp/vocab); counters are replicated.
  `params`: boxed abstract params when they are not the model's init (a LoRA run's int8 base); `mask`: trainable."""
  # optax maps over the boxed params, so the moments keep the params' nn.Partitioned boxes and axis names.
  if params is None:
    params = jax.eval_shape(lambda rng: init_params(model, rng, seq_len), jax.random.key(0))
  boxed = jax.eval_shape(lambda p: _state(p, optimizer, mask), params)
  return sharding_lib.logical_shardings(boxed, mesh, mesh_cfg)


def abstract_state(params: Any, optimizer: optax.GradientTransformation, mask: Any = None) -> TrainState:
  """The unboxed abstract state around (boxed or not) abstract params: what a checkpoint restores into."""
  return jax.eval_shape(lambda p: _state(quant.unbox(p), optimizer, mask), params)


def init_train_state(model: nn.Module, optimizer: optax.GradientTransformation, rng: jax.Array, seq_len: int,
                     shardings: TrainState | None = None) -> TrainState:
  """A fresh state. With `shardings`, every leaf is created directly in its shards (no full copy on one device)."""
  build = lambda rng: _state(nn.meta.unbox(init_params(model, rng, seq_len)), optimizer)
  return jax.jit(build, out_shardings=shardings)(rng)


def train_state_from_params(params: Any, optimizer: optax.GradientTransformation,
                            shardings: TrainState | None = None, mask: Any = None) -> TrainState:
  """A state at step 0 around existing params (e.g. an imported checkpoint), with a fresh optimizer state for the
  params `mask` marks trainable (default all)."""
  return jax.jit(lambda p: _state(p, optimizer, mask), out_shardings=shardings)(params)


def param_count(params: Any) -> int:
  """Number of weights in a (possibly abstract, possibly boxed) params tree; a quantized kernel counts the weights
  it stands for (not its bytes or scales)."""
  leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  return sum(int(x.size) if quant.is_qtensor(x) else int(nn.meta.unbox(x).size) for x in leaves)
