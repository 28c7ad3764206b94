"""Trainable/frozen split (dsjax/train/partition.py) and the step built on it: only the named params change, the
frozen ones keep their bits and get no optimizer state; masks from config name their field when wrong."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import config as config_lib
from dsjax import quant
from dsjax.model import Transformer
from dsjax.train import optimizer as optimizer_lib
from dsjax.train import partition
from dsjax.train import state as state_lib
from dsjax.train import step as step_lib
from tests.model import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config():
  cfg = helpers.base_config()
  cfg.model = helpers.tiny_config()  # vocab 64, hidden 32, 2 layers
  cfg.optim.learning_rate, cfg.optim.warmup_steps = 1e-2, 0
  cfg.optim.clip_norm = 0.0  # a global-norm clip would see different norms with and without the mask
  return cfg


def _params(cfg, seed=0):
  tokens = jnp.zeros((1, 1), jnp.int32)
  return helpers.random_like(helpers.init_shapes(Transformer(cfg.model), tokens, tokens), seed=seed)


def _batch(rows=4, length=8):
  seq = (np.arange(rows * (length + 1)).reshape(rows, length + 1) * 7 % 64).astype(np.int32)
  return {'inputs': jnp.asarray(seq[:, :-1]), 'targets': jnp.asarray(seq[:, 1:]),
          'positions': jnp.asarray(np.broadcast_to(np.arange(length), (rows, length)).astype(np.int32)),
          'segment_ids': jnp.ones((rows, length), jnp.int32)}


def _paths(tree):
  return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)}


def test_split_and_join_round_trip_with_any_leaf_type():
  cfg = _config()
  params = _params(cfg)
  params['layers']['mlp']['up_proj']['kernel'] = quant.quantize_kernel(
      params['layers']['mlp']['up_proj']['kernel'], 1, 1, bits=8, group_size=0, dtype='float32')
  mask = partition.trainable_mask(params, 'layers/attention, lm_head')
  trainable, frozen = partition.split(params, mask)
  assert all(k.startswith("['layers']['attention']") or k.startswith("['lm_head']") for k in _paths(trainable))
  assert quant.is_qtensor(frozen['layers']['mlp']['up_proj']['kernel'])  # frozen leaves may be int8 QTensors
  joined = partition.join(trainable, frozen)
  assert jax.tree_util.tree_structure(joined) == jax.tree_util.tree_structure(params)
  for a, b in zip(jax.tree_util.tree_leaves(joined), jax.tree_util.tree_leaves(params)):
    assert a is b


@pytest.mark.parametrize('spec, fragment', [('layers/attn', "['layers/attn'] match no parameter"),
                                            (' , ', 'empty')])
def test_a_mask_that_matches_nothing_names_the_config_field(spec, fragment):
  with pytest.raises(config_lib.ConfigError, match=r'config\.train\.trainable=.*' + fragment.replace('[', r'\[')):
    partition.trainable_mask(_params(_config()), spec)


def test_auto_means_adapters_with_lora_and_all_without():
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny.py'))
  assert partition.spec_for_run(cfg) == 'all'
  cfg.lora.enabled = True
  assert partition.spec_for_run(cfg) == 'adapters'
  cfg.train.trainable = 'lm_head'
  assert partition.spec_for_run(cfg) == 'lm_head'


def test_a_step_trains_only_the_named_subtree_and_keeps_no_state_for_the_rest():
  cfg = _config()
  model = Transformer(cfg.model)
  params = _params(cfg)
  mask = partition.trainable_mask(params, 'layers/mlp')
  optimizer = optimizer_lib.make_optimizer(cfg.optim, 10)
  state = state_lib.train_state_from_params(params, optimizer, mask=mask)
  mlp_size = state_lib.param_count(params['layers']['mlp'])
  assert sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim) == 2 * mlp_size
  step = jax.jit(step_lib.make_train_step(model, optimizer, cfg, mask=mask))
  new_state, metrics = step(state, _batch(), jax.random.key(0))
  assert np.isfinite(float(metrics['loss']))
  for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(new_state.params)):
    name = jax.tree_util.keystr(path)
    if name.startswith("['layers']['mlp']"):
      assert not np.array_equal(np.asarray(old), np.asarray(new)), name
    else:
      np.testing.assert_array_equal(np.asarray(old), np.asarray(new), err_msg=name)
  # The full-model gradient restricted to the subtree is what the subtree got: the same update as masking by hand.
  full = jax.jit(step_lib.make_train_step(model, optimizer_lib.make_optimizer(cfg.optim, 10), cfg))
  full_state, _ = full(state_lib.train_state_from_params(params, optimizer_lib.make_optimizer(cfg.optim, 10)),
                       _batch(), jax.random.key(0))
  np.testing.assert_allclose(np.asarray(new_state.params['layers']['mlp']['up_proj']['kernel']),
                             np.asarray(full_state.params['layers']['mlp']['up_proj']['kernel']), rtol=0, atol=1e-6)
