"""The train step on device meshes (8 fake CPU devices): the same loss and updated params as on one device, params
and optimizer state sharded as the logical-axis rules say, gradient accumulation equal to one big batch, and the
non-finite guard."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import config as config_lib
from dsjax import lora
from dsjax import quant
from dsjax import sharding as sharding_lib
from dsjax.model import Transformer
from dsjax.train import optimizer as optimizer_lib
from dsjax.train import partition
from dsjax.train import start as start_lib
from dsjax.train import state as state_lib
from dsjax.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ = 32


def tiny_cfg(data=1, fsdp=1, tensor=1, accum=1, kind='full'):
  """8 heads and 8 kv heads, mlp 64, vocab 384, hidden 64: every sharded dimension divides every mesh here."""
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny.py'))
  m = cfg.model
  m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim = 64, 2, 8, 8, 64
  m.attention.kind = kind
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = data, fsdp, tensor
  cfg.train.batch_size = 8
  cfg.train.grad_accum_steps = accum
  cfg.optim.warmup_steps = 0
  # Adam's first update is lr * g / (|g| + eps): with the default eps = 1e-8 a gradient entry near 1e-9 (a token
  # the batch barely touches) turns float32 summation-order noise into an O(lr) difference. eps = 1e-3 keeps the
  # update a smooth function of the gradient, so comparing params after a step compares the gradients.
  cfg.optim.eps = 1e-3
  return cfg


def random_batch(seed=0, batch=8):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 259, (batch, SEQ + 1))
  seg = np.ones((batch, SEQ), np.int32)
  seg[:, :5] = 2  # two documents per row, then padding at the end of half the rows
  seg[::2, -4:] = 0
  pos = np.where(seg == 2, np.arange(SEQ), np.arange(SEQ) - 5)
  pos = np.where(seg == 0, 0, pos)
  return {'inputs': tokens[:, :-1].astype(np.int32), 'targets': tokens[:, 1:].astype(np.int32),
          'segment_ids': seg, 'positions': pos.astype(np.int32)}


def compile_step(cfg, batch, devices=None, state=None):
  """The train step on cfg.mesh (over `devices`, default all), compiled under the mesh's placement as the training
  loop runs it -> (compiled step, initial state, global batch, shardings). `state`: an initial state (e.g. one
  device's) placed on the mesh instead of a fresh init (the same values: init is seeded)."""
  mesh = sharding_lib.make_mesh(cfg.mesh, devices)
  model = Transformer(cfg.model)
  optimizer = optimizer_lib.make_optimizer(cfg.optim, 10)
  shardings = state_lib.state_shardings(model, optimizer, SEQ, mesh, cfg.mesh)
  if state is None:
    state = state_lib.init_train_state(model, optimizer, jax.random.key(0), SEQ, shardings)
  else:
    state = jax.device_put(state, shardings)
  batch_sharding = sharding_lib.batch_sharding(mesh, cfg.mesh)
  step = jax.jit(step_lib.make_train_step(model, optimizer, cfg), in_shardings=(shardings, batch_sharding, None),
                 out_shardings=(shardings, None))
  batch = sharding_lib.global_batch(batch, batch_sharding)
  with sharding_lib.Placement.of(mesh, cfg.mesh).activate():
    compiled = step.lower(state, batch, jax.random.key(1)).compile()
  return compiled, state, batch, shardings


def run_step(cfg, batch, devices=None, state=None):
  """One jitted train step on cfg.mesh (over `devices`, default all) -> (state, metrics, shardings)."""
  compiled, state, batch, shardings = compile_step(cfg, batch, devices, state)
  state, metrics = compiled(state, batch, jax.random.key(1))
  return state, metrics, shardings


def assert_params_close(got_params, want_params):
  """float32 throughout; sharded matmuls and all-reduced gradients sum in another order than one device does, so
  values agree to a few float32 ulps of accumulated error, not bitwise."""
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(got_params),
                               jax.tree_util.tree_leaves(want_params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope='module')
def single_device():
  return run_step(tiny_cfg(), random_batch(), jax.devices()[:1])


@pytest.mark.parametrize('mesh', [(8, 1, 1), (2, 2, 2), (1, 4, 2), (1, 1, 8)])
def test_step_on_mesh_matches_one_device(mesh, single_device):
  want_state, want_metrics, _ = single_device
  state, metrics, shardings = run_step(tiny_cfg(*mesh), random_batch())
  np.testing.assert_allclose(float(metrics['loss']), float(want_metrics['loss']), rtol=1e-6)
  np.testing.assert_allclose(float(metrics['grad_norm']), float(want_metrics['grad_norm']), rtol=1e-5)
  assert_params_close(state.params, want_state.params)
  # The updated state comes back with the shardings the rules ask for.
  for got, want in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(shardings)):
    assert got.sharding.is_equivalent_to(want, got.ndim)


def test_param_shardings_follow_the_rules():
  """embed -> fsdp, heads/kv_heads/mlp/vocab -> tensor, layers and head_dim replicated; Adam moments alike."""
  P = jax.sharding.PartitionSpec
  _, _, shardings = run_step(tiny_cfg(2, 2, 2), random_batch())
  params = shardings.params
  want = {
      ('embedder', 'embedding'): P('tensor', 'fsdp'),
      ('layers', 'attention', 'q_proj', 'kernel'): P(None, 'fsdp', 'tensor', None),
      ('layers', 'attention', 'k_proj', 'kernel'): P(None, 'fsdp', 'tensor', None),
      ('layers', 'attention', 'o_proj', 'kernel'): P(None, 'tensor', None, 'fsdp'),
  }
  for path, spec in want.items():
    node = params
    for key in path:
      node = node[key]
    assert node.spec == spec, (path, node.spec)
  mlp_specs = {s.spec for s in jax.tree_util.tree_leaves(params['layers']['mlp'])}
  assert mlp_specs <= {P(None, 'fsdp', 'tensor'), P(None, 'tensor', 'fsdp')}, mlp_specs
  adam = shardings.opt_state[1][0]
  assert adam.mu['layers']['attention']['q_proj']['kernel'].spec == P(None, 'fsdp', 'tensor', None)
  assert adam.count.spec == P() and shardings.step.spec == P()


