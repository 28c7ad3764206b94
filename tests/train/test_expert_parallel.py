"""Expert parallelism (8 fake CPU devices): routed experts split over the `expert` mesh axis, tokens exchanged by
all-to-all inside shard_map (dsjax/model/moe.py `expert_parallel`); a train step of a tiny latent-attention +
DeepSeekMoE + MTP model on (data, expert) and (tensor, expert) meshes gives one device's loss and updated params."""
import os

import jax
import numpy as np
import pytest

from dsjax import config as config_lib
from tests.train.test_sharded_step import assert_params_close, random_batch, run_step

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def moe_cfg(data=1, fsdp=1, expert=1, tensor=1):
  """configs/tiny_moe.py shrunk (hidden 64, 2 layers: a dense one then MoE with 8 experts, top-2 of 4 groups)."""
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny_moe.py'))
  m = cfg.model
  m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim = 64, 2, 8, 8, 64
  m.mla.kv_lora_rank, m.mla.q_lora_rank = 16, 24
  m.mla.qk_nope_head_dim, m.mla.qk_rope_head_dim, m.mla.v_head_dim = 8, 4, 8
  m.moe.expert_dim = 32
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.expert, cfg.mesh.tensor = data, fsdp, expert, tensor
  cfg.train.batch_size = 8
  cfg.optim.warmup_steps = 0
  cfg.optim.eps = 1e-3  # see tests/train/test_sharded_step.py: compare gradients through Adam's first update
  return cfg


@pytest.fixture(scope='module')
def single_device():
  return run_step(moe_cfg(), random_batch(), jax.devices()[:1])


@pytest.mark.parametrize('mesh', [dict(data=2, expert=4), dict(tensor=2, expert=4), dict(fsdp=2, expert=2, tensor=2)])
def test_expert_parallel_step_matches_one_device(mesh, single_device):
  want_state, want_metrics, _ = single_device
  state, metrics, shardings = run_step(moe_cfg(**mesh), random_batch())
  for name in ('loss', 'mtp_loss', 'moe_balance_loss', 'expert_imbalance'):
    np.testing.assert_allclose(float(metrics[name]), float(want_metrics[name]), rtol=1e-6, err_msg=name)
  assert_params_close(state.params, want_state.params)
  experts = shardings.params['layers']['mlp']['experts']['gate_proj']
  assert experts.spec[1] == 'expert'  # [layers, experts, embed, mlp]: the experts live on the expert axis


def test_expert_parallel_program_exchanges_tokens_all_to_all():
  """The compiled step moves tokens with all-to-all (not by gathering every expert's weights on every device)."""
  from tests.train.test_sharded_step import compile_step
  compiled = compile_step(moe_cfg(data=2, expert=4), random_batch())[0]
  hlo = compiled.as_text()
  assert 'all-to-all' in hlo


@pytest.mark.slow  # ~40 s on 2 busy cores
def test_expert_parallel_step_lowers_for_tpu_with_the_kernels():
  """Cross-lowered for TPU on this CPU machine (nothing runs): the (data 2, expert 4) train step with the Pallas
  attention kernels (Mosaic, inside shard_map) and the all-to-all expert exchange."""
  from tests.train.test_sharded_kernels import lowered_step
  cfg = moe_cfg(data=2, expert=4)
  cfg.model.attention.impl = 'pallas'
  cfg.model.attention.platform = 'tpu'
  text = lowered_step(cfg, platform='tpu').as_text()
  assert 'all_to_all' in text and 'tpu_custom_call' in text
