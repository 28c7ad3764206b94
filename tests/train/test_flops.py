"""FLOPs per token and MFU: hand-computed counts for the tiny config, a brute-force visible-key count, the
matmul weights against the real model's parameters, and the peak-FLOP/s table."""
import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from dsjax.model import Transformer
from dsjax.train import flops
from tests.model.helpers import init_shapes, tiny_config

# tiny_config: vocab 64, hidden 32, 2 layers, 4 heads of 8, 2 kv heads, mlp 48; window 3, 2 globals, top_k 2,
# 1 shared head.
LAYER = 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 3 * 32 * 48  # q, k, v, o, gate/up/down
HEAD = 32 * 64


def test_matmul_params_full_gqa():
  assert flops.matmul_params_per_token(tiny_config('full')) == 2 * LAYER + HEAD == 17408


def test_matmul_params_mqa_and_explicit_head_dim():
  mqa = 32 * 32 + 32 * 8 + 32 * 8 + 32 * 32 + 3 * 32 * 48
  assert flops.matmul_params_per_token(tiny_config('full', num_kv_heads=1)) == 2 * mqa + HEAD
  wide = 32 * 64 + 32 * 32 + 32 * 32 + 64 * 32 + 3 * 32 * 48  # head_dim 16: q [32, 4*16], k/v [32, 2*16]
  assert flops.matmul_params_per_token(tiny_config('full', head_dim=16)) == 2 * wide + HEAD


def test_tied_embeddings_still_pay_for_the_head():
  assert flops.matmul_params_per_token(tiny_config('full', tie_embeddings=True)) == 2 * LAYER + HEAD


def test_matmul_params_routed_adds_the_router():
  router = 32 * (4 - 1)  # [D, N - shared]
  assert flops.matmul_params_per_token(tiny_config('routed')) == 2 * (LAYER + router) + HEAD


def brute_force_visible(window, num_global, seq_len):
  """Mean visible keys by checking every (query, key) pair of one document; window None = causal."""
  total = 0
  for q in range(seq_len):
    for k in range(q + 1):
      if window is None or q - k < window or k < num_global:
        total += 1
  return total / seq_len


def attention_cfg(kind, window=3, num_global=2, sparse_mask=False):
  cfg = tiny_config('full').attention
  cfg.update(dict(kind=kind, window=window, num_global=num_global, sparse_mask=sparse_mask))
  return cfg


def test_mean_visible_keys_tiny_sparse_by_hand():
  # t = 0..7: window keys 1,2,3,3,3,3,3,3 (21); globals before the window 0,0,0,1,2,2,2,2 (9).
  assert flops.mean_visible_keys(attention_cfg('sparse'), 8) == (21 + 9) / 8


@pytest.mark.parametrize('window,num_global', [(3, 2), (1, 0), (1, 1), (4, 0), (2, 5), (16, 3), (40, 2)])
@pytest.mark.parametrize('seq_len', [1, 2, 7, 16, 33])
def test_mean_visible_keys_matches_brute_force(window, num_global, seq_len):
  want_sparse = brute_force_visible(window, num_global, seq_len)
  want_causal = brute_force_visible(None, 0, seq_len)
  kw = dict(window=window, num_global=num_global)
  assert math.isclose(flops.mean_visible_keys(attention_cfg('sparse', **kw), seq_len), want_sparse)
  assert math.isclose(flops.mean_visible_keys(attention_cfg('routed', sparse_mask=True, **kw), seq_len),
                      want_sparse)
  # full and routed without the sparse mask ignore window / num_global.
  assert math.isclose(flops.mean_visible_keys(attention_cfg('full', **kw), seq_len), want_causal)
  assert math.isclose(flops.mean_visible_keys(attention_cfg('routed', **kw), seq_len), want_causal)


def test_training_flops_full():
  # seq 8, causal: 4.5 keys per query. 3 (fwd+bwd) * 2 products * 2 flops * 2 layers * 4 heads * 8 * 4.5.
  attention = 3 * 2 * 2 * 2 * 4 * 8 * 4.5
  assert flops.training_flops_per_token(tiny_config('full'), 8) == 6 * (2 * LAYER + HEAD) + attention


def test_training_flops_routed_counts_active_heads_only():
  router = 32 * 3
  attention = 3 * 2 * 2 * 2 * (2 + 1) * 8 * 4.5  # top_k 2 + 1 shared head of 4
  want = 6 * (2 * (LAYER + router) + HEAD) + attention
  assert flops.training_flops_per_token(tiny_config('routed'), 8) == want
  sparse_attention = 3 * 2 * 2 * 2 * (2 + 1) * 8 * (30 / 8)  # window 3 + 2 globals: 30 pairs (see above)
  want = 6 * (2 * (LAYER + router) + HEAD) + sparse_attention
  assert flops.training_flops_per_token(tiny_config('routed_sparse'), 8) == want


