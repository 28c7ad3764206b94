"""The Hugging Face architectures dsjax converts, and how each maps onto dsjax's config and params.

  LlamaForCausalLM        DeepSeek-Coder v1, DeepSeek-R1-Distill-Llama
  Qwen2ForCausalLM        DeepSeek-R1-Distill-Qwen (q/k/v biases)
  DeepseekV2ForCausalLM   DeepSeek-V2(-Lite), DeepSeek-Coder-V2(-Lite): latent attention + DeepSeekMoE (softmax routing)
  DeepseekV3ForCausalLM   DeepSeek-V3, R1: latent attention + DeepSeekMoE (sigmoid, group-limited, correction bias)

`model_config_from_hf` reads a config.json into a dsjax `model` section, `hf_config_from_model` writes one back, and
`tensor_maps` lists every parameter with the HF tensor(s) it comes from. The mappings are hand-written: they are the
contract between two parameter layouts, which no library knows.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import ml_collections
import numpy as np

from dsjax import config as config_lib
from dsjax.model import layout
from dsjax.model.transformer import MTP_PREFIX, moe_layers

ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM', 'deepseek_v2': 'DeepseekV2ForCausalLM',
                 'deepseek_v3': 'DeepseekV3ForCausalLM'}
_YARN_FIELDS = {'original_max_position_embeddings': 'yarn_original_max_positions', 'beta_fast': 'yarn_beta_fast',
                'beta_slow': 'yarn_beta_slow', 'mscale': 'yarn_mscale', 'mscale_all_dim': 'yarn_mscale_all_dim'}


class ConversionError(ValueError):
  """A checkpoint that cannot be converted; the message names the file, field or tensor."""


# ------------------------------------------------------------------------------------------------ configs

def _rope(hf: dict[str, Any], positions: ml_collections.ConfigDict) -> None:
  """Sets positions.rope_* from a transformers 4 (`rope_theta`, `rope_scaling`) or 5 (`rope_parameters`) config."""
  params = hf.get('rope_parameters') or {}
  scaling = hf.get('rope_scaling') or params
  positions.rope_theta = float(hf.get('rope_theta') or params.get('rope_theta') or 10000.0)
  kind = scaling.get('rope_type', scaling.get('type', 'default')) if scaling else 'default'
  positions.rope_scaling, positions.rope_scaling_factor = 'linear', 1.0
  if kind == 'default':
    return
  if kind not in ('linear', 'yarn'):
    raise ConversionError(f"config.json: rope_scaling type {kind!r} is not supported (dsjax implements 'linear' "
                          "position interpolation, as DeepSeek-Coder uses, and 'yarn', as DeepSeek-V2/V3 use)")
  factor = scaling.get('factor')
  original = scaling.get('original_max_position_embeddings')
  if factor is None and kind == 'yarn' and original and hf.get('max_position_embeddings'):
    factor = hf['max_position_embeddings'] / original  # as transformers derives it
  if factor is None:
    raise ConversionError(f'config.json: rope_scaling {kind!r} without a factor')
  positions.rope_scaling, positions.rope_scaling_factor = kind, float(factor)
  if kind == 'yarn':
    for field in ('truncate', 'attention_factor'):
      if scaling.get(field) not in (None, True if field == 'truncate' else None):
        raise ConversionError(f'config.json: rope_scaling {field}={scaling[field]!r} is not supported')
    positions.yarn_original_max_positions = int(original or hf.get('max_position_embeddings', 4096))
    # transformers' defaults for absent fields (mscale 0 = unset), not the base config's values
    defaults = {'beta_fast': 32.0, 'beta_slow': 1.0, 'mscale': 0.0, 'mscale_all_dim': 0.0}
    for source, default in defaults.items():
      value = scaling.get(source)
      positions[_YARN_FIELDS[source]] = float(default if value is None else value)


def model_config_from_hf(hf: dict[str, Any], base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The dsjax `model` section for a HF config.json (dict) of a supported architecture, starting from `base`."""
  model_type = hf.get('model_type')
  architectures = hf.get('architectures') or []
  if model_type not in ARCHITECTURES or not set(architectures) <= {ARCHITECTURES[model_type]}:
    raise ConversionError(f'config.json: model_type={model_type!r}, architectures={architectures} is not supported '
                          f'(supported: {", ".join(f"{v} ({k})" for k, v in ARCHITECTURES.items())})')
  for field, wanted in (('hidden_act', 'silu'), ('attention_bias', False), ('mlp_bias', False),
                        ('pretraining_tp', 1), ('use_sliding_window', False)):
    if field in hf and hf[field] not in (wanted, None):
      raise ConversionError(f'config.json: {field}={hf[field]!r} is not supported (dsjax needs {wanted!r})')
  for field in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads'):
    if field not in hf:
      raise ConversionError(f'config.json: required field {field!r} is missing')
  m = ml_collections.ConfigDict(base.to_dict())
  heads = int(hf['num_attention_heads'])
  head_dim = int(hf.get('head_dim') or hf['hidden_size'] // heads)
  m.update(dict(
      vocab_size=int(hf['vocab_size']), hidden_size=int(hf['hidden_size']), mlp_dim=int(hf['intermediate_size']),
      num_layers=int(hf['num_hidden_layers']), num_heads=heads,
      num_kv_heads=int(hf.get('num_key_value_heads') or heads),
      head_dim=0 if head_dim * heads == hf['hidden_size'] else head_dim,
      norm_eps=float(hf.get('rms_norm_eps', 1e-6)), max_positions=int(hf.get('max_position_embeddings', 4096)),
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)), qkv_bias=model_type == 'qwen2'))
  m.positions.update(dict(kind='rope', mem_len=0))
  _rope(hf, m.positions)
  m.attention.kind = 'full'
  m.mla.update(dict(kv_lora_rank=0, q_lora_rank=0))
  m.moe.num_experts = 0
  m.mtp.num_layers = 0
  if model_type in ('deepseek_v2', 'deepseek_v3'):
    _deepseek(hf, m, v3=model_type == 'deepseek_v3')
    if model_type == 'deepseek_v3':  # import_hf keeps them only if the checkpoint holds their weights
      m.mtp.num_layers = int(hf.get('num_nextn_predict_layers') or 0)
  try:
    config_lib.validate_model(m)
  except config_lib.ConfigError as e:
    raise ConversionError(f'config.json gives an impossible model: {e}') from e
  return m


