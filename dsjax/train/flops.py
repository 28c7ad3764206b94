"""Model FLOPs per training token and model FLOPs utilisation (MFU).

Convention (PaLM, Chowdhery et al. 2022, appendix B; MaxText's `calculate_tflops_training_per_device`):
training costs 6 FLOPs per matmul weight per token (2 forward, 4 backward) plus the attention score and value
products, which have no weights. Unlike PaLM's 6N + 12*L*H*Q*T, attention here counts only the (query, key)
pairs the mask keeps (causal, or window + global sinks) and only the heads a routed model activates: the work
the model needs, not what a dense reference implementation happens to compute. Rematerialisation is not
counted either (MFU, not hardware FLOPs utilisation).
"""
from __future__ import annotations

import re

import ml_collections

from dsjax import config as config_lib
from dsjax.model.attention import mask_args

# Dense (no structured sparsity) bf16 peak FLOP/s per device, from the vendors' datasheets. Keys are matched
# as whole words inside jax's `device.device_kind`, longest key first ('H100 PCIe' before 'H100').
PEAK_BF16_FLOPS: dict[str, float] = {
    'H100 PCIe': 756e12,
    'H100': 989e12,          # SXM, e.g. 'NVIDIA H100 80GB HBM3'
    'H200': 989e12,
    'A100': 312e12,
    'L4': 121e12,
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,   # v5e
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v5': 459e12,        # jax names v5p 'TPU v5'
    'TPU v6 lite': 918e12,   # v6e (Trillium)
    'TPU v6e': 918e12,
}


def _attention_matmul_params(m: ml_collections.ConfigDict) -> int:
  """Per layer: q, k, v, o projections (or latent attention's q / q_a + q_b, kv_a, kv_b, o) and the routed-attention
  router [D, N - shared]."""
  d, n = m.hidden_size, m.num_heads
  la = m.mla
  if la.kv_lora_rank:
    qk, r = la.qk_nope_head_dim + la.qk_rope_head_dim, la.kv_lora_rank
    q = d * la.q_lora_rank + la.q_lora_rank * n * qk if la.q_lora_rank else d * n * qk
    return q + d * (r + la.qk_rope_head_dim) + r * n * (la.qk_nope_head_dim + la.v_head_dim) + n * la.v_head_dim * d
  kh, h = m.num_kv_heads, config_lib.head_dim(m)
  router = d * (n - m.attention.num_shared_heads) if m.attention.kind == 'routed' else 0
  return d * n * h * 2 + d * kh * h * 2 + router


def _mlp_matmul_params(m: ml_collections.ConfigDict, moe: bool) -> int:
  """Per layer: the dense SwiGLU, or an MoE layer's router [D, E] plus the top_k routed and the shared experts a
  token runs through (the experts it is not routed to cost it nothing)."""
  d, mo = m.hidden_size, m.moe
  if not moe:
    return 3 * d * m.mlp_dim
  return d * mo.num_experts + 3 * d * mo.expert_dim * (mo.top_k + mo.num_shared_experts)


def matmul_params_per_token(model_cfg: ml_collections.ConfigDict) -> int:
  """Weights every token is multiplied by in one forward pass: the FLOP-carrying part of the parameter count.

  Per layer: the attention projections and the MLP (dense, or the active experts of an MoE layer); plus the
  vocabulary projection D*V, which a tied model still computes with the embedding matrix; plus, per
  multi-token-prediction depth, its eh_proj [2D, D], one more layer and another vocabulary projection. Not counted:
  the embedding lookup (a gather), norm scales, XL's u/v biases, and XL's r_proj, which projects the S distance
  encodings once per layer and step for the whole batch rather than once per token (per token that is under
  1/batch of q_proj's cost).
  """
  m = model_cfg
  d = m.hidden_size
  is_moe = [bool(m.moe.num_experts) and i >= m.moe.first_dense_layers for i in range(m.num_layers)]
  layers = sum(_attention_matmul_params(m) + _mlp_matmul_params(m, moe) for moe in is_moe)
  mtp = m.mtp.num_layers * (2 * d * d + _attention_matmul_params(m) + _mlp_matmul_params(m, is_moe[-1])
                            + d * m.vocab_size)
  return layers + d * m.vocab_size + mtp


