"""Ablation: full vs sparse vs routed attention on the tiny model (same data order, seeds and held-out batches).

  python -m dsjax.ablate configs/ablations/attention_kinds.py           # the study: table + plots
  python train.py --config=configs/ablations/attention_kinds.py         # its base run alone (full attention)
"""
import ml_collections

from configs import tiny
from dsjax import ablate

STEPS = 300


def get_config() -> ml_collections.ConfigDict:
  """The study's base: configs/tiny.py for 300 steps with held-out evals every 50 (full attention)."""
  cfg = tiny.get_config()
  cfg.train.steps = STEPS
  cfg.train.eval_every = 50
  cfg.train.log_every = 10
  return cfg


def get_study() -> ablate.Study:
  return ablate.Study(
      name='attention_kinds',
      description='Attention kind at configs/tiny.py scale (8 heads, 4 KV heads, seq_len 256).',
      base=get_config(),
      runs=[
          ('full', {'model.attention.kind': 'full'}),
          ('sparse', {'model.attention.kind': 'sparse', 'model.attention.window': 64,
                      'model.attention.num_global': 4}),
          ('routed', {'model.attention.kind': 'routed', 'model.attention.top_k': 4}),
          ('routed_sparse', {'model.attention.kind': 'routed', 'model.attention.top_k': 4,
                             'model.attention.sparse_mask': True}),
      ])
