"""The DeepSeek-V2/V3 architecture family (multi-head latent attention + DeepSeekMoE), shared by the presets
deepseek_coder_v2_lite.py and deepseek_v3.py.

What every published DeepSeek-V2/V3 checkpoint's Hugging Face config.json has in common: SwiGLU MLPs and experts,
no biases (attention_bias false), untied embeddings, RMSNorm eps 1e-6, RoPE theta 10000 on the 64-dim decoupled
key, YaRN scaling (factor 40 from 4096 original positions, beta_fast 32, beta_slow 1) to 163840 positions,
qk_nope_head_dim 128, v_head_dim 128, and every layer after the first `first_k_dense_replace` is MoE
(moe_layer_freq 1). num_key_value_heads equals num_attention_heads (MLA has no grouped KV heads).

config.json field -> dsjax field: intermediate_size -> model.mlp_dim (the dense layers), first_k_dense_replace ->
moe.first_dense_layers, n_routed_experts -> moe.num_experts, n_shared_experts -> moe.num_shared_experts,
moe_intermediate_size -> moe.expert_dim, num_experts_per_tok -> moe.top_k, n_group / topk_group ->
moe.num_groups / moe.topk_groups, topk_method -> moe.topk_method, scoring_func -> moe.scoring,
num_nextn_predict_layers -> mtp.num_layers, q_lora_rank null -> mla.q_lora_rank 0, rope_scaling.factor ->
positions.rope_scaling_factor, rope_scaling.mscale / mscale_all_dim -> positions.yarn_mscale / yarn_mscale_all_dim.
"""
import ml_collections

from configs import base


def deepseek_v2_config(*, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, mlp_dim: int,
                       q_lora_rank: int, kv_lora_rank: int, num_experts: int, num_shared_experts: int,
                       expert_dim: int, top_k: int, first_dense_layers: int, scoring: str, topk_method: str,
                       num_groups: int, topk_groups: int, norm_topk_prob: bool, routed_scaling_factor: float,
                       yarn_mscale: float, yarn_mscale_all_dim: float, mtp_layers: int = 0,
                       aux_loss_weight: float = 0.0, bias_update_rate: float = 0.0,
                       seq_len: int = 4096) -> ml_collections.ConfigDict:
  """The base config with a DeepSeek-V2/V3-architecture model of the given size (arguments: see the module doc)."""
  cfg = base.get_config()
  m = cfg.model
  m.update(dict(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                num_kv_heads=num_heads, head_dim=0, mlp_dim=mlp_dim, norm_eps=1e-6, max_positions=163840,
                tie_embeddings=False, qkv_bias=False))
  m.positions.update(dict(kind='rope', rope_theta=10000.0, rope_scaling='yarn', rope_scaling_factor=40.0,
                          yarn_original_max_positions=4096, yarn_beta_fast=32.0, yarn_beta_slow=1.0,
                          yarn_mscale=yarn_mscale, yarn_mscale_all_dim=yarn_mscale_all_dim))
  m.attention.kind = 'full'
  m.mla.update(dict(kv_lora_rank=kv_lora_rank, q_lora_rank=q_lora_rank, qk_nope_head_dim=128, qk_rope_head_dim=64,
                    v_head_dim=128))
  m.moe.update(dict(num_experts=num_experts, num_shared_experts=num_shared_experts, expert_dim=expert_dim,
                    top_k=top_k, scoring=scoring, topk_method=topk_method, num_groups=num_groups,
                    topk_groups=topk_groups, norm_topk_prob=norm_topk_prob,
                    routed_scaling_factor=routed_scaling_factor, first_dense_layers=first_dense_layers, layer_freq=1,
                    aux_loss_weight=aux_loss_weight, bias_update_rate=bias_update_rate))
  m.mtp.num_layers = mtp_layers
  # LoRA's usual q/v pair, in latent attention: the query and the key/value up-projections.
  cfg.lora.targets = ('q_b_proj' if q_lora_rank else 'q_proj', 'kv_b_proj')
  # Pretraining ran at 4096 tokens (YaRN's original context); the 128K context comes from the long-context stage.
  cfg.data.seq_len = seq_len
  return cfg


def get_config() -> ml_collections.ConfigDict:
  """DeepSeek-Coder-V2-Lite (also in deepseek_coder_v2_lite.py), so this file works as a --config too."""
  from configs import deepseek_coder_v2_lite  # pylint: disable=g-import-not-at-top  (it imports this module)
  return deepseek_coder_v2_lite.get_config()
