"""DeepSeek-Coder 33B (deepseek-ai/deepseek-coder-33b-base): grouped-query attention, 8 KV heads.

Architecture as published in the checkpoint's config.json: LLaMA layout, RoPE theta 100000 with linear
scaling factor 4, 16384 positions, RMSNorm eps 1e-6, untied embeddings, vocabulary 32256.
"""
import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  cfg = base.get_config()
  m = cfg.model
  m.vocab_size = 32256
  m.hidden_size = 7168
  m.num_layers = 62
  m.num_heads = 56
  m.num_kv_heads = 8
  m.head_dim = 0
  m.mlp_dim = 19200
  m.norm_eps = 1e-6
  m.max_positions = 16384
  m.tie_embeddings = False
  m.positions.kind = 'rope'
  m.positions.rope_theta = 100000.0
  m.positions.rope_scaling_factor = 4.0
  m.attention.kind = 'full'
  cfg.data.seq_len = 4096
  return cfg
