"""DeepSeek-V3 multi-token-prediction weights through the converter: a dsjax V3-style model with an MTP depth exports
its MTP layer as the published checkpoint stores it (model.layers.<L>.*: enorm, hnorm, eh_proj, shared_head.norm,
a decoder layer, copies of the embedding and head), transformers loads the export (it skips the MTP layer) with the
same main-model logits, and import -> export -> import is bit-identical, MTP included."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from dsjax import checkpoint
from dsjax import config as config_lib
from dsjax.convert import hf
from dsjax.model import Transformer
from tests.convert.test_hf import dsjax_logits, hf_logits
from tests.lazy import transformers
from tests.model.helpers import init_shapes, random_like

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def v3_checkpoint(directory):
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny_moe.py'))
  m = cfg.model
  m.update(dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, mlp_dim=48))
  m.mla.update(dict(kv_lora_rank=8, q_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5))
  m.moe.update(dict(expert_dim=16))
  model = Transformer(m)
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = random_like(init_shapes(model, tokens, jnp.arange(8)[None]), seed=4)
  checkpoint.save_model(str(directory), cfg, params)
  return cfg, params


def test_mtp_layer_exports_as_published_and_round_trips(tmp_path):
  cfg, params = v3_checkpoint(tmp_path / 'ckpt')
  hf.export_hf(str(tmp_path / 'ckpt'), str(tmp_path / 'exported'))
  config = json.loads((tmp_path / 'exported' / 'config.json').read_text())
  assert config['model_type'] == 'deepseek_v3' and config['num_nextn_predict_layers'] == 1
  with safe_open(str(tmp_path / 'exported' / 'model.safetensors'), 'np') as f:
    names = set(f.keys())
    mtp = 'model.layers.2.'
    for name in ('enorm.weight', 'hnorm.weight', 'eh_proj.weight', 'shared_head.norm.weight', 'embed_tokens.weight',
                 'shared_head.head.weight', 'self_attn.kv_b_proj.weight', 'mlp.experts.7.down_proj.weight',
                 'mlp.gate.e_score_correction_bias', 'mlp.shared_experts.up_proj.weight'):
      assert mtp + name in names, name
    assert f.get_tensor(mtp + 'eh_proj.weight').shape == (32, 64)  # [D, 2D]: embedding half first
    np.testing.assert_array_equal(f.get_tensor(mtp + 'shared_head.head.weight'), f.get_tensor('lm_head.weight'))
  # transformers builds DeepseekV3 without the MTP layer and skips its weights: the main model's logits agree.
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'exported')).eval()
  tokens = np.random.default_rng(0).integers(0, 64, (2, 12))
  cfg.model.dtype = 'float32'
  np.testing.assert_allclose(dsjax_logits(cfg, params, tokens), hf_logits(reloaded, tokens), atol=1e-4, rtol=1e-4)
  again_cfg = hf.import_hf(str(tmp_path / 'exported'), str(tmp_path / 'again'))
  assert again_cfg.model.mtp.num_layers == 1
  again = checkpoint.load_params(str(tmp_path / 'again'), again_cfg.model)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_checkpoint_without_mtp_weights_imports_without_mtp(tmp_path, capsys):
  """transformers' save_pretrained drops the MTP layer: the import says so and builds the model without it."""
  hf_cfg = transformers.DeepseekV3Config(
      vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
      n_group=2, topk_group=1, first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=12, qk_rope_head_dim=4,
      qk_nope_head_dim=6, v_head_dim=5, max_position_embeddings=64, num_nextn_predict_layers=1)
  transformers.DeepseekV3ForCausalLM(hf_cfg).save_pretrained(tmp_path / 'hf')
  cfg = hf.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'ckpt'))
  assert cfg.model.mtp.num_layers == 0
  assert 'multi-token-prediction' in capsys.readouterr().err