def _deepseek(hf: dict[str, Any], m: ml_collections.ConfigDict, v3: bool) -> None:
  if v3 and hf.get('rope_interleave', True) is False:
    raise ConversionError('config.json: rope_interleave=false is not supported (dsjax reorders the interleaved RoPE '
                          'dimensions of DeepSeek checkpoints on import)')
  m.head_dim = 0
  m.num_kv_heads = m.num_heads  # latent attention: every head has its own key and value
  m.mla.update(dict(kv_lora_rank=int(hf['kv_lora_rank']), q_lora_rank=int(hf.get('q_lora_rank') or 0),
                    qk_nope_head_dim=int(hf['qk_nope_head_dim']), qk_rope_head_dim=int(hf['qk_rope_head_dim']),
                    v_head_dim=int(hf['v_head_dim'])))
  if hf.get('n_routed_experts') and int(hf.get('first_k_dense_replace') or 0) < m.num_layers:
    missing = [f for f in ('moe_intermediate_size', 'num_experts_per_tok') if not hf.get(f)]
    if missing:
      raise ConversionError(f'config.json: n_routed_experts is set but {", ".join(missing)} is missing')
    freq = int(hf.get('moe_layer_freq') or 1)
    if freq != 1:
      raise ConversionError(f'config.json: moe_layer_freq={freq} is not supported (dsjax makes every layer after '
                            'first_k_dense_replace MoE, as every published DeepSeek-V2/V3 model does)')
    m.moe.update(dict(
        num_experts=int(hf['n_routed_experts']), num_shared_experts=int(hf.get('n_shared_experts') or 0),
        expert_dim=int(hf['moe_intermediate_size']), top_k=int(hf['num_experts_per_tok']),
        num_groups=int(hf.get('n_group') or 1), topk_groups=int(hf.get('topk_group') or 1),
        norm_topk_prob=bool(hf.get('norm_topk_prob', False)),
        routed_scaling_factor=float(hf.get('routed_scaling_factor') or 1.0),
        first_dense_layers=int(hf.get('first_k_dense_replace') or 0), layer_freq=1,
        aux_loss_weight=float(hf.get('aux_loss_alpha') or 0.0) if hf.get('seq_aux', True) else 0.0))
    if v3:  # transformers' DeepseekV3 always routes by sigmoid scores, group-limited, with the correction bias
      m.moe.update(dict(scoring='sigmoid', topk_method='noaux_tc'))
    else:
      if m.moe.norm_topk_prob:
        raise ConversionError("config.json: norm_topk_prob=true is not supported for DeepseekV2 (transformers' V2 "
                              "router never renormalises the top-k weights, so the checkpoint's meaning is ambiguous)")
      method = hf.get('topk_method') or 'greedy'
      if method not in ('greedy', 'group_limited_greedy'):
        raise ConversionError(f'config.json: topk_method={method!r} is not supported for DeepseekV2 (greedy, '
                              'group_limited_greedy)')
      if hf.get('scoring_func', 'softmax') != 'softmax':
        raise ConversionError(f'config.json: scoring_func={hf["scoring_func"]!r}: DeepseekV2 scores by softmax')
      m.moe.update(dict(scoring='softmax', topk_method=method))


