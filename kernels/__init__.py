"""Triton kernels for minivllm: RMSNorm, residual-add + RMSNorm, RMSNorm fused into the
following linear layer (weight folded once at load time; optionally with SwiGLU's
SiLU(gate) * up in the epilogue), and the qkv projection fused with QK-norm, RoPE and the
paged KV-cache store; a no-norm GEMV ``linear`` for the decode step's other projections; and the
unfused engine's one-kernel RoPE (``rope``) and SiLU*up (``silu_mul``); temperature sampling in one
pass over the logits (``gumbel_argmax``), and with top-k/top-p in a few more without a sort
(``sample``); the token embedding's gather (``embedding``). The kernels of the decode step at one row
launch with programmatic dependent launch where the GPU has it (``kernels.guard``).

Only torch is needed to import this package: without Triton (or on CPU tensors without
``TRITON_INTERPRET=1``) every op runs its plain-torch reference; CUDA tensors then raise.
"""
from kernels.embedding import embedding, embedding_ref
from kernels.rmsnorm import add_rmsnorm, add_rmsnorm_ref, rmsnorm, rmsnorm_ref
from kernels.rmsnorm_linear import fold_rmsnorm_weight, linear, rmsnorm_linear, rmsnorm_linear_ref
from kernels.rmsnorm_qkv import rmsnorm_qkv_rope_store, rmsnorm_qkv_rope_store_ref
from kernels.rope import rope, rope_ref
from kernels.silu_mul import silu_mul, silu_mul_ref
from kernels.sampling import gumbel_argmax, gumbel_argmax_ref, sample, sample_ref

__all__ = [
    "rmsnorm",
    "add_rmsnorm",
    "fold_rmsnorm_weight",
    "rmsnorm_linear",
    "linear",
    "rmsnorm_qkv_rope_store",
    "rope",
    "silu_mul",
    "gumbel_argmax",
    "embedding",
    "sample",
    "rmsnorm_ref",
    "add_rmsnorm_ref",
    "rmsnorm_linear_ref",
    "rmsnorm_qkv_rope_store_ref",
    "rope_ref",
    "silu_mul_ref",
    "gumbel_argmax_ref",
    "embedding_ref",
    "sample_ref",
]
