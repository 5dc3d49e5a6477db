"""RMSNorm and fused residual-add + RMSNorm with Hugging Face Qwen3 numerics.

``rmsnorm(x, gamma, eps)`` matches ``Qwen3RMSNorm``::

    hidden = h.float()
    hidden = hidden * rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return gamma * hidden.to(h.dtype)

``add_rmsnorm(x, residual, gamma, eps)`` first forms ``h = x + residual`` rounded to the
model dtype (HF adds in the model dtype), writes ``h`` into ``residual`` in place, and
returns ``(rmsnorm(h), residual)``: the returned ``h`` IS the residual tensor.

The Triton import guard, the dispatch rule and the input checks shared by every kernel module
live in ``kernels/guard.py``.
"""
import torch

from kernels.guard import check_tensors, tl, triton, use_triton

@triton.jit
def _rmsnorm_kernel(
    X, R, H, G, Y, RSTD,
    stride_x, stride_x_inner, rows_per_group, stride_r, stride_h, stride_y,
    N, eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    STORE_RSTD: tl.constexpr,
    STORE_Y: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One program per row: a whole hidden vector fits in registers. H is where h = x + residual
    # goes (add_rmsnorm: the residual itself; rmsnorm_linear's cuBLAS route: a new tensor).
    # Without gamma (already folded into the next weight) y is the normalised row rounded
    # once; RSTD (fp32, per row) is stored for epilogues that need r. Rows of X may be grouped:
    # row i is X[i // rows_per_group, i % rows_per_group] (q's heads inside the qkv output, read
    # where they lie instead of copied out first). Without STORE_Y only h and r leave (a GEMM that
    # scales its rows by r reads h: kernels.rmsnorm_linear_tma).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x_row = (row // rows_per_group) * stride_x + (row % rows_per_group) * stride_x_inner
    h = tl.load(X + x_row + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        # Round the sum to the model dtype before normalising it, as HF does.
        h = (h.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(H + row * stride_h + cols, h, mask=mask)
    hf = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(hf * hf, axis=0) / N + eps)
    if STORE_RSTD:
        tl.store(RSTD + row, rstd)
    if STORE_Y:
        normed = (hf * rstd).to(X.dtype.element_ty)
        if HAS_GAMMA:
            g = tl.load(G + cols, mask=mask, other=0.0)
            # HF multiplies gamma and the normalised value in the model dtype: one rounding.
            y = g.to(tl.float32) * normed.to(tl.float32)
        else:
            y = normed
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


def launch_rows(x2, r2, h2, gamma, y2, rstd, eps):
    """``_rmsnorm_kernel`` on ``x2`` [M, N], or on the M = G * H rows of a strided ``x2`` [G, H, N]:
    one program per row; ``y2`` [M, N], or None to write only h and ``rstd``."""
    n = x2.shape[-1]
    block_n = triton.next_power_of_2(n)
    grouped = x2.dim() == 3
    _rmsnorm_kernel[(x2.shape[0] * x2.shape[1] if grouped else x2.shape[0],)](
        x2, r2, h2, gamma, y2, rstd,
        x2.stride(0), x2.stride(1) if grouped else 0, x2.shape[1] if grouped else 1,
        r2.stride(0) if r2 is not None else 0, h2.stride(0) if h2 is not None else 0,
        y2.stride(0) if y2 is not None else 0,
        n, eps,
        HAS_RESIDUAL=r2 is not None,
        HAS_GAMMA=gamma is not None,
        STORE_RSTD=rstd is not None,
        STORE_Y=y2 is not None,
        BLOCK_N=block_n,
        num_warps=min(max(block_n // 512, 1), 16),
    )


MAX_N = 65536  # one row per program, held in registers


def _launch_rmsnorm(x, residual, gamma, eps, op):
    if gamma.dim() != 1 or x.shape[-1] != gamma.shape[0]:
        raise ValueError(f"{op}: gamma {tuple(gamma.shape)} must be [N] with N = x.shape[-1] of {tuple(x.shape)}")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
        if not residual.is_contiguous():
            raise ValueError(f"{op}: residual must be contiguous (it is updated in place)")
        check_tensors(op, x=x, residual=residual, gamma=gamma)
    else:
        check_tensors(op, x=x, gamma=gamma)
    n = x.shape[-1]
    if n > MAX_N:
        raise ValueError(f"{op}: rows of {n} elements exceed the {MAX_N} one program holds")
    if not use_triton(x):
        if residual is None:
            return rmsnorm_ref(x, gamma, eps)
        h = residual.copy_(x + residual)
        return rmsnorm_ref(h, gamma, eps), h
    # A 3-D x whose rows cannot be flattened without a copy (q's heads in the qkv output) is read
    # in place as [tokens, heads, N].
    x2 = x if x.dim() == 3 and residual is None and not _flattens(x) else x.reshape(-1, n)
    r2 = residual.view(-1, n) if residual is not None else None
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y2 = y.view(-1, n)
    if y2.shape[0] > 0:
        launch_rows(x2, r2, r2, gamma, y2, None, eps)
    return y if residual is None else (y, residual)


def _flattens(x: torch.Tensor) -> bool:
    return x.stride(-2) == x.shape[-1] and (x.dim() < 3 or x.stride(0) == x.shape[1] * x.stride(1))


def rmsnorm(x: torch.Tensor, gamma: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` [..., N] with weight ``gamma`` [N]; y in x's dtype."""
    return _launch_rmsnorm(x, None, gamma, eps, "rmsnorm")


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, gamma: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual`` (written into ``residual`` in place); returns ``(rmsnorm(h), residual)``."""
    return _launch_rmsnorm(x, residual, gamma, eps, "add_rmsnorm")


def rmsnorm_ref(x: torch.Tensor, gamma: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Plain-torch RMSNorm, op for op HF's Qwen3RMSNorm (fp64 inputs stay fp64)."""
    hidden = x.to(torch.promote_types(x.dtype, torch.float32))
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return gamma * hidden.to(x.dtype)


def add_rmsnorm_ref(
    x: torch.Tensor, residual: torch.Tensor, gamma: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch ``add_rmsnorm`` that leaves its inputs alone: returns ``(y, x + residual)``."""
    h = x + residual
    return rmsnorm_ref(h, gamma, eps), h
