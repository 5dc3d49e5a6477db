import torch
from torch import nn

import kernels


class RMSNorm(nn.Module):
    """RMSNorm; given a residual it first adds it (h = x + residual) and returns (norm(h), h),
    as Qwen3's decoder layer chains them."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x, residual=None):
        if residual is None:
            return kernels.rmsnorm(x, self.weight, self.eps)
        return kernels.add_rmsnorm(x, residual, self.weight, self.eps)
