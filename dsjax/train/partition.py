"""Which params train: a mask from `config.train.trainable`, and the split of a params tree into the trainable part
(what `jax.grad` and the optimizer see) and the frozen part (any leaf type: int8 `QTensor`s of a LoRA base, float
weights of a frozen trunk).

  mask = trainable_mask(params, spec)      # spec: 'all' | 'adapters' | 'layers/mlp,lm_head' (subtree paths)
  trainable, frozen = split(params, mask)  # each holds None where the other has the leaf
  params = join(trainable, frozen)
"""
from __future__ import annotations

from typing import Any

from flax import linen as nn
import jax
import ml_collections

from dsjax import config as config_lib
from dsjax import lora as lora_lib

ALL, ADAPTERS = 'all', 'adapters'


def is_leaf(x: Any) -> bool:
  """One parameter: an array, a flax box (nn.Partitioned) or a quantized kernel (also a box); None (an absent part)."""
  return x is None or isinstance(x, nn.meta.AxisMetadata)


def _path(path: tuple[Any, ...]) -> str:
  return '/'.join(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))


def spec_for_run(cfg: ml_collections.ConfigDict) -> str:
  """`train.trainable`, with 'auto' resolved: 'adapters' with LoRA, else 'all'."""
  spec = str(cfg.train.get('trainable', 'auto')).strip()
  if spec == 'auto':
    return ADAPTERS if cfg.lora.enabled else ALL
  return spec


def trainable_mask(params: Any, spec: str) -> Any:
  """A tree of bools shaped like `params` (boxes and QTensors are single leaves): 'all'; 'adapters' (LoRA's lora_a
  and lora_b); or comma-separated subtree paths such as 'layers/mlp,lm_head' (a param trains when its path starts
  with one of them). A path that matches no param raises ConfigError naming config.train.trainable."""
  if spec == ALL:
    return jax.tree_util.tree_map(lambda _: True, params, is_leaf=is_leaf)
  if spec == ADAPTERS:
    return jax.tree_util.tree_map_with_path(lambda p, _: lora_lib.is_adapter(_path(p)), params, is_leaf=is_leaf)
  prefixes = [s.strip().strip('/') for s in spec.split(',') if s.strip()]
  paths = [_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_leaf)[0]]
  unmatched = [s for s in prefixes if not any(p == s or p.startswith(s + '/') for p in paths)]
  if not prefixes or unmatched:
    raise config_lib.ConfigError(
        f'config.train.trainable={spec!r}: ' + (f'{unmatched} match no parameter' if unmatched else 'empty') +
        f"; expected 'auto', 'all', 'adapters' or subtree paths such as "
        f"{sorted({p.rsplit('/', 1)[0] for p in paths})[:6]}")
  return jax.tree_util.tree_map_with_path(
      lambda p, _: any(_path(p) == s or _path(p).startswith(s + '/') for s in prefixes), params, is_leaf=is_leaf)


def split(params: Any, mask: Any) -> tuple[Any, Any]:
  """(trainable, frozen): two trees shaped like `params`, holding each leaf in one of them and None in the other."""
  trainable = jax.tree_util.tree_map(lambda p, m: p if m else None, params, mask, is_leaf=is_leaf)
  frozen = jax.tree_util.tree_map(lambda p, m: None if m else p, params, mask, is_leaf=is_leaf)
  return trainable, frozen


def join(trainable: Any, frozen: Any) -> Any:
  """The params tree that `split` came from."""
  return jax.tree_util.tree_map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=is_leaf)