def architecture(m: ml_collections.ConfigDict) -> str:
  """The HF model_type a dsjax model section exports to."""
  if m.mla.kv_lora_rank or m.moe.num_experts:
    return 'deepseek_v3' if m.moe.scoring == 'sigmoid' else 'deepseek_v2'
  return 'qwen2' if m.qkv_bias else 'llama'


def _hf_rope(m: ml_collections.ConfigDict) -> tuple[dict[str, Any] | None, dict[str, Any]]:
  p = m.positions
  factor = float(p.rope_scaling_factor)
  scaling = None
  if p.rope_scaling == 'yarn':
    scaling = {'type': 'yarn', 'rope_type': 'yarn', 'factor': factor,
               'original_max_position_embeddings': int(p.yarn_original_max_positions),
               **{source: float(p[field]) for source, field in _YARN_FIELDS.items()
                  if source != 'original_max_position_embeddings'}}
  elif factor != 1.0:
    scaling = {'type': 'linear', 'rope_type': 'linear', 'factor': factor}
  parameters = {'rope_type': 'default', 'rope_theta': float(p.rope_theta)}
  if scaling:
    parameters.update({k: v for k, v in scaling.items() if k != 'type'})
  return scaling, parameters


def hf_config_from_model(m: ml_collections.ConfigDict, *, dtype: str, bos_token_id: int | None,
                         eos_token_id: int | None, pad_token_id: int | None) -> dict[str, Any]:
  """A config.json dict (architecture from `architecture(m)`) for a dsjax `model` section."""
  if m.positions.kind != 'rope' or m.attention.kind != 'full':
    raise ConversionError(f'only full attention with RoPE exports to Hugging Face; this model has '
                          f'model.attention.kind={m.attention.kind!r}, model.positions.kind={m.positions.kind!r}')
  model_type = architecture(m)
  if model_type == 'deepseek_v2' and m.moe.num_experts and m.moe.norm_topk_prob:
    raise ConversionError('model.moe.norm_topk_prob=True with softmax routing has no DeepseekV2 equivalent in '
                          'transformers (its V2 router never renormalises)')
  scaling, parameters = _hf_rope(m)
  hf = {
      'architectures': [ARCHITECTURES[model_type]], 'model_type': model_type, 'vocab_size': m.vocab_size,
      'hidden_size': m.hidden_size, 'intermediate_size': m.mlp_dim, 'num_hidden_layers': m.num_layers,
      'num_attention_heads': m.num_heads, 'num_key_value_heads': m.num_kv_heads, 'hidden_act': 'silu',
      'rms_norm_eps': m.norm_eps, 'max_position_embeddings': m.max_positions,
      'tie_word_embeddings': bool(m.tie_embeddings), 'attention_bias': False, 'mlp_bias': False,
      'attention_dropout': 0.0, 'initializer_range': m.init_std, 'rope_theta': float(m.positions.rope_theta),
      'rope_scaling': scaling, 'rope_parameters': parameters, 'bos_token_id': bos_token_id,
      'eos_token_id': eos_token_id, 'pad_token_id': pad_token_id, 'torch_dtype': dtype, 'dtype': dtype,
      'use_cache': True,
  }
  if model_type in ('llama', 'qwen2'):
    hf['head_dim'] = config_lib.head_dim(m)
  if model_type == 'qwen2':
    hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.num_layers)
  if model_type.startswith('deepseek'):
    la, mo = m.mla, m.moe
    hf.update(kv_lora_rank=la.kv_lora_rank, q_lora_rank=la.q_lora_rank or None, qk_nope_head_dim=la.qk_nope_head_dim,
              qk_rope_head_dim=la.qk_rope_head_dim, v_head_dim=la.v_head_dim, head_dim=la.qk_rope_head_dim,
              qk_head_dim=la.qk_nope_head_dim + la.qk_rope_head_dim, rope_interleave=True)
    if mo.num_experts:
      hf.update(n_routed_experts=mo.num_experts, n_shared_experts=mo.num_shared_experts,
                moe_intermediate_size=mo.expert_dim, num_experts_per_tok=mo.top_k, n_group=mo.num_groups,
                topk_group=mo.topk_groups, norm_topk_prob=bool(mo.norm_topk_prob),
                routed_scaling_factor=float(mo.routed_scaling_factor), first_k_dense_replace=mo.first_dense_layers,
                moe_layer_freq=1, topk_method=mo.topk_method,
                scoring_func=mo.scoring, aux_loss_alpha=float(mo.aux_loss_weight), seq_aux=True)
    else:  # a latent-attention model without experts: every layer keeps the dense MLP
      hf.update(n_routed_experts=None, first_k_dense_replace=m.num_layers)
    if model_type == 'deepseek_v3':
      hf['num_nextn_predict_layers'] = m.mtp.num_layers
  return hf


