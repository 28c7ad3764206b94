"""Ablation: the tiny model with sparse attention (sliding window + global sink tokens).

Sweep the window from the command line, e.g. --config.model.attention.window=32.
"""
import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
  cfg = tiny.get_config()
  cfg.model.attention.kind = 'sparse'
  cfg.model.attention.window = 64
  cfg.model.attention.num_global = 4
  return cfg
