"""DeepSeek-R1-Distill-Qwen-32B (deepseek-ai/DeepSeek-R1-Distill-Qwen-32B, from Qwen2.5-32B): 32,763,876,352
parameters (Hugging Face: 32.8B params).

Source: https://huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Qwen-32B/blob/main/config.json (values as in the
copies that name it as _name_or_path): Qwen2ForCausalLM, 64 layers, hidden 5120, 40 heads, 8 KV heads,
intermediate_size 27648, vocab 152064, max_position_embeddings 131072, rope_theta 1000000, rope_scaling null,
rms_norm_eps 1e-5, tie_word_embeddings false.
"""
import ml_collections

from configs.r1_distill_qwen import r1_distill_qwen_config


def get_config() -> ml_collections.ConfigDict:
  return r1_distill_qwen_config(hidden_size=5120, num_layers=64, num_heads=40, num_kv_heads=8, mlp_dim=27648,
                                rope_theta=1000000.0, norm_eps=1e-5)
