"""Continual pretraining: continue an imported DeepSeek-Coder checkpoint on new data, replaying old data.

  python -m dsjax.convert.hf import /models/deepseek-coder-1.3b-base ckpt/ds13b
  python train.py --config=configs/continual_pretraining.py:ckpt/ds13b \
      --config.data.mixture.new.source=/data/new_code.jsonl \
      --config.data.mixture.replay.source=/data/pretraining_sample.jsonl --config.train.workdir=runs/cpt

The recipe of Ibrahim et al. 2024 ("Simple and Scalable Strategies to Continually Pre-train Large Language Models")
and Gupta et al. 2023 ("How to (re)warm your model"):
- start from the checkpoint's weights (train.init_from) with a fresh optimizer;
- re-warm the learning rate from 0 to a peak below the original pretraining peak (DeepSeek-Coder 1.3B: 5.3e-4),
  then decay it again with a cosine (optim.warmup_steps, optim.learning_rate);
- mix the new data with a replay of data like the original pretraining data, REPLAY_RATIO of the tokens
  (data.mixture.*.weight are token shares; change both weights to change the ratio);
- keep the original objective: DeepSeek-Coder trained with fill-in-the-middle on half of the documents.

The model (architecture, positions, tokenizer and its special tokens, seq_len) comes from the checkpoint, so it
cannot mismatch. Without an argument the config starts from a random configs/tiny.py model (to try the recipe).
The replay source defaults to the stdlib corpus, a stand-in: DeepSeek-Coder's pretraining data is not public; the new
source defaults to the stdlib's asyncio package, a stand-in too.
"""
import os
import sysconfig

import ml_collections

from configs import tiny

REPLAY_RATIO = 0.25


def get_config(init_from: str = '') -> ml_collections.ConfigDict:
  """The continual-pretraining config of the dsjax checkpoint `init_from` ('' = a random tiny model)."""
  if init_from:
    from dsjax import checkpoint  # pylint: disable=g-import-not-at-top  (only with a checkpoint)
    cfg = checkpoint.load_config(init_from)  # its model and tokenizer; train.init_from = init_from
  else:
    cfg = tiny.get_config()
  d = cfg.data
  d.mixture = ml_collections.ConfigDict({
      # The new data: set it on the command line. The default, the stdlib's asyncio package, is a stand-in "new
      # domain" that works everywhere; deduplication across sources then drops it from the replayed stdlib.
      'new': dict(source=os.path.join(sysconfig.get_paths()['stdlib'], 'asyncio'), weight=1.0 - REPLAY_RATIO),
      'replay': dict(source='stdlib', weight=REPLAY_RATIO),   # a sample of the old distribution
  })
  d.dedup = 'near'       # across new and replay data, before the split
  d.fim_rate = 0.5       # as DeepSeek-Coder's pretraining (PSM and SPM)

  o = cfg.optim
  o.learning_rate = 1e-4 if init_from else 1e-3
  o.warmup_steps = 100   # the re-warmup
  o.min_lr_ratio = 0.1
  cfg.train.steps = 2000 if init_from else 300
  return cfg
