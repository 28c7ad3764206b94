"""The train state pytree and its initialisation."""
from __future__ import annotations

from typing import Any

import flax
from flax import linen as nn
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a train step reads and writes: a pure pytree, so it can be jitted, sharded and checkpointed."""
  step: jax.Array      # int32 scalar: number of updates applied
  params: Any          # master parameters (param_dtype, fp32 by default)
  opt_state: Any       # optax state, same dtype as the params


def init_params(model: nn.Module, rng: jax.Array, seq_len: int) -> Any:
  """Initialises parameters with their logical-axis boxes (nn.Partitioned), shapes from a [1, seq_len] batch."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  positions = jnp.arange(seq_len, dtype=jnp.int32)[None]
  return model.init({'params': rng}, tokens, positions)['params']


def init_train_state(model: nn.Module, optimizer: optax.GradientTransformation, rng: jax.Array,
                     seq_len: int) -> TrainState:
  """A fresh state: unboxed params and the optimizer state built from them."""
  return train_state_from_params(nn.meta.unbox(init_params(model, rng, seq_len)), optimizer)


def train_state_from_params(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
  """A state at step 0 around existing params (e.g. an imported checkpoint), with a fresh optimizer state."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def param_count(params: Any) -> int:
  """Number of scalars in a (possibly abstract, possibly boxed) params tree."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(nn.meta.unbox(params)))
