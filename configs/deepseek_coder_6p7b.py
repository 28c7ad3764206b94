"""DeepSeek-Coder 6.7B (deepseek-ai/deepseek-coder-6.7b-base): 6,740,512,768 parameters."""
import ml_collections

from configs.deepseek_coder import deepseek_coder_config


def get_config() -> ml_collections.ConfigDict:
  return deepseek_coder_config(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, mlp_dim=11008)