def test_training_flops_sparse_and_xl():
  sparse_attention = 3 * 2 * 2 * 2 * 4 * 8 * (30 / 8)
  assert flops.training_flops_per_token(tiny_config('sparse'), 8) == 6 * (2 * LAYER + HEAD) + sparse_attention
  # XL adds the relative-position product, QK^T-sized: 3 products instead of 2; r_proj is not per token.
  xl_attention = 3 * 3 * 2 * 2 * 4 * 8 * 4.5
  assert flops.training_flops_per_token(tiny_config('xl'), 8) == 6 * (2 * LAYER + HEAD) + xl_attention


def parameter_sizes(cfg):
  """{'/'-joined parameter path: element count} of Transformer(cfg), from shapes only."""
  tokens = np.zeros((1, 4), np.int32)
  pos = np.arange(4, dtype=np.int32)[None]
  shapes = nn.meta.unbox(init_shapes(Transformer(cfg), tokens, pos, np.ones_like(pos)))
  return {'/'.join(str(getattr(p, 'key', p)) for p in path): math.prod(s.shape)
          for path, s in jax.tree_util.tree_leaves_with_path(shapes)}


@pytest.mark.parametrize('kind,overrides', [('full', {}), ('routed', {}), ('full', dict(tie_embeddings=True)),
                                            ('routed_sparse', dict(num_kv_heads=1, head_dim=16)), ('xl', {})])
def test_matmul_params_match_the_model(kind, overrides):
  cfg = tiny_config(kind, **overrides)
  sizes = parameter_sizes(cfg)
  assert ('lm_head/kernel' in sizes) != cfg.tie_embeddings
  skip = ('scale', 'u_bias', 'v_bias', 'r_proj/kernel')  # norms, XL biases and per-step r_proj
  if not cfg.tie_embeddings:  # tied: the embedding table is also the head's matmul weight
    skip += ('embedder/embedding',)
  total = sum(n for name, n in sizes.items() if not name.endswith(skip))
  assert flops.matmul_params_per_token(cfg) == total


@pytest.mark.parametrize('kind,want', [
    ('NVIDIA H100 80GB HBM3', 989e12),
    ('NVIDIA H100 PCIe', 756e12),
    ('NVIDIA H200', 989e12),
    ('NVIDIA A100-SXM4-80GB', 312e12),
    ('NVIDIA L4', 121e12),
    ('NVIDIA L40S', None),  # not an L4
    ('TPU v4', 275e12),
    ('TPU v5 lite', 197e12),
    ('TPU v5e', 197e12),
    ('TPU v5', 459e12),
    ('TPU v5p', 459e12),
    ('TPU v6 lite', 918e12),
    ('cpu', None),
])
def test_peak_flops_lookup(kind, want):
  assert flops.peak_flops_per_device(kind) == want


def test_peak_flops_override_wins():
  assert flops.peak_flops_per_device('cpu', override=1e12) == 1e12
  assert flops.peak_flops_per_device('NVIDIA H100 80GB HBM3', override=5e14) == 5e14


def test_mfu():
  assert flops.mfu(1000.0, 1e9, 2, 1e12) == pytest.approx(0.5)
  assert flops.mfu(1000.0, 1e9, 2, None) is None


def test_latent_attention_moe_and_mtp_count_the_active_weights():
  """MLA projections; MoE layers count the router and the top_k + shared experts, not every expert; each MTP depth
  adds eh_proj, a layer and a head. Hand count for a small V3-shaped config."""
  cfg = tiny_config('full', num_kv_heads=4)
  cfg.mla.update(dict(kv_lora_rank=8, q_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5))
  cfg.moe.update(dict(num_experts=8, num_shared_experts=1, expert_dim=16, top_k=2, first_dense_layers=1,
                      scoring='sigmoid', topk_method='noaux_tc', num_groups=4, topk_groups=2))
  cfg.mtp.num_layers = 1
  attention = 32 * 12 + 12 * 4 * 10 + 32 * (8 + 4) + 8 * 4 * (6 + 5) + 4 * 5 * 32
  dense, moe = 3 * 32 * 48, 32 * 8 + 3 * 32 * 16 * (2 + 1)
  mtp = 2 * 32 * 32 + attention + moe + HEAD
  assert flops.matmul_params_per_token(cfg) == (attention + dense) + (attention + moe) + HEAD + mtp
  # Attention products: 3 attending layers (2 + the MTP depth), 4 heads, (6 + 4) + 5 dims per head.
  visible = flops.mean_visible_keys(cfg.attention, 16)
  assert flops.attention_flops_per_token(cfg, 16) == pytest.approx(3 * 2 * 3 * 4 * 15 * visible)
