"""Triton kernels for minivllm: RMSNorm, residual-add + RMSNorm, and RMSNorm fused into
the following linear layer (weight folded once at load time).

Only torch is needed to import this package: without Triton (or on CPU tensors without
``TRITON_INTERPRET=1``) every op runs its plain-torch reference; CUDA tensors then raise.
"""
from kernels.rmsnorm import add_rmsnorm, add_rmsnorm_ref, rmsnorm, rmsnorm_ref
from kernels.rmsnorm_linear import fold_rmsnorm_weight, rmsnorm_linear, rmsnorm_linear_ref

__all__ = [
    "rmsnorm",
    "add_rmsnorm",
    "fold_rmsnorm_weight",
    "rmsnorm_linear",
    "rmsnorm_ref",
    "add_rmsnorm_ref",
    "rmsnorm_linear_ref",
]
