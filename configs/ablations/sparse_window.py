"""Ablation: the tiny model with sparse attention (sliding window + global sink tokens).

Sweep the window from the command line, e.g. --config.model.attention.window=32, or run the whole study (window x
number of global tokens, full attention as the reference):

  python -m dsjax.ablate configs/ablations/sparse_window.py
"""
import ml_collections

from configs import tiny
from dsjax import ablate


def get_config() -> ml_collections.ConfigDict:
  cfg = tiny.get_config()
  cfg.model.attention.kind = 'sparse'
  cfg.model.attention.window = 64
  cfg.model.attention.num_global = 4
  return cfg


def get_study() -> ablate.Study:
  base = get_config()
  base.train.steps = 300
  base.train.eval_every = 50
  runs = {'full': {'model.attention.kind': 'full'}}
  runs.update(ablate.grid({'model.attention.window': [16, 32, 64, 128], 'model.attention.num_global': [0, 4]},
                          names={'model.attention.num_global': 'global'}))
  return ablate.Study(name='sparse_window', base=base, runs=list(runs.items()),
                      description='Sparse attention window x global (sink) tokens at configs/tiny.py scale '
                      '(seq_len 256); full attention for reference.')
