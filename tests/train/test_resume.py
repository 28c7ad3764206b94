"""Checkpoints of a run: SIGTERM (preemption) then resume gives exactly the uninterrupted run; a crash in the middle
of a checkpoint write leaves the previous one restorable; a checkpoint written on one mesh restores onto another."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from dsjax import config as config_lib
from dsjax import sharding as sharding_lib
from dsjax.data import pipeline
from dsjax.data import tokenizer as tokenizer_lib
from dsjax.model import Transformer
from dsjax import checkpoint
from dsjax.train import hooks as hooks_lib
from dsjax.train import loop
from dsjax.train import optimizer as optimizer_lib
from dsjax.train import state as state_lib
from dsjax.train import train_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 14
FLAGS = ['--config=configs/tiny.py', f'--config.train.steps={STEPS}', '--config.data.seq_len=128',
         '--config.train.log_every=1', '--config.train.eval_every=5', '--config.train.checkpoint_every=0',
         '--config.train.num_samples=0', '--config.train.progress_bar=False', '--config.data.eval_batches=2',
         '--config.model.dropout_rate=0.1']  # dropout: the per-step RNG must resume too


def train_py(workdir, *extra):
  return subprocess.Popen([sys.executable, 'train.py', *FLAGS, f'--config.train.workdir={workdir}', *extra],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def records(workdir, split):
  """The last record per step (a resumed run logs again the steps after its checkpoint)."""
  by_step = {}
  for line in open(os.path.join(workdir, 'metrics.jsonl')):
    r = json.loads(line)
    if r['split'] == split:
      by_step[r['step']] = r
  return by_step


def wait_for_step(workdir, step, proc, timeout=240):
  path = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f'train.py ended before step {step}: {proc.stdout.read()[-3000:]}')
    if os.path.exists(path) and any(s >= step for s in records(workdir, 'train')):
      return
    time.sleep(0.05)
  raise AssertionError(f'no step {step} within {timeout} s')


def final_params(workdir):
  directory = os.path.join(workdir, 'checkpoint')
  return checkpoint.load_params(directory, checkpoint.load_config(directory).model)


@pytest.mark.slow  # ~45 s on 2 cores (three launches of train.py)
def test_sigterm_then_resume_equals_the_uninterrupted_run(tmp_path):
  straight, interrupted = str(tmp_path / 'straight'), str(tmp_path / 'interrupted')
  runs = [train_py(straight), train_py(interrupted)]
  try:
    wait_for_step(interrupted, 3, runs[1])
    runs[1].send_signal(signal.SIGTERM)
    out = runs[1].communicate(timeout=240)[0]
    assert runs[1].returncode == 0, out[-3000:]
    assert 'preempted (SIGTERM)' in out, out[-3000:]
    stopped_at = train_checkpoint.TrainCheckpointer(os.path.join(interrupted, 'checkpoints'),
                                                    config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny.py')
                                                                           ).train).latest_step()
    assert stopped_at is not None and 3 <= stopped_at < STEPS, stopped_at
    assert not os.path.exists(os.path.join(interrupted, 'checkpoint'))  # no final model from a preempted run
    resumed = train_py(interrupted)
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out[-3000:]
    assert f'resumed at step {stopped_at}' in out, out[-3000:]
    out = runs[0].communicate(timeout=300)[0]
    assert runs[0].returncode == 0, out[-3000:]
  finally:
    for proc in runs:
      if proc.poll() is None:
        proc.kill()
  want, got = records(straight, 'train'), records(interrupted, 'train')
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  for step in want:  # same data, same dropout masks, same updates: bit-identical losses
    assert got[step]['loss'] == want[step]['loss'], (step, got[step]['loss'], want[step]['loss'])
  assert records(interrupted, 'validation')[STEPS]['loss'] == records(straight, 'validation')[STEPS]['loss']
  for a, b in zip(jax.tree_util.tree_leaves(final_params(interrupted)),
                  jax.tree_util.tree_leaves(final_params(straight))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


CRASH_SCRIPT = '''
import os, sys
import jax, jax.numpy as jnp, ml_collections
from dsjax.train import train_checkpoint

class Iterator:
  def get_state(self):
    return b'{}'

cfg = ml_collections.ConfigDict(dict(keep_checkpoints=3, keep_best=0))
manager = train_checkpoint.TrainCheckpointer(sys.argv[1], cfg)
state = {'w': jnp.arange(1000, dtype=jnp.float32), 'big': jnp.ones((64, 1024, 1024), jnp.float32)}
manager.save(1, state, Iterator(), {'step': 1})
manager.wait()
manager.save(2, jax.tree_util.tree_map(lambda x: x + 1, state), Iterator(), {'step': 2})
os._exit(3)  # killed while step 2 is being written in the background
'''


def test_crash_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
  directory = str(tmp_path / 'checkpoints')
  result = subprocess.run([sys.executable, '-c', CRASH_SCRIPT, directory], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, 'PYTHONPATH': ROOT})
  assert result.returncode == 3, result.stderr[-3000:]
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny.py')).train
  manager = train_checkpoint.TrainCheckpointer(directory, cfg)
  assert manager.latest_step() == 1

  class Iterator:
    def set_state(self, state):
      self.state = state

    def start_prefetch(self):
      pass

  abstract = {'w': jax.ShapeDtypeStruct((1000,), np.float32), 'big': jax.ShapeDtypeStruct((64, 1024, 1024),
                                                                                           np.float32)}
  state, meta = manager.restore(1, abstract, Iterator())
  np.testing.assert_array_equal(np.asarray(state['w']), np.arange(1000, dtype=np.float32))
  assert meta == {'step': 1}
  manager.close()


def test_restore_onto_a_different_mesh(tmp_path):
  """Written on mesh (2, 2, 2), restored onto (8, 1, 1): same values, the new mesh's shardings; the data iterator
  continues where it was."""
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny.py'))
  m = cfg.model
  m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim = 64, 1, 8, 8, 64
  cfg.data.seq_len = 64
  model = Transformer(m)
  optimizer = optimizer_lib.make_optimizer(cfg.optim, 10)

  def shardings_for(data, fsdp, tensor):
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = data, fsdp, tensor
    return state_lib.state_shardings(model, optimizer, 64, sharding_lib.make_mesh(cfg.mesh), cfg.mesh)

  written_shardings = shardings_for(2, 2, 2)
  state = state_lib.init_train_state(model, optimizer, jax.random.key(0), 64, written_shardings)
  tokenizer = tokenizer_lib.load_tokenizer('byte')
  make_iterator = lambda: pipeline.ShardedBatchIterator(cfg.data, tokenizer, split='train', global_batch_size=8,
                                                        seed=0, num_shards=2)
  iterator = make_iterator()
  next(iterator)
  manager = train_checkpoint.TrainCheckpointer(str(tmp_path), cfg.train)
  manager.save(1, state, iterator, {'note': 'x'})
  manager.wait()
  expected_next = next(iterator)

  target_shardings = shardings_for(8, 1, 1)
  example = jax.eval_shape(lambda: state)
  fresh = make_iterator()
  restored, meta = manager.restore(1, train_checkpoint.abstract_state(target_shardings, example), fresh)
  manager.close()
  assert meta == {'note': 'x'}
  for got, want, sharding in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state),
                                 jax.tree_util.tree_leaves(target_shardings)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.sharding.is_equivalent_to(sharding, got.ndim)
  q_kernel = lambda shardings: shardings.params['layers']['attention']['q_proj']['kernel']
  assert not q_kernel(target_shardings).is_equivalent_to(q_kernel(written_shardings), 4)  # a real re-layout
  following = next(fresh)
  for key in expected_next:
    np.testing.assert_array_equal(following[key], expected_next[key])


def test_retention_keeps_the_latest_and_the_best(tmp_path):
  """keep_checkpoints=2, keep_best=1: the two newest steps plus the lowest held-out loss survive."""
  import ml_collections

  class Iterator:
    def get_state(self):
      return b'[]'

  manager = train_checkpoint.TrainCheckpointer(
      str(tmp_path), ml_collections.ConfigDict(dict(keep_checkpoints=2, keep_best=1)))
  losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: None, 5: 2.5}  # step 4 had no evaluation
  for step, loss in losses.items():
    manager.save(step, {'w': np.full((4,), step, np.float32)}, Iterator(), {'step': step}, eval_loss=loss)
    manager.wait()
  kept = sorted(int(name) for name in os.listdir(tmp_path) if name.isdigit())
  manager.close()
  assert kept == [2, 4, 5], kept


@pytest.mark.slow  # heavy end-to-end run: kept out of the 10-minute default suite (pytest -m slow runs it)
def test_rerunning_a_finished_run_resumes_at_its_end(tmp_path):
  """The same command again: resumes at the last step, trains nothing, evaluates the same params, saves again."""
  from dsjax.train import loop
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny.py'))
  m = cfg.model
  m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim = 32, 1, 2, 2, 48
  cfg.data.seq_len, cfg.data.eval_batches = 32, 1
  t = cfg.train
  t.steps, t.checkpoint_every, t.num_samples, t.progress_bar, t.workdir = 2, 1, 0, False, str(tmp_path)
  first = loop.train(cfg)
  again = loop.train(cfg)
  assert first['start_step'] == 0 and again['start_step'] == 2 and again['history'] == []
  assert again['final_eval'] == first['final_eval']
  for a, b in zip(jax.tree_util.tree_leaves(again['params']), jax.tree_util.tree_leaves(first['params'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class SigtermAfter(hooks_lib.Hook):
  """Sends this process a SIGTERM after step `step`: the run's Preemption hook stops it after the next step, which the
  Checkpointing hook saves (what a preempted VM sees, without a subprocess)."""

  def __init__(self, step: int):
    self.step = step

  def on_step(self, run, step):
    if step == self.step:
      os.kill(os.getpid(), signal.SIGTERM)


def tiny_moe_resume_config(workdir):
  """configs/tiny_moe.py shrunk to seconds: MLA (query compression), a dense layer then a DeepSeekMoE layer (8
  experts, group-limited sigmoid routing, correction bias updated every step, balance loss), one MTP depth,
  dropout."""
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny_moe.py'))
  m = cfg.model
  m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim, m.dropout_rate = 32, 2, 2, 2, 64, 0.1
  m.mla.update(dict(kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8))
  m.moe.expert_dim = 16
  m.moe.bias_update_rate = 0.01
  cfg.data.seq_len, cfg.data.eval_batches = 32, 1
  t = cfg.train
  t.steps, t.eval_every, t.log_every, t.checkpoint_every, t.num_samples = 5, 2, 1, 0, 0
  t.progress_bar, t.tensorboard, t.workdir = False, False, workdir
  return cfg


@pytest.mark.slow  # ~45-55 s on 2 shared cores (three runs, each compiling the MLA + MoE + MTP step)
def test_moe_mla_mtp_run_resumes_exactly(tmp_path):
  """A tiny_moe run preempted (SIGTERM) after step 3 of 5 and resumed equals the uninterrupted run: every step's loss,
  the held-out loss and the final params bit for bit, the MoE correction biases (moved by the bias update, not by
  AdamW) and the MTP depth included."""
  assert threading.current_thread() is threading.main_thread(), 'the SIGTERM handler is installed from the main thread'
  straight_dir, interrupted_dir = str(tmp_path / 'straight'), str(tmp_path / 'interrupted')
  straight = loop.train(tiny_moe_resume_config(straight_dir))
  stopped = loop.train(tiny_moe_resume_config(interrupted_dir), hooks=[SigtermAfter(2)])
  assert stopped['preempted'] and stopped['final_eval'] is None
  cfg = tiny_moe_resume_config(interrupted_dir)
  checkpointer = train_checkpoint.TrainCheckpointer(os.path.join(interrupted_dir, 'checkpoints'), cfg.train)
  assert checkpointer.latest_step() == 3
  checkpointer.close()
  bias_at_stop = np.asarray(stopped['params']['layers']['mlp']['gate']['e_score_correction_bias'])
  assert bias_at_stop.any() and 'mtp_0' in stopped['params']  # the bias has moved: restoring it matters
  resumed = loop.train(cfg)
  assert resumed['start_step'] == 3
  want, got = records(straight_dir, 'train'), records(interrupted_dir, 'train')
  assert sorted(got) == sorted(want) == list(range(1, 6))
  for step in want:  # same data, dropout masks, routing and updates: bit-identical losses and balance terms
    for key in ('loss', 'moe_balance_loss', 'expert_imbalance'):
      assert got[step][key] == want[step][key], (step, key, got[step][key], want[step][key])
  assert records(interrupted_dir, 'validation')[5]['loss'] == records(straight_dir, 'validation')[5]['loss']
  flat_want = jax.tree_util.tree_leaves_with_path(straight['params'])
  flat_got = dict(jax.tree_util.tree_leaves_with_path(resumed['params']))
  assert len(flat_got) == len(flat_want)
  for path, value in flat_want:
    np.testing.assert_array_equal(np.asarray(flat_got[path]), np.asarray(value), err_msg=jax.tree_util.keystr(path))
  bias = np.asarray(resumed['params']['layers']['mlp']['gate']['e_score_correction_bias'])
  assert not np.array_equal(bias, bias_at_stop)  # it kept moving after the resume
