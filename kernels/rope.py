"""RoPE (rotate-half convention, as HF's Qwen3 and Llama) on q and k in one launch: the unfused
engine's RoPE, one kernel where eager torch takes about 19 (``rope_ref``).

``rope(q, k, cos_sin, positions)`` returns new tensors ``(q', k')`` with, per head,
``x' = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]`` for the two halves ``x1, x2`` of the head,
computed in fp32 and rounded to x's dtype once (as ``rope_ref``). ``cos_sin`` [max_pos, D] holds
cos then sin for every position (``minivllm.layers.rotary.RotaryEmbedding``).
"""
import torch

from kernels.paged_attention import INDEX_DTYPES
from kernels.guard import check_tensors, tl, triton, use_triton


@triton.jit
def _rope_kernel(
    Q, K, QO, KO, COS_SIN, POS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_kot, stride_cs,
    NUM_Q_HEADS,
    HALF: tl.constexpr,
):
    # One program per (token, head); q heads first, then k heads.
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    cols = tl.arange(0, HALF)
    pos = tl.load(POS + t).to(tl.int64)
    cos = tl.load(COS_SIN + pos * stride_cs + cols)
    sin = tl.load(COS_SIN + pos * stride_cs + HALF + cols)
    if head < NUM_Q_HEADS:
        src = Q + t * stride_qt + head * stride_qh
        dst = QO + t * stride_qot + head * (2 * HALF)
    else:
        src = K + t * stride_kt + (head - NUM_Q_HEADS) * stride_kh
        dst = KO + t * stride_kot + (head - NUM_Q_HEADS) * (2 * HALF)
    x1 = tl.load(src + cols).to(tl.float32)
    x2 = tl.load(src + HALF + cols).to(tl.float32)
    tl.store(dst + cols, (x1 * cos - x2 * sin).to(dst.dtype.element_ty))
    tl.store(dst + HALF + cols, (x2 * cos + x1 * sin).to(dst.dtype.element_ty))


def rope(q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor):
    """RoPE of ``q`` [T, Hq, D] and ``k`` [T, Hk, D] (any strides over tokens and heads, contiguous
    in D) at ``positions`` [T]; returns new contiguous ``(q', k')``."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be [T, H, D] with one T and D")
    t, _, d = q.shape
    if d % 2 or cos_sin.dim() != 2 or cos_sin.shape[1] != d:
        raise ValueError(f"rope: head_dim {d} must be even and cos_sin {tuple(cos_sin.shape)} [max_pos, {d}]")
    if positions.shape != (t,) or positions.dtype not in INDEX_DTYPES:
        raise ValueError(f"rope: positions {tuple(positions.shape)} {positions.dtype} must be [{t}] int32/int64")
    check_tensors("rope", q=q, k=k)
    if cos_sin.dtype != torch.float32 or cos_sin.device != q.device or positions.device != q.device:
        raise ValueError("rope: cos_sin must be fp32 and, with positions, on q's device")
    if not use_triton(q):
        cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
        return rope_ref(q, cos, sin), rope_ref(k, cos, sin)
    if d & (d - 1):
        raise ValueError(f"rope: the kernel needs a power-of-two head_dim, got {d}")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if t > 0:
        _rope_kernel[(t, q.shape[1] + k.shape[1])](
            q, k, q_out, k_out, cos_sin.contiguous(), positions,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), q_out.stride(0), k_out.stride(0), cos_sin.stride(0),
            q.shape[1], HALF=d // 2, num_warps=1)
    return q_out, k_out


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of ``x`` [..., D] with ``cos``, ``sin`` [..., D/2] (broadcast), computed
    in fp32 (fp64 for fp64 x) and rounded to x's dtype once: eager torch, about 19 kernels."""
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)
