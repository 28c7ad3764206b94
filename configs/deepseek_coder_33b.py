"""DeepSeek-Coder 33B (deepseek-ai/deepseek-coder-33b-base): grouped-query attention with 8 KV heads."""
import ml_collections

from configs.deepseek_coder import deepseek_coder_config


def get_config() -> ml_collections.ConfigDict:
  return deepseek_coder_config(hidden_size=7168, num_layers=62, num_heads=56, num_kv_heads=8, mlp_dim=19200)
