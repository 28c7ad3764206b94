"""Which implementation runs one attention call: a pure function of static facts about the call (no JAX).

`model.attention.impl` is 'auto' (default), 'reference', 'pallas' or 'cudnn'. 'auto' picks, per call, the fastest
exact path the platform has:

  platform  call                                                               path
  cpu       any                                                                reference
  tpu       RoPE (no Transformer-XL term)                                       pallas (Mosaic kernels)
  gpu       RoPE, no KV cache, one document per row, causal or a pure window    cudnn when the dtype is
            (no global tokens), not routed, head_dim <= 128 and a multiple of 8  bf16/fp16, else pallas
  gpu       other RoPE calls: global tokens, routed heads, packed rows, decode
            (full or ring cache), fp32                                          pallas (Triton kernels)
  any       Transformer-XL relative positions / memory                         reference

'reference' and 'pallas' force one path (pallas raises for Transformer-XL, which only the reference implements);
'cudnn' forces cuDNN and raises, naming what cuDNN cannot express, for any other call. docs/kernels.md gives the
numbers behind the GPU rule. 'gpu' means an NVIDIA GPU (cuDNN); on ROCm set impl='pallas'.
"""
from __future__ import annotations

import dataclasses

from dsjax import config as config_lib

IMPLS = config_lib.ATTENTION_IMPLS
PLATFORMS = ('cpu', 'gpu', 'tpu')
MASKS = ('causal', 'window', 'window+global')
CUDNN_DTYPES = ('bfloat16', 'float16')


@dataclasses.dataclass(frozen=True)
class AttentionCall:
  """The static facts that decide the path of one attention call."""
  platform: str        # what the computation is built for: 'cpu' | 'gpu' | 'tpu'
  dtype: str           # compute dtype: 'float32' | 'bfloat16' | 'float16'
  mask: str            # 'causal' | 'window' | 'window+global' (sliding window plus global sink tokens)
  routed: bool = False   # per-token head gates (routed attention)
  packed: bool = True    # rows may hold several documents or padding (segment ids given)
  cached: bool = False   # the queries attend to a KV cache: prefill into it, decode steps, verification chunks
  relative: bool = False  # Transformer-XL relative-position term, or memory (more keys than queries)
  head_dim: int = 128

  def __post_init__(self):
    if self.platform not in PLATFORMS:
      raise ValueError(f'platform must be one of {PLATFORMS}; got {self.platform!r}')
    if self.mask not in MASKS:
      raise ValueError(f'mask must be one of {MASKS}; got {self.mask!r}')


def cudnn_limits(call: AttentionCall) -> list[str]:
  """What cuDNN's fused attention (`jax.nn.dot_product_attention(implementation='cudnn')`) cannot express in this
  call; empty when it can. It takes bf16/fp16 self-attention of one document per row with a causal or
  sliding-window mask (`local_window_size=(window - 1, 0)`)."""
  limits = []
  if call.platform != 'gpu':
    limits.append(f'it runs on GPUs only (platform {call.platform})')
  if call.relative:
    limits.append('Transformer-XL relative positions')
  if call.cached:
    limits.append('attention to a KV cache (decode steps, prefill into a cache)')
  if call.routed:
    limits.append('routed heads')
  if call.mask == 'window+global':
    limits.append('global (sink) tokens')
  if call.packed:
    limits.append('packed rows (several documents or padding per row: segment ids)')
  if call.dtype not in CUDNN_DTYPES:
    limits.append(f'{call.dtype} (it takes bfloat16 or float16)')
  if call.head_dim > 128 or call.head_dim % 8:
    limits.append(f'head_dim {call.head_dim} (it takes multiples of 8 up to 128)')
  return limits


def choose(impl: str, call: AttentionCall) -> str:
  """The path for `call` under `model.attention.impl=impl`: 'reference', 'pallas' or 'cudnn'.

  Raises ValueError (naming model.attention.impl) when a forced path cannot run the call.
  """
  if impl not in IMPLS:
    raise ValueError(f'model.attention.impl: unknown {impl!r}, expected one of {", ".join(IMPLS)}')
  if impl == 'reference':
    return 'reference'
  if impl == 'pallas':
    if call.relative:
      raise ValueError("model.attention.impl='pallas': the kernels take RoPE attention only (no Transformer-XL "
                       'relative positions or memory); use impl=auto or reference')
    return 'pallas'
  if impl == 'cudnn':
    limits = cudnn_limits(call)
    if limits:
      raise ValueError(f"model.attention.impl='cudnn' cannot express this call: {'; '.join(limits)}; use impl=auto")
    return 'cudnn'
  if call.relative or call.platform == 'cpu':
    return 'reference'
  if call.platform == 'gpu' and not cudnn_limits(call):
    return 'cudnn'
  return 'pallas'
