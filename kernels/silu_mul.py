"""SwiGLU's activation, ``silu(gate) * up``, as one kernel: the unfused engine's SiLU*up (eager
torch takes three: silu, the product, and the chunk's copy where one is needed).

``silu_mul(gate_up)`` with ``gate_up`` [M, 2I] = [gate | up] returns [M, I] with eager torch's
(and HF's) numerics: silu(gate) computed in fp32 and rounded to the dtype, then the product in fp32,
rounded again.
"""
import torch
import torch.nn.functional as F

from kernels.guard import check_tensors, tl, triton, use_triton

BLOCK = 1024


@triton.jit
def _silu_mul_kernel(GU, Y, stride_gu, stride_y, INTER, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    gate = tl.load(GU + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(GU + row * stride_gu + INTER + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(Y.dtype.element_ty).to(tl.float32)
    y = act * up
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` [M, I] of ``gate_up`` [M, 2I] (contiguous in its last dim)."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"silu_mul: gate_up {tuple(gate_up.shape)} must be [M, 2I]")
    check_tensors("silu_mul", gate_up=gate_up)
    if not use_triton(gate_up):
        return silu_mul_ref(gate_up)
    m, inter = gate_up.shape[0], gate_up.shape[1] // 2
    y = torch.empty((m, inter), dtype=gate_up.dtype, device=gate_up.device)
    if m > 0 and inter > 0:
        _silu_mul_kernel[(m, triton.cdiv(inter, BLOCK))](gate_up, y, gate_up.stride(0), y.stride(0), inter,
                                                          BLOCK=BLOCK, num_warps=4)
    return y


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """Eager torch, as HF's MLP: ``silu(gate)`` rounded to the dtype, then the product."""
    gate, up = gate_up.chunk(2, -1)
    return F.silu(gate) * up
