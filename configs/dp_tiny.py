"""DP-SGD on CPU: a smaller configs/tiny.py (2 layers, hidden 128: 0.47M parameters) trained with differential
privacy on 64-token rows, 256 rows per step in 8 microbatches of 32; `python train.py --config=configs/dp_tiny.py`.

DP-SGD adds Gaussian noise of std noise_multiplier * l2_clip to the sum of the clipped per-example gradients, then
divides by the batch rows, so the noise per coordinate shrinks with the batch and, relative to the gradient, with
fewer parameters: hence the large accumulated batch, the short rows (a per-example gradient costs about a row's
backward) and the small model. configs/tiny.py itself with privacy on (8 rows per step) ends worse than the unigram
baseline. Measurements and what else was tried: docs/privacy.md.
"""
import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
  cfg = tiny.get_config()
  m = cfg.model
  m.num_layers = 2
  m.hidden_size = 128
  m.num_heads = 4
  m.num_kv_heads = 2
  m.mlp_dim = 352

  cfg.data.seq_len = 64

  t = cfg.train
  t.batch_size = 256           # rows per step: the noise on the mean gradient is noise_multiplier * l2_clip / 256
  t.grad_accum_steps = 8       # per-example gradients of 32 rows at a time
  t.steps = 500

  p = cfg.privacy
  p.enabled = True
  p.noise_multiplier = 0.8
  p.l2_clip = 1.0
  p.delta = 1e-5
  return cfg
