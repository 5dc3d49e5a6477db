import math

import torch
from torch import nn

import kernels


def rope_inv_freq(head_dim: int, base: float, rope_scaling: dict | None = None) -> torch.Tensor:
    """RoPE's inverse frequencies (fp32 [head_dim / 2]): ``base ** (-2i / head_dim)``, or with the
    llama3 ``rope_scaling`` (``ModelConfig.rope_scaling``) as transformers'
    ``_compute_llama3_parameters`` computes them: wavelengths longer than
    ``original_max_position_embeddings / low_freq_factor`` are stretched by ``factor``, those
    shorter than ``.../ high_freq_factor`` kept, and the band between interpolated smoothly."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_scaling is None:
        return inv_freq
    factor, low, high = rope_scaling["factor"], rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
    old_context = rope_scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """RoPE in HF's rotate-half convention, with a cos/sin table for every position
    (``cos_sin`` [max_position, head_dim]: cos then sin; the fused qkv kernel reads it too).
    ``rope_scaling``: None or the llama3 RoPE's parameters (``rope_inv_freq``).
    ``eager``: eager torch ops (``kernels.rope_ref``) instead of the one-kernel ``kernels.rope``."""

    def __init__(self, head_dim: int, max_position: int, base: float, rope_scaling: dict | None = None):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, base, rope_scaling)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float), inv_freq)
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], -1), persistent=False)
        self.eager = False

    def forward(self, positions, q, k):
        """q [T, Hq, D], k [T, Hk, D] at ``positions`` [T]."""
        if not self.eager:
            return kernels.rope(q, k, self.cos_sin, positions)
        cos, sin = self.cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
        return kernels.rope_ref(q, cos, sin), kernels.rope_ref(k, cos, sin)
