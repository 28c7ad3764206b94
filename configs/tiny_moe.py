"""Tiny DeepSeek-V3-shaped model for CPU: latent attention, DeepSeekMoE (a dense first layer, then 8 routed experts
of which 2 per token plus a shared one, sigmoid group-limited routing with the auxiliary-loss-free bias) and one
multi-token-prediction depth, byte-level. `python train.py --config=configs/tiny_moe.py` trains it on the stdlib
corpus; every feature of configs/tiny.py (sharding, resume, LoRA, quantization, sampling, serving) applies."""
import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
  cfg = tiny.get_config()
  m = cfg.model
  m.num_kv_heads = m.num_heads  # latent attention: every head has its own key and value
  la = m.mla
  la.kv_lora_rank = 64
  la.q_lora_rank = 96
  la.qk_nope_head_dim = 32
  la.qk_rope_head_dim = 16
  la.v_head_dim = 32
  mo = m.moe
  mo.num_experts = 8
  mo.num_shared_experts = 1
  mo.expert_dim = 176          # a quarter of the dense mlp_dim: 2 routed + 1 shared ~ 3/4 of its compute
  mo.top_k = 2
  mo.scoring = 'sigmoid'
  mo.topk_method = 'noaux_tc'
  mo.num_groups = 4
  mo.topk_groups = 2
  mo.norm_topk_prob = True
  mo.routed_scaling_factor = 1.0
  mo.first_dense_layers = 1
  mo.aux_loss_weight = 0.0001
  mo.bias_update_rate = 0.001
  m.mtp.num_layers = 1
  m.mtp.loss_weight = 0.3
  cfg.lora.targets = ('q_b_proj', 'kv_b_proj')  # LoRA's usual q/v pair, in latent attention
  return cfg
