"""End-to-end training on the embedded corpus: the model must beat the unigram baseline, computed here
independently from the training documents' bytes."""
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dsjax import config as config_lib
from dsjax import experiment
from dsjax.data import corpus
from dsjax.data import mixture
from dsjax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def small_config(**model_overrides):
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny.py'))
  m = cfg.model
  m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim = 64, 2, 4, 2, 160
  for key, value in model_overrides.items():
    section, _, field = key.rpartition('.')
    (m[section] if section else m)[field] = value
  cfg.data.seq_len = 128
  cfg.data.eval_batches = 4
  cfg.train.batch_size = 8
  cfg.train.steps = 120
  cfg.train.eval_every = 60
  cfg.train.log_every = 20
  cfg.train.progress_bar = False
  cfg.train.num_samples = 1
  cfg.sample.max_new_tokens = 8
  cfg.optim.learning_rate = 1e-2
  cfg.optim.warmup_steps = 10
  return cfg


def _tf_records(data: bytes):
  """The payloads of a TFRecord file: [length u64][crc u32][payload][crc u32] repeated."""
  offset = 0
  while offset < len(data):
    length = int.from_bytes(data[offset:offset + 8], 'little')
    yield data[offset + 12:offset + 12 + length]
    offset += 16 + length


def byte_unigram_nats(cfg, eval_batches):
  """Cross-entropy of a byte-frequency model fit on the training documents (add-one smoothed), in nats per token,
  on the targets of the eval batches. Counts raw UTF-8 bytes of the train split plus one bos and eos per
  document (ids 257/258 of the byte tokenizer) -- independent of the pipeline under test."""
  counts = np.zeros(259, np.int64)
  for i, doc in enumerate(mixture.load_split(cfg.data, 'train')):
    counts[:256] += np.bincount(np.frombuffer(doc.text.encode('utf-8'), np.uint8), minlength=256)
    counts[257] += 1
    counts[258] += 1
    if i >= 200:
      break
  log_p = np.log((counts + 1) / (counts.sum() + counts.size))
  targets = np.concatenate([b['targets'][b['segment_ids'] > 0] for b in eval_batches])
  return float(-log_p[targets].mean())


@pytest.mark.slow  # over 30 s on 2 cores (2026-12-02)
def test_short_run_beats_the_unigram_baseline(tmp_path):
  cfg = small_config()
  cfg.train.workdir = str(tmp_path)
  summary = experiment.train(cfg)
  from dsjax.data import tokenizer as tokenizer_lib
  eval_batches = pipeline.eval_batches(cfg.data, tokenizer_lib.load_tokenizer('byte'), cfg.train.batch_size)
  unigram = byte_unigram_nats(cfg, eval_batches)
  final = summary['final_eval']['loss']
  assert 3.0 < unigram < 4.0  # Python source is ~4.4-4.8 bits per byte under a unigram model
  assert final < unigram - 0.3, (final, unigram)
  assert summary['history'][-1]['loss'] < summary['history'][0]['loss']
  # Byte tokenizer: one target token per byte except eos, so bits per byte ~ nats per token / ln 2.
  assert abs(summary['final_eval']['bits_per_byte'] - final / math.log(2)) < 0.05
  records = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert {r['split'] for r in records} == {'data', 'train', 'validation'}
  assert all(r['tokens_per_sec'] > 0 for r in records if r['split'] == 'train')
  # TensorBoard events hold the same train losses (read back with tensorboardX's own event parser).
  from tensorboardX.event_file_writer import event_pb2
  events = sorted((tmp_path / 'tensorboard').glob('events.out.tfevents.*'))
  assert events, list(tmp_path.iterdir())
  logged = {}
  for record in _tf_records(events[0].read_bytes()):
    event = event_pb2.Event.FromString(record)
    for value in event.summary.value:
      if value.tag == 'train/loss':
        logged[event.step] = value.simple_value
  train_losses = {r['step']: r['loss'] for r in records if r['split'] == 'train'}
  assert sorted(logged) == sorted(train_losses)
  for step, loss in train_losses.items():
    assert abs(logged[step] - loss) <= 1e-6 * abs(loss)
  assert len(summary['samples']) == 1 and isinstance(summary['samples'][0], str)
  # The final model is saved as a checkpoint that loads back bit for bit.
  from dsjax import checkpoint
  restored = checkpoint.load_params(summary['checkpoint'], checkpoint.load_config(summary['checkpoint']).model)
  for a, b in zip(jax.tree_util.tree_leaves(summary['params']), jax.tree_util.tree_leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize('overrides', [
    {'attention.kind': 'sparse', 'attention.window': 16, 'attention.num_global': 2},
    {'attention.kind': 'routed', 'attention.top_k': 2},
    {'positions.kind': 'xl'},
    {'remat': 'full', 'dropout_rate': 0.1},
])
def test_every_variant_trains(overrides):
  cfg = small_config(**overrides)
  cfg.train.steps = 30
  cfg.train.log_every = 1
  cfg.train.eval_every = 1000
  cfg.train.num_samples = 0
  summary = experiment.train(cfg)
  history = summary['history']
  assert all(np.isfinite(r['loss']) for r in history)
  assert history[-1]['loss'] < history[0]['loss'] - 0.5, history
  if overrides.get('attention.kind') == 'routed':
    assert history[-1]['router_loss'] >= 1.0 - 1e-3  # the load-balance loss is >= 1, equality at uniform use


@pytest.mark.slow  # over 30 s on 2 cores (2026-12-02)
def test_train_py_runs_with_command_line_overrides(tmp_path):
  result = subprocess.run(
      [sys.executable, 'train.py', '--config=configs/tiny.py', '--config.model.attention.kind=sparse',
       f'--config.train.workdir={tmp_path}',
       '--config.train.steps=3', '--config.train.batch_size=8', '--config.data.seq_len=64',
       '--config.data.eval_batches=1', '--config.train.num_samples=1', '--config.sample.max_new_tokens=4',
       '--config.model.num_layers=1'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'attention=sparse' in result.stdout + result.stderr
  assert 'final held-out loss' in result.stdout and '--- sample 1/1 ---' in result.stdout
  assert f'python sample.py --checkpoint={tmp_path}/checkpoint' in result.stdout  # the run says where it is


@pytest.mark.slow
def test_default_train_py_run_beats_unigram_by_a_wide_margin(tmp_path):
  """The README's first command, as users run it (about 7 minutes on 2 cores)."""
  result = subprocess.run([sys.executable, 'train.py', f'--config.train.workdir={tmp_path}',
                           '--config.train.progress_bar=False'],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  final = [r for r in records if r['split'] == 'validation'][-1]
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny.py'))
  from dsjax.data import tokenizer as tokenizer_lib
  unigram_nats = byte_unigram_nats(
      cfg, pipeline.eval_batches(cfg.data, tokenizer_lib.load_tokenizer("byte"), cfg.train.batch_size))
  assert final['loss'] < unigram_nats - 1.0, (final, unigram_nats)
  n = cfg.train.num_samples
  assert all(f'--- sample {i}/{n} ---' in result.stdout for i in range(1, n + 1)), result.stdout[-2000:]
  assert f'python sample.py --checkpoint={tmp_path}/checkpoint' in result.stdout
