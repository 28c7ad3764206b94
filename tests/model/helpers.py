"""Test helpers: tiny configs built from configs/base.py, random parameters, packed-row inputs."""
import importlib.util
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

_BASE = pathlib.Path(__file__).resolve().parents[2] / 'configs' / 'base.py'


def base_config() -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location('dsjax_test_base_config', _BASE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# name -> overrides of model.attention / model.positions on top of tiny_config().
KINDS = {
    'full': {},
    'sparse': dict(kind='sparse'),
    'routed': dict(kind='routed'),
    'routed_sparse': dict(kind='routed', sparse_mask=True),
    'xl': dict(positions=dict(kind='xl')),
    'xl_mem_sparse': dict(kind='sparse', positions=dict(kind='xl', mem_len=8)),
}


def tiny_config(kind: str = 'full', **model_overrides) -> ml_collections.ConfigDict:
  """The `model` section shrunk to test size, with the attention/positions kind named in KINDS."""
  m = base_config().model
  m.update(dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
                max_positions=128, dtype='float32', param_dtype='float32'))
  m.attention.update(dict(window=3, num_global=2, top_k=2, num_shared_heads=1))
  overrides = dict(KINDS[kind])
  m.positions.update(overrides.pop('positions', {}))
  m.attention.update(overrides)
  for key, value in model_overrides.items():
    if isinstance(value, dict):
      m[key].update(value)
    else:
      m[key] = value
  return m


def random_like(shapes, seed: int = 0, std: float = 0.2):
  """Fills a (possibly boxed) tree of ShapeDtypeStructs from numpy: norm scales 1 + N(0, std), rest N(0, std).

  Avoids model.init, whose random-number code takes seconds to compile on CPU; non-trivial values (biases,
  norm scales) also make the tests stronger than the init values would.
  """
  rng = np.random.default_rng(seed)
  shapes = nn.meta.unbox(shapes)

  def fill(path, s):
    value = rng.normal(0.0, std, s.shape)
    if jax.tree_util.keystr(path).endswith("['scale']"):
      value += 1.0
    return jnp.asarray(value, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def init_shapes(module: nn.Module, *args, **kwargs):
  """Boxed parameter ShapeDtypeStructs of module.init(key, *args), computed without allocating."""
  return jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a, **kwargs), *args)['params']


def packed_row(lengths: list[int], total: int, pad_positions: str = 'arange'):
  """Positions and segment ids of documents of `lengths` packed into one row of `total`, padding after.

  Documents get segment ids 1, 2, ...; positions restart at 0 in each; padding has segment 0.
  """
  pos, seg = [], []
  for i, n in enumerate(lengths):
    pos += list(range(n))
    seg += [i + 1] * n
  pad = total - len(pos)
  assert pad >= 0
  pos += list(range(pad)) if pad_positions == 'arange' else [0] * pad
  seg += [0] * pad
  return np.array(pos, np.int32), np.array(seg, np.int32)


def random_packed(rng: np.random.Generator, batch: int, total: int):
  """[B, T] positions and segment ids of random document lengths, usually with padding at the end."""
  rows = []
  for _ in range(batch):
    lengths, left = [], total - int(rng.integers(0, 3))
    while left > 0:
      n = int(rng.integers(1, left + 1))
      lengths.append(n)
      left -= n
    rows.append(packed_row(lengths, total))
  return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


# Tiny graphs: XLA's CPU optimisation passes and fusion emitters cost far more compile time (a grad of the
# tiny model: ~6 s -> ~0.7 s) than they save at run time (milliseconds).
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True,
                'xla_cpu_use_fusion_emitters': False}


def jit(fn, **kwargs):
  """jax.jit with fast-compile options, for tests."""
  return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)
