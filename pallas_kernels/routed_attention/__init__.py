"""Head-routed (Mixture-of-Head) attention: only the (token, head) pairs a router selects are computed."""
from pallas_kernels.routed_attention.api import count_routed_visited_blocks, routed_attention
from pallas_kernels.routed_attention.grouping import HeadGroups, gather_rows, group_by_head, scatter_rows
from pallas_kernels.routed_attention.reference import routed_attention_reference

__all__ = [
    'routed_attention',
    'routed_attention_reference',
    'count_routed_visited_blocks',
    'HeadGroups',
    'group_by_head',
    'gather_rows',
    'scatter_rows',
]
