"""Tiny CPU default: 3.1M parameters, byte-level; `python train.py` trains it on the stdlib corpus in ~7 minutes
on 2 CPU cores (400 steps of 8 x 256 tokens) to ~2.9 held-out bits per byte (unigram baseline ~4.6)."""
import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  cfg = base.get_config()
  m = cfg.model
  m.vocab_size = 384           # 262 byte-level ids, padded to a multiple of 128
  m.hidden_size = 256
  m.num_layers = 4
  m.num_heads = 8
  m.num_kv_heads = 4
  m.mlp_dim = 704
  m.max_positions = 1024
  m.tie_embeddings = False
  m.dtype = 'float32'          # CPUs have no fast bf16 matmuls; accelerator configs use bfloat16
  m.attention.window = 64
  m.attention.num_global = 4
  m.attention.top_k = 4

  cfg.data.seq_len = 256
  cfg.data.eval_batches = 8

  t = cfg.train
  t.steps = 400
  t.batch_size = 8
  t.log_every = 10
  t.eval_every = 100

  o = cfg.optim
  o.learning_rate = 3e-3
  o.warmup_steps = 30
  o.b2 = 0.99

  cfg.sample.max_new_tokens = 96
  return cfg
