import torch
from torch import nn

import kernels


class RotaryEmbedding(nn.Module):
    """RoPE in HF's rotate-half convention, with a cos/sin table for every position
    (``cos_sin`` [max_position, head_dim]: cos then sin; the fused qkv kernel reads it too).
    ``eager``: eager torch ops (``kernels.rope_ref``) instead of the one-kernel ``kernels.rope``."""

    def __init__(self, head_dim: int, max_position: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float), inv_freq)
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], -1), persistent=False)
        self.eager = False

    def forward(self, positions, q, k):
        """q [T, Hq, D], k [T, Hk, D] at ``positions`` [T]."""
        if not self.eager:
            return kernels.rope(q, k, self.cos_sin, positions)
        cos, sin = self.cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
        return kernels.rope_ref(q, cos, sin), kernels.rope_ref(k, cos, sin)
