"""The DeepSeek-R1-Distill-Qwen family (Qwen2 architecture, Qwen2ForCausalLM), shared by r1_distill_qwen_7b.py
and r1_distill_qwen_32b.py.

What their Hugging Face config.json files have in common: biases on the q/k/v projections (Qwen2 always has them;
none on o_proj or the MLP), grouped-query attention with head_dim 128, SwiGLU MLP, untied embeddings
(tie_word_embeddings false), vocabulary 152064, max_position_embeddings 131072, no rope_scaling, no sliding window
(use_sliding_window false). They differ in rope_theta and rms_norm_eps (the 7B is distilled into Qwen2.5-Math-7B:
theta 10000, eps 1e-6; the 32B into Qwen2.5-32B: theta 1e6, eps 1e-5).
"""
import ml_collections

from configs import base


def r1_distill_qwen_config(*, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int, mlp_dim: int,
                           rope_theta: float, norm_eps: float) -> ml_collections.ConfigDict:
  """The base config with a Qwen2-architecture model of the given size."""
  cfg = base.get_config()
  m = cfg.model
  m.update(dict(vocab_size=152064, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                num_kv_heads=num_kv_heads, head_dim=0, mlp_dim=mlp_dim, norm_eps=norm_eps, max_positions=131072,
                tie_embeddings=False, qkv_bias=True))
  m.positions.update(dict(kind='rope', rope_theta=rope_theta, rope_scaling='linear', rope_scaling_factor=1.0))
  m.attention.kind = 'full'
  cfg.data.seq_len = 4096
  return cfg


def get_config() -> ml_collections.ConfigDict:
  """The 7B size (also in r1_distill_qwen_7b.py), so this file works as a --config too."""
  from configs import r1_distill_qwen_7b  # pylint: disable=g-import-not-at-top  (it imports this module)
  return r1_distill_qwen_7b.get_config()
