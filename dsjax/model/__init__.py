"""dsjax.model: LLaMA-style decoder; full, sparse and routed attention; RoPE or Transformer-XL positions."""
from dsjax.model.attention import (Attention, RelativeBias, attend, mask_args,
                                   reference_attention)
from dsjax.model.layers import MLP, Embedder, Linear, RMSNorm, to_dtype
from dsjax.model.masks import make_attention_mask
from dsjax.model.positions import apply_rope, rope_angles, sinusoid_embedding
from dsjax.model.routing import HeadRouter, load_balance_loss, route
from dsjax.model.transformer import Block, Memory, Transformer, init_memory, uses_memory
