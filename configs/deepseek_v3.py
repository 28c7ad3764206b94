"""DeepSeek-V3 (deepseek-ai/DeepSeek-V3 and -V3-Base; DeepSeek-R1 has the same architecture): 671,026,419,200
parameters in the main model and 11,610,068,224 more in the multi-token-prediction module (it shares the embedding
and the output head), 36.6B activated per token without the input embedding table (the model card: 671B total,
37B activated; the Hugging Face checkpoint holds 684,531,386,000 = "685B = 671B main + 14B MTP": its MTP layer
stores its own copies of the embedding and the head, and its FP8 weights their block scales).

Source: https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json (the values below, checked against
copies of it and of DeepSeek-R1's identical config.json, transformers' and vLLM's DeepseekV3Config defaults, and
github.com/deepseek-ai/DeepSeek-V3 README.md / README_WEIGHTS.md): DeepseekV3ForCausalLM, 61 layers, hidden 7168,
128 heads, q_lora_rank 1536, kv_lora_rank 512, qk_nope 128 / qk_rope 64 / v_head 128, 256 routed experts + 1 shared
of moe_intermediate_size 2048, top-8, n_group 8, topk_group 4, topk_method noaux_tc, scoring_func sigmoid,
norm_topk_prob true, routed_scaling_factor 2.5, first_k_dense_replace 3 (intermediate_size 18432), vocab 129280,
num_nextn_predict_layers 1, max_position_embeddings 163840, rope_theta 10000, rope_scaling yarn factor 40 from
4096, beta_fast 32, beta_slow 1, mscale 1.0, mscale_all_dim 1.0, rms_norm_eps 1e-6, tie_word_embeddings false.

Training-only knobs from the DeepSeek-V3 technical report (arXiv 2412.19437, section 4.2): bias update speed 0.001
(auxiliary-loss-free balancing), sequence-wise balance loss weight 0.0001, MTP loss weight 0.3 (the first 10T tokens).
"""
import ml_collections

from configs.deepseek_v2 import deepseek_v2_config


def get_config() -> ml_collections.ConfigDict:
  cfg = deepseek_v2_config(
      vocab_size=129280, hidden_size=7168, num_layers=61, num_heads=128, mlp_dim=18432, q_lora_rank=1536,
      kv_lora_rank=512, num_experts=256, num_shared_experts=1, expert_dim=2048, top_k=8, first_dense_layers=3,
      scoring='sigmoid', topk_method='noaux_tc', num_groups=8, topk_groups=4, norm_topk_prob=True,
      routed_scaling_factor=2.5, yarn_mscale=1.0, yarn_mscale_all_dim=1.0, mtp_layers=1, aux_loss_weight=0.0001,
      bias_update_rate=0.001)
  cfg.model.mtp.loss_weight = 0.3
  return cfg
