"""Tiny CPU default: ~3.4M parameters, byte-level, trains on the stdlib corpus in a few minutes on 2 cores."""
import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  cfg = base.get_config()
  m = cfg.model
  m.vocab_size = 384           # 259 byte-level ids, padded to a multiple of 128
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
  t.steps = 600
  t.batch_size = 16
  t.log_every = 10
  t.eval_every = 200

  o = cfg.optim
  o.learning_rate = 3e-3
  o.warmup_steps = 50
  o.b2 = 0.99

  cfg.sample.max_new_tokens = 96
  return cfg