def _sum_min(count: int, cap: int) -> int:
  """sum_{i=1..count} min(i, cap), for count, cap >= 0."""
  if count <= cap:
    return count * (count + 1) // 2
  return cap * (cap + 1) // 2 + (count - cap) * cap


def mean_visible_keys(attention_cfg: ml_collections.ConfigDict, seq_len: int) -> float:
  """Mean number of keys a query attends to in one document of seq_len tokens (positions 0..seq_len-1).

  Causal (t + 1 keys for query t) unless the kind uses the sparse mask (`mask_args`): then min(t + 1, window)
  keys in the window plus the global tokens before it, max(0, min(num_global, t + 1 - window)).
  """
  if seq_len <= 0:
    raise ValueError(f'seq_len must be > 0, got {seq_len}')
  window, num_global = mask_args(attention_cfg)
  if window is None:
    return (seq_len + 1) / 2
  # Query t sees globals k < min(num_global, t + 1 - window); summing over t, i = t + 1 - window runs 1..T-W.
  globals_outside = _sum_min(max(0, seq_len - window), num_global)
  return (_sum_min(seq_len, window) + globals_outside) / seq_len


def attention_flops_per_token(model_cfg: ml_collections.ConfigDict, seq_len: int) -> float:
  """Training FLOPs per token of the weight-free attention products, over visible pairs and active heads.

  Forward per layer and query: 2 FLOPs * head_dim * visible keys for each product, QK^T and PV, and for XL
  also the relative-position product (q + v) . r[distance], which is QK^T-sized; backward is twice the
  forward. Active heads are num_heads, or top_k + num_shared_heads for routed attention (the routed kernel
  skips unselected heads). Latent attention's products run over qk_nope + qk_rope and v_head_dim dimensions.
  XL memory keys are not counted.
  """
  m = model_cfg
  a = m.attention
  heads = a.top_k + a.num_shared_heads if a.kind == 'routed' else m.num_heads
  if m.mla.kv_lora_rank:  # scores over qk_nope + qk_rope dims, values of v_head_dim
    per_head = m.mla.qk_nope_head_dim + m.mla.qk_rope_head_dim + m.mla.v_head_dim
  else:
    per_head = (3 if m.positions.kind == 'xl' else 2) * config_lib.head_dim(m)
  layers = m.num_layers + m.mtp.num_layers  # each multi-token-prediction depth attends too
  forward = 2 * layers * heads * per_head * mean_visible_keys(a, seq_len)
  return 3 * forward


def training_flops_per_token(model_cfg: ml_collections.ConfigDict, seq_len: int) -> float:
  """Model FLOPs of one training step (forward + backward) per token, for rows of seq_len tokens.

  6 * matmul_params_per_token + attention_flops_per_token (see the module docstring for the convention). A row
  is treated as one full-length document: packing shorter documents makes true attention work smaller.
  """
  return 6.0 * matmul_params_per_token(model_cfg) + attention_flops_per_token(model_cfg, seq_len)


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float | None:
  """Dense bf16 peak FLOP/s of one device of `device_kind` (jax's `device.device_kind`).

  override > 0 wins (for hardware missing from PEAK_BF16_FLOPS or other dtypes); unknown kinds (e.g. 'cpu')
  give None, so MFU is not reported rather than made up.
  """
  if override > 0:
    return float(override)
  for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
    # Whole words only: 'L4' must not match 'NVIDIA L40S', nor 'TPU v5' match 'TPU v5e'.
    if re.search(rf'(?<![a-z0-9]){re.escape(key.lower())}(?![a-z0-9])', device_kind.lower()):
      return PEAK_BF16_FLOPS[key]
  return None


def mfu(tokens_per_second: float, flops_per_token: float, num_devices: int,
        peak_per_device: float | None) -> float | None:
  """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices; None when the peak is unknown."""
  if peak_per_device is None or peak_per_device <= 0 or num_devices <= 0:
    return None
  return tokens_per_second * flops_per_token / (num_devices * peak_per_device)
