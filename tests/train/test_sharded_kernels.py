"""The attention kernels under the device mesh (8 fake CPU devices). XLA cannot partition a kernel call (Mosaic
refuses; a Triton call gets its operands all-gathered), so every kernel call runs per shard in shard_map: a train
step with impl='pallas' (interpret mode) equals the single-device reference step, gathers no attention operand,
gathers no more than impl='reference' does, and lowers for TPU."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import config as config_lib
from dsjax import sharding as sharding_lib
from dsjax.model import Transformer
from dsjax.train import optimizer as optimizer_lib
from dsjax.train import state as state_lib
from dsjax.train import step as step_lib
from tests.model import helpers
from tests.train.test_sharded_step import SEQ, assert_params_close, compile_step, random_batch, tiny_cfg

KINDS = {  # model.attention overrides: every kernel (flash, routed) and mask (causal, window + global tokens)
    'full': {},
    'sparse': dict(kind='sparse', window=8, num_global=2),
    'routed_sparse': dict(kind='routed', sparse_mask=True, window=8, num_global=2, top_k=4),
}
MESHES = [(8, 1, 1), (2, 2, 2), (1, 4, 2)]
PADDED_SEQ = 64  # the GPU-style kernels pad T=32 to their 64-row blocks


def kernel_cfg(kind, mesh=(1, 1, 1), impl='pallas', platform=''):
  cfg = tiny_cfg(*mesh)
  cfg.model.attention.update(dict(KINDS[kind], impl=impl, platform=platform))
  return cfg


@functools.cache
def one_device_reference(kind):
  """(initial state, state after the reference step, its metrics) on one device."""
  cfg = kernel_cfg(kind, impl='reference')
  compiled, state, batch, _ = compile_step(cfg, random_batch(), jax.devices()[:1])
  initial = jax.tree_util.tree_map(np.asarray, state)  # host copies: the step donates nothing, but keep them apart
  state, metrics = compiled(state, batch, jax.random.key(1))
  return initial, state, metrics


def all_gathers(hlo: str) -> list[tuple[tuple[int, ...], str]]:
  """(result dims, op_name) of every all-gather in an optimized HLO module."""
  found = []
  for line in hlo.split('\n'):
    if ' all-gather(' not in line:
      continue
    shape = re.search(r'= \(?[a-z0-9]+\[([0-9,]*)\]', line)
    op_name = re.search(r'op_name="([^"]+)"', line)
    found.append((tuple(int(d) for d in shape.group(1).split(',') if d), op_name.group(1) if op_name else ''))
  return found


def gathered_attention_operands(hlo: str, cfg) -> list[tuple[tuple[int, ...], str]]:
  """All-gathers whose result is an attention operand at more than one shard's size.

  q/k/v/out and their gradients are [B, T, N or K, H] (T possibly padded to the kernel blocks): any all-gather to
  such a shape other than the per-shard one (batch / (data * fsdp), heads / tensor) is flagged. Gates are
  [B, T, N]: a forward all-gather to that shape other than the per-shard one is flagged. (The router computes
  whole rows of head scores on every shard, so the backward gathers the gate gradients into them: that is the
  router's gradient, not a kernel operand.)
  """
  m = cfg.model
  batch_shards = cfg.mesh.data * cfg.mesh.fsdp
  b, heads, kv_heads = cfg.train.batch_size // batch_shards, m.num_heads // cfg.mesh.tensor, \
      m.num_kv_heads // cfg.mesh.tensor
  head_dim = config_lib.head_dim(m)
  bad = []
  for dims, op_name in all_gathers(hlo):
    if len(dims) == 4 and dims[1] in (SEQ, PADDED_SEQ) and dims[3] == head_dim:
      if dims[0] != b or dims[2] not in (heads, kv_heads):
        bad.append((dims, op_name))
    elif len(dims) == 3 and dims[1] == SEQ and dims[2] == m.num_heads and 'transpose(' not in op_name:
      if dims[0] != b or dims[2] != heads:
        bad.append((dims, op_name))
  return bad


def lowered_step(cfg, placed=True, platform=None):
  """The train step on cfg.mesh, traced from abstract state and batch (nothing allocated or run) and lowered, under
  the mesh's placement unless `placed` is False; for `platform` (e.g. 'tpu') instead of this machine's."""
  mesh = sharding_lib.make_mesh(cfg.mesh)
  model = Transformer(cfg.model)
  optimizer = optimizer_lib.make_optimizer(cfg.optim, 10)
  shardings = state_lib.state_shardings(model, optimizer, SEQ, mesh, cfg.mesh)
  state = jax.eval_shape(lambda: state_lib.init_train_state(model, optimizer, jax.random.key(0), SEQ))
  batch_sharding = sharding_lib.batch_sharding(mesh, cfg.mesh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in random_batch().items()}
  step = jax.jit(step_lib.make_train_step(model, optimizer, cfg), in_shardings=(shardings, batch_sharding, None),
                 out_shardings=(shardings, None))
  with sharding_lib.activate(sharding_lib.Placement.of(mesh, cfg.mesh) if placed else None):
    traced = step.trace(state, batch, jax.random.key(1))
    return traced.lower(lowering_platforms=(platform,)) if platform else traced.lower()


# The default suite runs every kind on the (2, 2, 2) mesh (all three axes) and the full kernel on every mesh; the
# sparse and routed kernels on the other meshes (about 55 s on 2 cores) are `slow`.
CASES = [pytest.param(mesh, kind, marks=[pytest.mark.slow] if kind != 'full' and mesh != (2, 2, 2) else [],
                      id=f'{"x".join(map(str, mesh))}-{kind}') for mesh in MESHES for kind in KINDS]


@pytest.mark.parametrize('mesh, kind', CASES)
def test_pallas_step_on_mesh_matches_one_device_reference(mesh, kind):
  cfg = kernel_cfg(kind, mesh)
  initial, want_state, want_metrics = one_device_reference(kind)
  compiled, state, batch, shardings = compile_step(cfg, random_batch(), state=initial)
  state, metrics = compiled(state, batch, jax.random.key(1))
  np.testing.assert_allclose(float(metrics['loss']), float(want_metrics['loss']), rtol=1e-6)
  assert_params_close(state.params, want_state.params)
  for got, want in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(shardings)):
    assert got.sharding.is_equivalent_to(want, got.ndim)

  hlo = compiled.as_text()
  assert 'sparse_attention_fwd' in hlo and 'sparse_attention_dkv' in hlo  # the kernels ran (interpreted)
  assert gathered_attention_operands(hlo, cfg) == []
  reference_hlo = lowered_step(kernel_cfg(kind, mesh, impl='reference')).compile().as_text()
  assert len(all_gathers(hlo)) <= len(all_gathers(reference_hlo))


def test_the_gather_check_catches_kernels_outside_shard_map():
  """Control: traced without the mesh in context, the kernel calls are not wrapped, and XLA all-gathers their
  operands to every head and row; the check above must see that."""
  cfg = kernel_cfg('full', (2, 2, 2))
  assert gathered_attention_operands(lowered_step(cfg, placed=False).compile().as_text(), cfg)


@pytest.mark.parametrize('kind', ['full', 'routed_sparse'])
def test_train_step_lowers_for_tpu_on_eight_devices(kind):
  """impl='auto' built for TPU is the Mosaic kernels (128-blocks): forward, dq and dk/dv in the layer scan."""
  text = lowered_step(kernel_cfg(kind, (2, 2, 2), impl='auto', platform='tpu'), platform='tpu').as_text()
  assert text.count('tpu_custom_call') == 3


def test_mosaic_kernels_outside_shard_map_do_not_lower():
  """Control: without the placement, the kernels meet sharded operands and Mosaic refuses to be partitioned."""
  with pytest.raises(NotImplementedError, match='shard_map'):
    lowered_step(kernel_cfg('full', (2, 2, 2), impl='pallas', platform='tpu'), placed=False, platform='tpu')


def test_heads_that_do_not_divide_the_tensor_axis_name_the_field():
  """The training loop checks before it builds anything; a kernel call traced on such a mesh says the same."""
  cfg = kernel_cfg('full', (1, 1, 8))
  cfg.model.num_kv_heads = 4
  mesh = sharding_lib.make_mesh(cfg.mesh)
  with pytest.raises(config_lib.ConfigError, match=r'model\.num_kv_heads=4.*mesh\.tensor=8'):
    sharding_lib.check_heads_divide(cfg.model, mesh, cfg.mesh)
  model = Transformer(cfg.model)
  tokens = jnp.zeros((8, SEQ), jnp.int32)
  params = helpers.random_like(helpers.init_shapes(model, tokens, tokens))
  with sharding_lib.Placement.of(mesh, cfg.mesh).activate():
    with pytest.raises(config_lib.ConfigError, match=r'model\.num_kv_heads=4'):
      jax.jit(lambda p: model.apply({'params': p}, tokens, tokens))(params)


def test_a_batch_the_mesh_does_not_divide_runs_replicated():
  """One row on a data-parallel mesh (decoding): the kernels run on every shard with the whole batch."""
  cfg = kernel_cfg('sparse', (8, 1, 1))
  model = Transformer(cfg.model)
  params = helpers.random_like(helpers.init_shapes(model, jnp.zeros((1, SEQ), jnp.int32),
                                                   jnp.zeros((1, SEQ), jnp.int32)), seed=2)
  tokens = jnp.arange(SEQ, dtype=jnp.int32)[None] % 50
  positions = jnp.arange(SEQ, dtype=jnp.int32)[None]
  mesh = sharding_lib.make_mesh(cfg.mesh)
  with sharding_lib.Placement.of(mesh, cfg.mesh).activate():
    got = jax.jit(lambda p: model.apply({'params': p}, tokens, positions)[0])(params)
  cfg.model.attention.impl = 'reference'
  want = jax.jit(lambda p: Transformer(cfg.model).apply({'params': p}, tokens, positions)[0])(params)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