@pytest.mark.parametrize('accum', [2, 4])
def test_gradient_accumulation_equals_one_batch(accum, single_device):
  want_state, want_metrics, _ = single_device
  state, metrics, _ = run_step(tiny_cfg(2, 2, 2, accum=accum), random_batch())
  np.testing.assert_allclose(float(metrics['loss']), float(want_metrics['loss']), rtol=1e-6)
  assert float(metrics['tokens']) == float(want_metrics['tokens'])
  for got, want in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(want_state.params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # heavy end-to-end run: kept out of the 10-minute default suite (pytest -m slow runs it)
def test_routed_accumulation_averages_the_router_loss():
  """The load-balance loss is a per-batch mean: accumulated, it is the mean over microbatches."""
  batch = random_batch(3)
  _, m1, _ = run_step(tiny_cfg(8, 1, 1, accum=1, kind='routed'), batch)
  _, m2, _ = run_step(tiny_cfg(8, 1, 1, accum=2, kind='routed'), batch)
  np.testing.assert_allclose(float(m2['loss']), float(m1['loss']), rtol=1e-6)
  assert 1.0 - 1e-4 <= float(m2['router_loss']) < 2.0


def test_non_finite_loss_skips_the_update():
  cfg = tiny_cfg(8, 1, 1)
  model = Transformer(cfg.model)
  optimizer = optimizer_lib.make_optimizer(cfg.optim, 10)
  state = state_lib.init_train_state(model, optimizer, jax.random.key(0), SEQ)
  bad = state.replace(params=jax.tree_util.tree_map(lambda x: x, state.params))
  bad.params['final_norm']['scale'] = bad.params['final_norm']['scale'].at[0].set(jnp.inf)
  step = jax.jit(step_lib.make_train_step(model, optimizer, cfg))
  new, metrics = step(bad, random_batch(), jax.random.key(1))
  assert not np.isfinite(float(metrics['loss'])) and float(metrics['skipped']) == 1.0
  assert int(new.nonfinite) == 1 and int(new.step) == 1
  for a, b in zip(jax.tree_util.tree_leaves((new.params, new.opt_state)),
                  jax.tree_util.tree_leaves((bad.params, bad.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  again, _ = step(new, random_batch(), jax.random.key(1))
  assert int(again.nonfinite) == 2
  fine, metrics = step(state, random_batch(), jax.random.key(1))
  assert int(fine.nonfinite) == 0 and float(metrics['skipped']) == 0.0


def test_lora_int8_base_is_sharded_like_its_float_kernel_and_steps_as_on_one_device():
  """A LoRA run's abstract state on an fsdp x tensor mesh: the int8 QTensor values of each projection are split as
  the float kernel's leading input / output axes are (embed over fsdp, heads / mlp over tensor); one step on the
  mesh gives the adapters of the one-device step, and the frozen int8 base does not move."""
  def run(cfg, devices):
    mesh = sharding_lib.make_mesh(cfg.mesh, devices)
    model = start_lib.model_for_run(cfg)
    abstract = start_lib.abstract_params(cfg, model)
    mask = partition.trainable_mask(abstract, partition.spec_for_run(cfg))
    optimizer = optimizer_lib.make_optimizer(cfg.optim, 10)
    shardings = state_lib.state_shardings(model, optimizer, SEQ, mesh, cfg.mesh, params=abstract, mask=mask)
    params = start_lib.initial_params(cfg, model, jax.random.key(0), mesh, shardings.params)
    state = state_lib.train_state_from_params(params, optimizer, shardings, mask)
    batch_sharding = sharding_lib.batch_sharding(mesh, cfg.mesh)
    step = jax.jit(step_lib.make_train_step(model, optimizer, cfg, mask=mask),
                   in_shardings=(shardings, batch_sharding, None), out_shardings=(shardings, None))
    with sharding_lib.Placement.of(mesh, cfg.mesh).activate():
      new_state, _ = step(state, sharding_lib.global_batch(random_batch(), batch_sharding), jax.random.key(1))
    return state, new_state, shardings

  def lora_cfg(**mesh):
    cfg = tiny_cfg(**mesh)
    cfg.lora.enabled, cfg.lora.rank, cfg.lora.base_int8, cfg.lora.dropout = True, 4, True, 0.0
    return cfg

  start, sharded, shardings = run(lora_cfg(fsdp=4, tensor=2), None)
  q = shardings.params['layers']['attention']['q_proj']['kernel']
  assert quant.is_qtensor(q)
  assert q.values.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor')  # [layers, D, N*H]
  assert q.scales.spec == jax.sharding.PartitionSpec(None, None, 'tensor')
  down = shardings.params['layers']['mlp']['down_proj']['kernel']
  assert down.values.spec == jax.sharding.PartitionSpec(None, 'tensor', 'fsdp')  # [layers, F, D]
  _, single, _ = run(lora_cfg(), jax.devices()[:1])
  got, want = lora.adapters_of(sharded.params), lora.adapters_of(single.params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))
  before = start.params['layers']['mlp']['up_proj']['kernel']
  after = sharded.params['layers']['mlp']['up_proj']['kernel']
  assert after.values.dtype == jnp.int8 and np.array_equal(np.asarray(before.values), np.asarray(after.values))
