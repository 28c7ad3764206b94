"""DeepSeek-Coder 1.3B (deepseek-ai/deepseek-coder-1.3b-base): 1,346,471,936 parameters."""
import ml_collections

from configs.deepseek_coder import deepseek_coder_config


def get_config() -> ml_collections.ConfigDict:
  return deepseek_coder_config(hidden_size=2048, num_layers=24, num_heads=16, num_kv_heads=16, mlp_dim=5504)
