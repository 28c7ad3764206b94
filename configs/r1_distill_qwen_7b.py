"""DeepSeek-R1-Distill-Qwen-7B (deepseek-ai/DeepSeek-R1-Distill-Qwen-7B, from Qwen2.5-Math-7B): 7,615,616,512
parameters (Hugging Face: 7.62B params).

Source: https://huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Qwen-7B/blob/main/config.json (values as in the
copies that name it as _name_or_path): Qwen2ForCausalLM, 28 layers, hidden 3584, 28 heads, 4 KV heads,
intermediate_size 18944, vocab 152064, max_position_embeddings 131072, rope_theta 10000, rope_scaling null,
rms_norm_eps 1e-6, tie_word_embeddings false.
"""
import ml_collections

from configs.r1_distill_qwen import r1_distill_qwen_config


def get_config() -> ml_collections.ConfigDict:
  return r1_distill_qwen_config(hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, mlp_dim=18944,
                                rope_theta=10000.0, norm_eps=1e-6)
