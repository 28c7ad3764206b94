"""DeepSeek-Coder-V2-Lite (deepseek-ai/DeepSeek-Coder-V2-Lite-Base and -Instruct): 15,706,484,224 parameters, 2.45B
activated per token (the model card: 16B total, 2.4B active; Hugging Face: 15.7B params).

Source: https://huggingface.co/deepseek-ai/DeepSeek-Coder-V2-Lite-Base/blob/main/config.json (commit 5a3cf15; the
Instruct repo's config.json has the same values): DeepseekV2ForCausalLM, 27 layers, hidden 2048, 16 heads,
kv_lora_rank 512, q_lora_rank null (queries projected directly), qk_nope 128 / qk_rope 64 / v_head 128, 64 routed
experts + 2 shared of moe_intermediate_size 1408, top-6, first_k_dense_replace 1 (intermediate_size 10944),
topk_method greedy, n_group 1, topk_group 1, scoring_func softmax, norm_topk_prob false, routed_scaling_factor 1.0,
aux_loss_alpha 0.001 (seq_aux true), vocab 102400, max_position_embeddings 163840, rope_theta 10000, rope_scaling
yarn factor 40 from 4096, beta_fast 32, beta_slow 1, mscale 0.707, mscale_all_dim 0.707, rms_norm_eps 1e-6,
tie_word_embeddings false. The same dimensions are in deepseek-ai/DeepSeek-V3's inference/configs/config_16B.json.
"""
import ml_collections

from configs.deepseek_v2 import deepseek_v2_config


def get_config() -> ml_collections.ConfigDict:
  return deepseek_v2_config(
      vocab_size=102400, hidden_size=2048, num_layers=27, num_heads=16, mlp_dim=10944, q_lora_rank=0,
      kv_lora_rank=512, num_experts=64, num_shared_experts=2, expert_dim=1408, top_k=6, first_dense_layers=1,
      scoring='softmax', topk_method='greedy', num_groups=1, topk_groups=1, norm_topk_prob=False,
      routed_scaling_factor=1.0, yarn_mscale=0.707, yarn_mscale_all_dim=0.707, aux_loss_weight=0.001)
