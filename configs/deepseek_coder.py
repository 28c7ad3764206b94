"""The DeepSeek-Coder architecture family (LLaMA layout), shared by the size presets.

As published in the checkpoints' config.json files: RoPE theta 100000 with linear scaling factor 4, 16384
positions, RMSNorm eps 1e-6, untied embeddings, vocabulary 32256, SwiGLU MLP, no biases.
"""
import ml_collections

from configs import base


def deepseek_coder_config(*, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
                          mlp_dim: int) -> ml_collections.ConfigDict:
  """The base config with a DeepSeek-Coder model of the given size."""
  cfg = base.get_config()
  m = cfg.model
  m.update(dict(vocab_size=32256, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                num_kv_heads=num_kv_heads, head_dim=0, mlp_dim=mlp_dim, norm_eps=1e-6, max_positions=16384,
                tie_embeddings=False))
  m.positions.update(dict(kind='rope', rope_theta=100000.0, rope_scaling_factor=4.0))
  m.attention.kind = 'full'
  cfg.data.seq_len = 4096
  return cfg


def get_config() -> ml_collections.ConfigDict:
  """The 1.3B size (also in deepseek_coder_1p3b.py), so this file works as a --config too."""
  return deepseek_coder_config(hidden_size=2048, num_layers=24, num_heads=16, num_kv_heads=16, mlp_dim=5504)
