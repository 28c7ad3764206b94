"""Block-sparse flash attention (causal, packed segments, sliding window, global tokens)."""
from pallas_kernels.sparse_attention.api import sparse_attention, sparse_attention_with_lse
from pallas_kernels.sparse_attention.decode import (
    default_decode_tiles,
    default_num_splits,
    merge_attention,
    sparse_decode_attention,
)
from pallas_kernels.sparse_attention.reference import sparse_attention_mask, sparse_attention_reference
from pallas_kernels.sparse_attention.schedule import (
    count_visited_blocks,
    make_schedule,
    transpose_schedule,
)

__all__ = [
    'sparse_attention',
    'sparse_attention_with_lse',
    'sparse_decode_attention',
    'merge_attention',
    'default_num_splits',
    'default_decode_tiles',
    'sparse_attention_reference',
    'sparse_attention_mask',
    'make_schedule',
    'transpose_schedule',
    'count_visited_blocks',
]
