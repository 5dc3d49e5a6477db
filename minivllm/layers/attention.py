import torch
from torch import nn

from kernels.paged_attention import paged_attention, store_kvcache
from minivllm.context import get_context


class Attention(nn.Module):
    """Stores this step's K/V in the paged cache, then attends over the cache. Without k and v
    (fusion="full") the qkv kernel has already stored them.

    ``k_cache``/``v_cache`` are views into the engine's cache tensor, set by the model runner.
    """

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int):
        super().__init__()
        self.num_heads, self.head_dim, self.scale, self.num_kv_heads = num_heads, head_dim, scale, num_kv_heads
        self.k_cache = self.v_cache = torch.tensor([])

    def forward(self, q, k=None, v=None):
        ctx = get_context()
        if k is not None:
            store_kvcache(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)
        return paged_attention(q, self.k_cache, self.v_cache, ctx.cu_seqlens_q, ctx.seqlens_k,
                               ctx.block_tables, self.scale, max_seqlen_q=ctx.max_seqlen_q,
                               max_seqlen_k=ctx.max_seqlen_k, decode=not ctx.is_prefill)