# ------------------------------------------------------------------------------------------------ tensor map

@dataclasses.dataclass(frozen=True)
class TensorMap:
  """One dsjax parameter and the HF tensor(s) it comes from. `hf_name` has `{i}` for per-layer tensors (stacked by
  dsjax along a leading axis over `layers`, the model's layer indices of that stack) and `{e}` for per-expert ones
  (stacked next, over `experts`)."""
  path: tuple[str, ...]
  hf_name: str
  to_dsjax: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]
  layers: tuple[int, ...] = ()
  experts: int = 0

  @property
  def per_layer(self) -> bool:
    return '{i}' in self.hf_name

  def names(self) -> list[str]:
    """The HF tensor names, in the order of the stacked dsjax parameter."""
    return [self.hf_name.format(i=i, e=e) for i in (self.layers if self.per_layer else [None])
            for e in (range(self.experts) if self.experts else [None])]

  @property
  def lead(self) -> tuple[int, ...]:
    """The stacked axes in front of each tensor's dsjax shape: ([layers][, experts])."""
    return ((len(self.layers),) if self.per_layer else ()) + ((self.experts,) if self.experts else ())


def _interleaved_to_half(size: int) -> np.ndarray:
  """RoPE dims: DeepSeek checkpoints rotate interleaved pairs (x0, x1), (x2, x3), ...; dsjax rotates dim i with
  dim i + size/2. Reordering the rotated outputs of q and k the same way leaves every score unchanged."""
  return np.concatenate([np.arange(0, size, 2), np.arange(1, size, 2)])


