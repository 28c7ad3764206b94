"""The loop's hooks and what a run leaves behind: a caller's hook sees every step and the end, the last logged step
has a real throughput, the run prints where its files are and the commands for them, and a run never writes into
a checkpoint it reads (train.py's default workdir for a checkpoint's config is a new one)."""
import os
import subprocess
import sys

import pytest

from dsjax import checkpoint
from dsjax import cli
from dsjax import config as config_lib
from dsjax import experiment
from dsjax.train import hooks as hooks_lib
from dsjax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def small_config(workdir=''):
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny.py'))
  m = cfg.model
  m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim = 32, 2, 4, 2, 64
  cfg.data.seq_len, cfg.data.eval_batches = 32, 1
  t = cfg.train
  t.batch_size, t.steps, t.eval_every, t.log_every, t.checkpoint_every = 8, 3, 2, 1, 0
  t.progress_bar, t.tensorboard, t.num_samples, t.workdir = False, False, 0, str(workdir)
  return cfg


class Recorder(hooks_lib.Hook):

  def __init__(self):
    self.steps, self.ends = [], 0

  def on_step(self, run, step):
    self.steps.append((step, int(run.state.step), run.summary['last_eval'] is not None))

  def on_end(self, run):
    self.ends += 1
    run.summary['recorded'] = run.summary['final_eval']['loss']


def test_a_callers_hook_sees_every_step_after_the_runs_own_and_the_end(tmp_path):
  recorder = Recorder()
  summary = loop.train(small_config(tmp_path / 'run'), hooks=[recorder])
  # State of each step handed over; the periodic eval (every 2) ran before the caller's hook at step 2 only.
  assert recorder.steps == [(1, 1, False), (2, 2, True), (3, 3, False)]
  assert recorder.ends == 1 and summary['recorded'] == summary['final_eval']['loss']
  assert [e['step'] for e in summary['evals']] == [2, 3]
  assert summary['checkpoint'] == os.path.join(str(tmp_path / 'run'), 'checkpoint')
  assert all(r['tokens_per_sec'] > 0 for r in summary['history'])  # the last step too (it used to log 0)


def test_where_to_look_names_the_files_and_the_commands(tmp_path):
  cfg = small_config(tmp_path / 'run')
  summary = {'checkpoint': str(tmp_path / 'run' / 'checkpoint')}
  text = experiment.where_to_look(cfg, summary)
  ckpt = os.path.relpath(summary['checkpoint'])
  ckpt = summary['checkpoint'] if ckpt.startswith('..') else ckpt
  assert f'python sample.py --checkpoint={ckpt}' in text and f'python serve.py --checkpoint={ckpt}' in text
  assert os.path.join(str(tmp_path / 'run'), 'metrics.jsonl') in text
  cfg.train.workdir = ''
  assert 'nothing was saved' in experiment.where_to_look(cfg, {})


def test_a_run_never_writes_into_the_checkpoint_it_starts_from(tmp_path):
  cfg = small_config(tmp_path / 'run')
  os.makedirs(tmp_path / 'run' / 'checkpoint')
  cfg.train.init_from = str(tmp_path / 'run' / 'checkpoint')
  with pytest.raises(config_lib.ConfigError, match=r'config\.train\.workdir=.*overwrite config\.train\.init_from'):
    loop.train(cfg)


def test_a_checkpoints_config_starts_a_new_run_in_a_new_workdir(tmp_path):
  cfg = small_config(tmp_path / 'tiny')
  directory = tmp_path / 'tiny' / 'checkpoint'
  checkpoint.save_model(str(directory), cfg, {'w': __import__('numpy').zeros(2)})
  saved = checkpoint.load_config(str(directory))
  assert saved.train.workdir == '' and saved.train.init_from == str(directory)
  assert cli.default_workdir(str(directory / 'config.py')) == os.path.join('runs', 'tiny-continued')
  assert cli.default_workdir('configs/tiny.py') == os.path.join('runs', 'tiny')
  assert cli.default_workdir('configs/ablations/sparse_window.py') == os.path.join('runs', 'sparse_window')


@pytest.mark.slow  # a CLI run end to end (~40 s)
def test_train_py_defaults_to_runs_config_name_and_prints_the_next_commands(tmp_path):
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'train.py'), f'--config={os.path.join(ROOT, "configs", "tiny.py")}',
       '--config.train.steps=2', '--config.model.num_layers=1', '--config.data.eval_batches=1',
       '--config.train.num_samples=0', '--config.train.progress_bar=False'],
      cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert os.path.isfile(tmp_path / 'runs' / 'tiny' / 'checkpoint' / 'config.json')
  assert 'python sample.py --checkpoint=runs/tiny/checkpoint' in out.stdout
  assert 'python serve.py --checkpoint=runs/tiny/checkpoint' in out.stdout
