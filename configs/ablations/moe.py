"""Ablation: dense MLP vs DeepSeekMoE at equal active parameters, 8 vs 16 routed experts, and how the experts are kept
balanced (DeepSeek-V3's auxiliary-loss-free correction bias vs a sequence-wise balance loss vs nothing).

  python -m dsjax.ablate configs/ablations/moe.py
  python train.py --config=configs/ablations/moe.py                 # its base run alone (moe-8_bias)

Every MoE run replaces the dense MLP (mlp_dim 704) of layers 2-4 of configs/tiny.py by one shared expert plus top-3
of E routed experts, all of expert_dim 176: (3 + 1) x 176 = 704, so a token passes through as many MLP weights as in
the dense model (plus the router's 256 x E). Layer 1 stays dense (DeepSeek's first_k_dense_replace). Attention,
positions, data order, seeds and held-out batches are those of configs/tiny.py in every run. Routing is V3's: sigmoid
scores, top-k over all experts (one group), weights renormalised to sum to 1. Each run's metrics.jsonl logs
expert_imbalance (max / mean tokens per expert, averaged over the MoE layers) next to the loss.
"""
import ml_collections

from configs import tiny
from dsjax import ablate

STEPS = 300
DENSE_MLP = 704     # configs/tiny.py's mlp_dim
TOP_K = 3
SHARED = 1
EXPERT_DIM = DENSE_MLP // (TOP_K + SHARED)  # 176: active MLP = (TOP_K + SHARED) * EXPERT_DIM = DENSE_MLP
BIAS_RATE = 0.001   # DeepSeek-V3's bias update speed (section 4.2)
AUX_WEIGHT = 0.01   # balance-loss weight of the aux-loss run (GShard / Switch's 1e-2; V3 itself uses 1e-4 with bias)


def get_config() -> ml_collections.ConfigDict:
  """The study's base: configs/tiny.py with 8 routed experts kept balanced by the correction bias, 300 steps with
  held-out evals every 50 (the moe-8_bias run)."""
  cfg = tiny.get_config()
  mo = cfg.model.moe
  mo.num_experts = 8
  mo.num_shared_experts = SHARED
  mo.expert_dim = EXPERT_DIM
  mo.top_k = TOP_K
  mo.scoring = 'sigmoid'
  mo.topk_method = 'noaux_tc'
  mo.num_groups = 1
  mo.topk_groups = 1
  mo.norm_topk_prob = True
  mo.routed_scaling_factor = 1.0
  mo.first_dense_layers = 1
  mo.aux_loss_weight = 0.0
  mo.bias_update_rate = BIAS_RATE
  cfg.train.steps = STEPS
  cfg.train.eval_every = 50
  cfg.train.log_every = 10
  return cfg


def get_study() -> ablate.Study:
  bias = {'model.moe.bias_update_rate': BIAS_RATE, 'model.moe.aux_loss_weight': 0.0}
  aux = {'model.moe.bias_update_rate': 0.0, 'model.moe.aux_loss_weight': AUX_WEIGHT}
  unbalanced = {'model.moe.bias_update_rate': 0.0, 'model.moe.aux_loss_weight': 0.0}
  return ablate.Study(
      name='moe',
      description=f'Dense SwiGLU (mlp_dim {DENSE_MLP}) vs DeepSeekMoE with top-{TOP_K} routed + {SHARED} shared '
      f'experts of {EXPERT_DIM} (the same active MLP size) at configs/tiny.py scale; 8 vs 16 routed experts; balance '
      f'by the auxiliary-loss-free correction bias (rate {BIAS_RATE}) vs the sequence-wise balance loss (weight '
      f'{AUX_WEIGHT}) vs none. Total parameters grow with the experts; active ones do not.',
      base=get_config(),
      runs=[
          ('dense', {'model.moe.num_experts': 0, 'model.moe.bias_update_rate': 0.0}),
          ('moe-8_bias', {'model.moe.num_experts': 8, **bias}),
          ('moe-16_bias', {'model.moe.num_experts': 16, **bias}),
          ('moe-8_aux', {'model.moe.num_experts': 8, **aux}),
          ('moe-8_unbalanced', {'model.moe.num_experts': 8, **unbalanced}),
      ])
