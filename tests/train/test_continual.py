"""Continual pretraining (configs/continual_pretraining.py) from an imported tiny Hugging Face LLaMA: the run starts
from the imported weights (its first loss is the one transformers computes), re-warms the learning rate from 0 and
mixes new and replayed data at the configured token ratio."""
import json
import os
import random

import numpy as np
import pytest

from dsjax import config as config_lib
from dsjax.convert import hf
from dsjax.data import pipeline
from dsjax.data import tokenizer as tokenizer_lib
from dsjax.train import loop
from tests.lazy import torch, transformers  # imported on first use (the `hf` extra)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, WARMUP, PEAK, BATCH, SEQ = 24, 8, 3e-3, 8, 64


def write_jsonl(path, alphabet, num_docs, seed):
  rng = random.Random(seed)
  with open(path, 'w') as f:
    for _ in range(num_docs):
      f.write(json.dumps({'text': ''.join(rng.choice(alphabet) for _ in range(rng.randint(60, 160)))}) + '\n')
  return str(path)


def torch_loss(model, batch):
  """Mean next-token NLL of the batch under the transformers model, each packed segment run on its own."""
  nll, count = 0.0, 0
  for inputs, targets, seg in zip(batch['inputs'], batch['targets'], batch['segment_ids']):
    for k in np.unique(seg[seg > 0]):
      sel = seg == k
      with torch.no_grad():
        logits = model(torch.tensor(inputs[sel][None].astype(np.int64))).logits[0]
      nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(targets[sel].astype(np.int64)),
                                                     reduction='sum'))
      count += int(sel.sum())
  return nll / count


@pytest.fixture
def imported_checkpoint(tmp_path):
  torch.manual_seed(0)
  config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=300, max_position_embeddings=128)
  model = transformers.LlamaForCausalLM(config).eval()
  model.save_pretrained(tmp_path / 'hf')  # no tokenizer: dsjax's byte one fits the vocabulary
  hf.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'ckpt'))
  return model, str(tmp_path / 'ckpt')


def test_continual_pretraining_from_an_imported_checkpoint(imported_checkpoint, tmp_path):
  model, ckpt = imported_checkpoint
  cfg = config_lib.import_config_file(os.path.join(ROOT, 'configs', 'continual_pretraining.py')).get_config(ckpt)
  assert cfg.train.init_from == os.path.abspath(ckpt)
  cfg.data.mixture.new.source = write_jsonl(tmp_path / 'new.jsonl', 'xyz ', 150, 0)
  cfg.data.mixture.replay.source = write_jsonl(tmp_path / 'old.jsonl', 'ab\n', 150, 1)
  cfg.data.update(dict(seq_len=SEQ, eval_batches=1, cache_dir=str(tmp_path / 'cache'), fim_rate=0.0))
  cfg.train.update(dict(steps=STEPS, batch_size=BATCH, log_every=1, eval_every=1000, workdir=str(tmp_path / 'run'),
                        num_samples=0, progress_bar=False, tensorboard=False, checkpoint_every=0))
  cfg.optim.update(dict(learning_rate=PEAK, warmup_steps=WARMUP))
  cfg.model.dtype = 'float32'
  config_lib.validate(cfg)
  replay = cfg.data.mixture.replay.weight / (cfg.data.mixture.replay.weight + cfg.data.mixture.new.weight)
  assert replay == pytest.approx(0.25)

  first_batch = next(pipeline.ShardedBatchIterator(cfg.data, tokenizer_lib.ByteTokenizer(), split='train',
                                                   global_batch_size=BATCH, seed=cfg.data.shuffle_seed,
                                                   num_shards=1))
  loop.train(cfg)
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  train = {r['step']: r for r in records if r['split'] == 'train'}
  assert sorted(train) == list(range(1, STEPS + 1))

  # Step 1's loss is the imported weights' loss on the first batch, as transformers computes it.
  assert train[1]['loss'] == pytest.approx(torch_loss(model, first_batch), rel=1e-4)
  # The learning rate is re-warmed linearly from 0 to the peak, then decays.
  for step in range(1, WARMUP + 2):
    assert train[step]['learning_rate'] == pytest.approx(PEAK * (step - 1) / WARMUP, abs=1e-9)
  assert train[STEPS]['learning_rate'] < PEAK
  # The realised token shares follow the replay ratio.
  assert train[STEPS]['share/replay'] == pytest.approx(replay, abs=0.08)
  assert train[STEPS]['share/new'] + train[STEPS]['share/replay'] == pytest.approx(1.0)
  data = [r for r in records if r['split'] == 'data'][0]
  assert data['weights'] == pytest.approx({'new': 0.75, 'replay': 0.25})
  # And it learns the new data.
  assert np.mean([train[s]['loss'] for s in range(STEPS - 3, STEPS + 1)]) < train[1]['loss'] - 0.5
