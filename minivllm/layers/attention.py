import torch
import torch.nn.functional as F
from torch import nn

from kernels.paged_attention import paged_attention, store_kvcache
from minivllm.context import get_context

try:  # optional: flash-attn's paged kernels where it is installed; never required
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
except ImportError:
    flash_attn_varlen_func = flash_attn_with_kvcache = None

FLASH_ATTN_BLOCK = 256  # flash-attn's paged KV cache takes blocks of a multiple of 256 tokens


def use_flash_attn(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return (flash_attn_with_kvcache is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and k_cache.shape[1] % FLASH_ATTN_BLOCK == 0)


class Attention(nn.Module):
    """Stores this step's K/V in the paged cache, then attends over the cache: with flash-attn when
    it is importable and fits (CUDA, fp16/bf16, blocks of 256 tokens), else with our Triton kernels
    (or their torch reference on CPU). Without k and v (fusion="full") the qkv kernel has already
    stored them.

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
        if use_flash_attn(q, self.k_cache):
            return self.flash_attn(q, ctx)
        return paged_attention(q, self.k_cache, self.v_cache, ctx.cu_seqlens_q, ctx.seqlens_k,
                               ctx.block_tables, self.scale, max_seqlen_q=ctx.max_seqlen_q,
                               max_seqlen_k=ctx.max_seqlen_k, decode=not ctx.is_prefill)

    def flash_attn(self, q, ctx):
        # flash-attn aligns the causal mask to the end of the keys when there are more keys than
        # queries, as our kernels do: new tokens see the cached prefix and each other causally.
        if ctx.is_prefill:
            cu_seqlens_k = F.pad(ctx.seqlens_k.cumsum(0, dtype=torch.int32), (1, 0))
            return flash_attn_varlen_func(q, self.k_cache, self.v_cache, ctx.cu_seqlens_q, cu_seqlens_k,
                                          ctx.max_seqlen_q, ctx.max_seqlen_k, softmax_scale=self.scale,
                                          causal=True, block_table=ctx.block_tables)
        return flash_attn_with_kvcache(q.unsqueeze(1), self.k_cache, self.v_cache, cache_seqlens=ctx.seqlens_k,
                                       block_table=ctx.block_tables, softmax_scale=self.scale,
                                       causal=True).squeeze(1)
