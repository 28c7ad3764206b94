"""Ablation: position encodings on the tiny model: RoPE (two thetas, linear scaling) vs Transformer-XL relative.

  python -m dsjax.ablate configs/ablations/positions.py
  python train.py --config=configs/ablations/positions.py --config.model.positions.kind=xl
"""
import ml_collections

from configs import tiny
from dsjax import ablate


def get_config() -> ml_collections.ConfigDict:
  """configs/tiny.py (RoPE, theta 10000) for 300 steps with held-out evals every 50."""
  cfg = tiny.get_config()
  cfg.train.steps = 300
  cfg.train.eval_every = 50
  return cfg


def get_study() -> ablate.Study:
  return ablate.Study(
      name='positions', base=get_config(),
      description='Positions at configs/tiny.py scale (seq_len 256).',
      runs=[
          ('rope', {'model.positions.kind': 'rope'}),
          ('rope_theta-500', {'model.positions.kind': 'rope', 'model.positions.rope_theta': 500.0}),
          ('rope_scale-4', {'model.positions.kind': 'rope', 'model.positions.rope_scaling_factor': 4.0}),
          ('xl', {'model.positions.kind': 'xl'}),
      ])
