"""Model checkpoints: a directory that `train.py`, the sampler and the converters all read.

  <dir>/config.json   the full dsjax config (all sections), as JSON
  <dir>/config.py     `get_config()` returning it, so `python train.py --config=<dir>/config.py` resumes from it
  <dir>/params/       the parameters, an orbax PyTree checkpoint (written atomically by orbax: a half-written save
                      never replaces a good one), restorable onto any mesh
  <dir>/tokenizer.json, tokenizer_config.json, ...   the tokenizer files, when the model has a HF tokenizer

Loading points `data.tokenizer` and `train.init_from` at the directory, so it can be moved or copied freely.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Iterable

from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from configs import base

from dsjax import config as config_lib
from dsjax import sharding as sharding_lib
from dsjax.model import Transformer

CONFIG_JSON = 'config.json'
PARAMS_DIR = 'params'
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json')

_CONFIG_PY = '''"""The dsjax config of the checkpoint in this directory: python train.py --config=<this file>."""
import os

from dsjax import checkpoint


def get_config():
  return checkpoint.load_config(os.path.dirname(os.path.abspath(__file__)))
'''


def save_model(directory: str, cfg: ml_collections.ConfigDict, params: Any,
               tokenizer_files: Iterable[str] = ()) -> None:
  """Writes params (a pytree of arrays, sharded or not), the config and tokenizer files to `directory`."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, PARAMS_DIR), nn.meta.unbox(params), force=True)
  if jax.process_index() == 0:  # every process writes its shards of the params; one writes the small files
    for path in tokenizer_files:
      shutil.copyfile(path, os.path.join(directory, os.path.basename(path)))
    _write_atomically(os.path.join(directory, CONFIG_JSON), cfg.to_json(indent=2))
    _write_atomically(os.path.join(directory, 'config.py'), _CONFIG_PY)
  checkpointer.wait_until_finished()


def load_config(directory: str) -> ml_collections.ConfigDict:
  """The checkpoint's config with `data.tokenizer` and `train.init_from` pointing at `directory` and no
  `train.workdir` (train.py then picks runs/<name>-continued); validated."""
  directory = os.path.abspath(directory)
  path = os.path.join(directory, CONFIG_JSON)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'not a dsjax checkpoint (no {CONFIG_JSON}): {directory}')
  with open(path) as f:
    saved = _tuples(json.load(f))
  # Saved values over today's defaults: a checkpoint written before a config field existed still loads.
  cfg = base.get_config()
  _merge(cfg, saved)
  if os.path.isfile(os.path.join(directory, 'tokenizer.json')):
    cfg.data.tokenizer = os.path.join(directory, 'tokenizer.json')
  cfg.train.init_from = directory
  cfg.train.workdir = ''  # a new run from this checkpoint must not resume (or overwrite) the run that wrote it
  config_lib.validate(cfg)
  return cfg


def abstract_params(model_cfg: ml_collections.ConfigDict) -> Any:
  """Boxed ShapeDtypeStructs of the model's parameters (nothing allocated)."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(lambda t: Transformer(model_cfg).init(jax.random.key(0), t, t), tokens)['params']


def load_params(directory: str, model_cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None,
                mesh_cfg: ml_collections.ConfigDict | None = None) -> Any:
  """Restores the params of `directory` for a model of `model_cfg`, in `model_cfg.param_dtype`.

  With a mesh, every parameter is placed with the sharding its logical axes ask for (each device reads only its
  shard); without one, on the default device. Raises ValueError naming any parameter whose shape differs.
  """
  directory = os.path.abspath(directory)
  params_dir = os.path.join(directory, PARAMS_DIR)
  if not os.path.isdir(params_dir):
    raise FileNotFoundError(f'not a dsjax checkpoint (no {PARAMS_DIR}/): {directory}')
  boxed = abstract_params(model_cfg)
  if mesh is None:
    mesh = jax.sharding.Mesh(jax.devices()[:1], ('data',))
    shardings = jax.tree_util.tree_map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
                                       nn.meta.unbox(boxed))
  else:
    shardings = sharding_lib.param_shardings(boxed, mesh, mesh_cfg)
  dtype = config_lib.dtype(model_cfg.param_dtype)
  target = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype, sharding=s),
                                  nn.meta.unbox(boxed), shardings)
  checkpointer = ocp.StandardCheckpointer()
  _check_shapes(checkpointer.metadata(params_dir), target, directory)
  return checkpointer.restore(params_dir, target)


def _check_shapes(metadata: Any, target: Any, directory: str) -> None:
  tree = getattr(metadata, 'item_metadata', metadata)
  tree = getattr(tree, 'tree', tree)
  stored = {jax.tree_util.keystr(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(tree)
            if hasattr(m, 'shape')}
  wanted = {jax.tree_util.keystr(p): tuple(t.shape) for p, t in jax.tree_util.tree_leaves_with_path(target)}
  missing = sorted(set(wanted) - set(stored))
  unexpected = sorted(set(stored) - set(wanted))
  if missing or unexpected:
    raise ValueError(f'checkpoint {directory} does not match the model config: missing params {missing}, '
                     f'unexpected params {unexpected}')
  for name, shape in wanted.items():
    if stored[name] != shape:
      raise ValueError(f'checkpoint {directory}: param {name} has shape {stored[name]}, the model config needs '
                       f'{shape}')


def _write_atomically(path: str, text: str) -> None:
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def _merge(cfg: ml_collections.ConfigDict, saved: dict[str, Any]) -> None:
  for key, value in saved.items():
    if isinstance(value, dict) and key in cfg and isinstance(cfg[key], ml_collections.ConfigDict):
      _merge(cfg[key], value)
    else:
      with cfg.unlocked():
        cfg[key] = value


def _tuples(value: Any) -> Any:
  """JSON lists back to tuples (ConfigDict fields such as mesh.rules are tuples)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value