def tensor_maps(m: ml_collections.ConfigDict) -> list[TensorMap]:
  """The full mapping for a model section. HF stores Linear weights as [out, in]; dsjax kernels are [in, ...out].
  Multi-token-prediction depths are the layers after the last decoder layer, as DeepSeek-V3's checkpoint stores
  them (`model.layers.61.*`: enorm, hnorm, eh_proj, shared_head.norm, a decoder layer, and copies of the embedding
  and the head, written on export and checked against the main ones on import)."""
  same = lambda x: x
  transpose = lambda x: x.T
  maps = [TensorMap(('embedder', 'embedding'), 'model.embed_tokens.weight', same, same)]
  for stack, start, stop, moe in layout.layer_groups(moe_layers(m)):
    def per_layer(path, hf_name, to_dsjax, to_hf, experts=0, stack=stack, layers=tuple(range(start, stop))):
      return TensorMap((stack, *path), 'model.layers.{i}.' + hf_name, to_dsjax, to_hf, layers, experts)
    maps += _decoder_layer_maps(m, per_layer, moe)
  maps.append(TensorMap(('final_norm', 'scale'), 'model.norm.weight', same, same))
  if not m.tie_embeddings:
    maps.append(TensorMap(('lm_head', 'kernel'), 'lm_head.weight', transpose, transpose))
  for depth in range(m.mtp.num_layers):
    prefix, module = f'model.layers.{m.num_layers + depth}.', f'{MTP_PREFIX}{depth}'

    def in_depth(path, hf_name, to_dsjax, to_hf, experts=0, prefix=prefix, module=module):
      return TensorMap((module, 'block', *path), prefix + hf_name, to_dsjax, to_hf, (), experts)
    maps += [TensorMap((module, 'enorm', 'scale'), prefix + 'enorm.weight', same, same),
             TensorMap((module, 'hnorm', 'scale'), prefix + 'hnorm.weight', same, same),
             TensorMap((module, 'eh_proj', 'kernel'), prefix + 'eh_proj.weight', transpose, transpose),
             TensorMap((f'{module}_norm', 'scale'), prefix + 'shared_head.norm.weight', same, same),
             *_decoder_layer_maps(m, in_depth, moe_layers(m)[-1])]
  return maps


def mtp_shared_copies(m: ml_collections.ConfigDict) -> dict[str, str]:
  """HF names of the MTP layers' copies of shared tensors -> the main tensor they copy."""
  copies = {}
  for depth in range(m.mtp.num_layers):
    prefix = f'model.layers.{m.num_layers + depth}.'
    copies[prefix + 'embed_tokens.weight'] = 'model.embed_tokens.weight'
    copies[prefix + 'shared_head.head.weight'] = 'model.embed_tokens.weight' if m.tie_embeddings else 'lm_head.weight'
  return copies


def _decoder_layer_maps(m: ml_collections.ConfigDict, per_layer, moe: bool) -> list[TensorMap]:
  """One decoder layer's maps (norms, attention, dense MLP or MoE), placed by `per_layer(path, hf_name, ...)`."""
  d, n, k, h = m.hidden_size, m.num_heads, m.num_kv_heads, config_lib.head_dim(m)
  same = lambda x: x
  transpose = lambda x: x.T
  maps = [per_layer(('attn_norm', 'scale'), 'input_layernorm.weight', same, same),
          per_layer(('mlp_norm', 'scale'), 'post_attention_layernorm.weight', same, same)]
  if m.mla.kv_lora_rank:
    maps += _latent_attention_maps(m, per_layer)
  else:
    heads_in = lambda heads: (lambda x: x.T.reshape(d, heads, h), lambda x: x.reshape(d, heads * h).T)
    maps += [per_layer(('attention', 'q_proj', 'kernel'), 'self_attn.q_proj.weight', *heads_in(n)),
             per_layer(('attention', 'k_proj', 'kernel'), 'self_attn.k_proj.weight', *heads_in(k)),
             per_layer(('attention', 'v_proj', 'kernel'), 'self_attn.v_proj.weight', *heads_in(k)),
             per_layer(('attention', 'o_proj', 'kernel'), 'self_attn.o_proj.weight',
                       lambda x: x.T.reshape(n, h, d), lambda x: x.reshape(n * h, d).T)]
    if m.qkv_bias:
      maps += [per_layer(('attention', f'{name}_proj', 'bias'), f'self_attn.{name}_proj.bias',
                         lambda x, heads=heads: x.reshape(heads, h), lambda x: x.reshape(-1))
               for name, heads in (('q', n), ('k', k), ('v', k))]
  if moe:
    maps += _moe_maps(m, per_layer)
  else:
    maps += [per_layer(('mlp', f'{name}_proj', 'kernel'), f'mlp.{name}_proj.weight', transpose, transpose)
             for name in ('gate', 'up', 'down')]
  return maps


