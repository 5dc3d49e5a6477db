"""The token embedding as one Triton gather: ``weight[ids]``.

``F.embedding`` is one torch kernel too; this one exists for programmatic dependent launch
(``kernels.guard``): it is the first kernel of the decode graph, and as a PDL kernel it lets the first
layer's qkv kernel launch and prefetch its weights while the gather runs. A torch kernel would not.
"""
import torch

from kernels.guard import check_tensors, pdl_entry, pdl_launch, tl, triton, use_triton
from kernels.paged_attention import INDEX_DTYPES

BLOCK_D = 1024  # 8 bf16 (16 bytes) per thread at 4 warps


@triton.jit
def _embedding_kernel(IDS, W, OUT, D, stride_w, stride_o, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_entry(USE_PDL)  # the ids may come from the previous kernel
    t = tl.program_id(0)
    row = tl.load(IDS + t).to(tl.int64)  # row * stride passes 2**31 for large vocabularies
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = d < D
    tl.store(OUT + t.to(tl.int64) * stride_o + d, tl.load(W + row * stride_w + d, mask=mask), mask=mask)


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Rows of ``weight`` [V, D] at ``ids`` [T] (int32/int64, each in [0, V): the engine checks prompts),
    [T, D] in weight's dtype."""
    if weight.dim() != 2 or ids.dim() != 1 or ids.dtype not in INDEX_DTYPES or not ids.is_contiguous():
        raise ValueError(f"embedding: weight {tuple(weight.shape)} must be [V, D] and ids {tuple(ids.shape)} "
                         f"{ids.dtype} a contiguous [T] int32/int64 tensor")
    check_tensors("embedding", weight=weight)
    if ids.device != weight.device:
        raise ValueError(f"embedding: ids are on {ids.device} but weight is on {weight.device}")
    if not use_triton(weight):
        return embedding_ref(ids, weight)
    out = torch.empty((ids.shape[0], weight.shape[1]), dtype=weight.dtype, device=weight.device)
    if ids.shape[0]:
        _embedding_kernel[(ids.shape[0], triton.cdiv(weight.shape[1], BLOCK_D))](
            ids, weight, out, weight.shape[1], weight.stride(0), out.stride(0), BLOCK_D=BLOCK_D, num_warps=4,
            **pdl_launch(weight))
    return out


def embedding_ref(ids, weight):
    return torch.nn.functional.embedding(ids, weight)
