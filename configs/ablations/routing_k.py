"""Ablation: routed attention (Mixture-of-Head style) with k of the 8 heads active per token, vs full attention.

  python -m dsjax.ablate configs/ablations/routing_k.py
  python train.py --config=configs/ablations/routing_k.py --config.model.attention.top_k=2
"""
import ml_collections

from configs import tiny
from dsjax import ablate


def get_config() -> ml_collections.ConfigDict:
  """configs/tiny.py with routed attention, top_k=4 of 8 heads, 300 steps."""
  cfg = tiny.get_config()
  cfg.model.attention.kind = 'routed'
  cfg.model.attention.top_k = 4
  cfg.train.steps = 300
  cfg.train.eval_every = 50
  return cfg


def get_study() -> ablate.Study:
  runs = {'full': {'model.attention.kind': 'full'}}
  runs.update(ablate.grid({'model.attention.top_k': [1, 2, 4, 8]}, names={'model.attention.top_k': 'k'}))
  runs['k-2_shared-2'] = {'model.attention.top_k': 2, 'model.attention.num_shared_heads': 2}
  return ablate.Study(name='routing_k', base=get_config(), runs=list(runs.items()),
                      description='Routed attention: top-k active heads of 8 (k=8 routes every head through the '
                      'gates), plus 2 always-on shared heads with k=2; full attention for reference.')