def _latent_attention_maps(m: ml_collections.ConfigDict, per_layer) -> list[TensorMap]:
  d, n, la = m.hidden_size, m.num_heads, m.mla
  hn, hr, hv, r = la.qk_nope_head_dim, la.qk_rope_head_dim, la.v_head_dim, la.kv_lora_rank
  order = _interleaved_to_half(hr)
  inverse = np.argsort(order)
  same = lambda x: x
  transpose = lambda x: x.T

  def rope_last(x: np.ndarray, perm: np.ndarray) -> np.ndarray:  # reorder the last hr entries of the last axis
    return np.concatenate([x[..., :-hr], x[..., -hr:][..., perm]], axis=-1)

  def queries(rows: int) -> tuple[Callable, Callable]:  # HF [N * (hn + hr), rows] <-> dsjax [rows, N, hn + hr]
    return (lambda x: rope_last(x.T.reshape(rows, n, hn + hr), order),
            lambda x: rope_last(x, inverse).reshape(rows, n * (hn + hr)).T)

  maps = []
  if la.q_lora_rank:
    maps += [per_layer(('attention', 'q_a_proj', 'kernel'), 'self_attn.q_a_proj.weight', transpose, transpose),
             per_layer(('attention', 'q_a_layernorm', 'scale'), 'self_attn.q_a_layernorm.weight', same, same),
             per_layer(('attention', 'q_b_proj', 'kernel'), 'self_attn.q_b_proj.weight', *queries(la.q_lora_rank))]
  else:
    maps.append(per_layer(('attention', 'q_proj', 'kernel'), 'self_attn.q_proj.weight', *queries(d)))
  maps += [
      per_layer(('attention', 'kv_a_proj_with_mqa', 'kernel'), 'self_attn.kv_a_proj_with_mqa.weight',
                lambda x: rope_last(x.T, order), lambda x: rope_last(x, inverse).T),
      per_layer(('attention', 'kv_a_layernorm', 'scale'), 'self_attn.kv_a_layernorm.weight', same, same),
      per_layer(('attention', 'kv_b_proj', 'kernel'), 'self_attn.kv_b_proj.weight',
                lambda x: x.T.reshape(r, n, hn + hv), lambda x: x.reshape(r, n * (hn + hv)).T),
      per_layer(('attention', 'o_proj', 'kernel'), 'self_attn.o_proj.weight',
                lambda x: x.T.reshape(n, hv, d), lambda x: x.reshape(n * hv, d).T)]
  return maps


def _moe_maps(m: ml_collections.ConfigDict, per_layer) -> list[TensorMap]:
  mo = m.moe
  same = lambda x: x
  transpose = lambda x: x.T
  maps = [per_layer(('mlp', 'gate', 'kernel'), 'mlp.gate.weight', transpose, transpose)]
  if mo.topk_method == 'noaux_tc':
    maps.append(per_layer(('mlp', 'gate', 'e_score_correction_bias'), 'mlp.gate.e_score_correction_bias', same, same))
  maps += [per_layer(('mlp', 'experts', f'{name}_proj'), f'mlp.experts.{{e}}.{name}_proj.weight', transpose,
                     transpose, experts=mo.num_experts) for name in ('gate', 'up', 'down')]
  if mo.num_shared_experts:
    maps += [per_layer(('mlp', 'shared_experts', f'{name}_proj', 'kernel'), f'mlp.shared_experts.{name}_proj.weight',
                       transpose, transpose) for name in ('gate', 'up', 'down')]
  return maps


def hf_tensor_names(m: ml_collections.ConfigDict) -> list[str]:
  """Every HF tensor name the model has: those of `tensor_maps` in order, then the MTP layers' shared copies."""
  return [name for t in tensor_maps(m) for name in t.names()] + list(mtp_shared_copies(m))
