"""RMSNorm + linear at prefill M on Hopper: a persistent GEMM on TMA descriptors that carries the norm.

The same function as ``kernels.rmsnorm_linear`` (its docstring has the algebra):

    y = r * (h @ W'.T),   r = rsqrt(mean(h ** 2) + eps) per row,   h = x (+ residual),

with ``W'`` the folded weight. The norm costs the GEMM nothing but a row scale in the epilogue and
the sum of squares of the A tiles the main loop already brings on chip. What the tl.dot kernels of
``rmsnorm_linear`` lack, and cuBLAS has, is the Hopper main loop: operands fetched by the TMA engine
into shared memory and multiplied from there by wgmma, several stages in flight. Here ``x`` (and the
residual) and ``W'`` are read through host-built tensor descriptors (``triton.tools.tensor_descriptor``:
out-of-bounds rows and columns read as zero, so the sums of squares need no mask), one program runs
per SM and walks the output tiles in grouped order (GROUP_M row blocks share each W tile while it is
in L2). The outputs go out with plain masked stores: TMA needs 16-byte row strides, which an odd N
does not have.

``silu_mul=True`` (SwiGLU's gate_up, W' = [gate; up]) returns ``silu(gate) * up``: a program multiplies
each A tile by the gate tile and the up tile of its columns, two accumulators, and the product never
leaves registers (the engine's cuBLAS route writes [gate, up] and reads it back in a SiLU kernel).

``rms_cols_start = N`` (no column takes r) skips the sum of squares: the kernel is then a plain
GEMM, the yardstick for the fused one against cuBLAS (``kernels.bench``).

Where the sums of squares come from (``sum_of_squares``):
  * "mainloop": from the A tiles, in the GEMM itself; with a residual h = x + residual is formed in
    registers there, and the programs of column block 0 store h. Measured on the H200 (kernels/NOTES.md,
    run 8) that takes A off the TMA-to-wgmma path: 1.4-1.8x the plain GEMM.
  * "row_pass": a row kernel (``kernels.rmsnorm``'s, without its normalised output) writes h and each
    row's r in fp32 first; the GEMM reads h through TMA as a plain GEMM does and scales its rows by r.
    The unfused route writes h and the normalised rows; this writes h and 4 bytes a row.

GPU: compute capability 9 and up (TMA). The interpreter runs it on CPU for the tests.
"""
import torch

from kernels.guard import INTERPRET, check_tensors, sm_count, tl, triton, use_triton
from kernels.rmsnorm import launch_rows
from kernels.rmsnorm_linear import _m_bucket, grouped_tile, precision, rmsnorm_linear_ref


@triton.jit
def rmsnorm_linear_tma_kernel(
    x_desc, r_desc, w_desc, H, Y, RSTD, M, N, K, M_BUCKET, stride_hm, stride_ym, rms_cols_start, eps,
    HAS_RESIDUAL: tl.constexpr, NORM: tl.constexpr, RSTD_GIVEN: tl.constexpr, SILU_MUL: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr,
):
    # N is the output's width; with SILU_MUL W has 2N rows, the up rows of column n at N + n. A last gate tile
    # that runs past N reads up rows: they only reach columns >= N, which are not stored.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS):
        pid_m, pid_n = grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        rows = off_m + tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            a = x_desc.load([off_m, k])
            if HAS_RESIDUAL:
                # Round the sum to the model dtype, as HF does before its norm; column block 0 stores h.
                a = (a.to(tl.float32) + r_desc.load([off_m, k]).to(tl.float32)).to(a.dtype)
                if pid_n == 0:
                    cols = k + tl.arange(0, BLOCK_K)
                    tl.store(H + rows.to(tl.int64)[:, None] * stride_hm + cols[None, :], a,
                             mask=(rows < M)[:, None] & (cols < K)[None, :])
            acc = tl.dot(a, w_desc.load([off_n, k]).T, acc, input_precision=PRECISION)
            if SILU_MUL:
                acc_up = tl.dot(a, w_desc.load([N + off_n, k]).T, acc_up, input_precision=PRECISION)
            if NORM and not RSTD_GIVEN:
                a32 = a.to(tl.float32)
                sumsq += tl.sum(a32 * a32, axis=1)
        cols = off_n + tl.arange(0, BLOCK_N)
        y = acc
        if NORM:
            # r needs the whole row, so it can only be applied after the K loop.
            if RSTD_GIVEN:
                rstd = tl.load(RSTD + rows, mask=rows < M, other=1.0)
            else:
                rstd = tl.rsqrt(sumsq / K + eps)
            y = acc * tl.where(cols[None, :] >= rms_cols_start, rstd[:, None], 1.0)
            if SILU_MUL:  # rms_cols_start is 0: every column takes r
                up = acc_up * rstd[:, None]
        elif SILU_MUL:
            up = acc_up
        if SILU_MUL:
            y = y * tl.sigmoid(y) * up
        tl.store(Y + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :], y.to(Y.dtype.element_ty),
                 mask=(rows < M)[:, None] & (cols < N)[None, :])


def _set_block_shapes(nargs):
    """The descriptors' block shapes follow the autotuner's config (they are built before it picks)."""
    for name, rows in (("x_desc", "BLOCK_M"), ("r_desc", "BLOCK_M"), ("w_desc", "BLOCK_N")):
        if nargs[name] is not None:
            nargs[name].block_shape = [nargs[rows], nargs["BLOCK_K"]]


def _tma_configs(rows):
    return [triton.Config(dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"), r[:4])), num_warps=r[4],
                          num_stages=r[5], pre_hook=_set_block_shapes) for r in rows]


if INTERPRET:
    # Small tiles, so the tests' tiny shapes cover several tiles per program, partial tiles and a group.
    _CONFIGS = _tma_configs([(16, 16, 16, 2, 1, 1)])
else:
    # Hopper's bf16 GEMM tiles (128 x 128 / 256 with 64-wide K steps, 3-4 stages: the persistent-matmul
    # tutorial's space), and 64-row tiles for the smaller M.
    _CONFIGS = _tma_configs([
        (128, 128, 64, 8, 4, 3), (128, 128, 64, 8, 4, 4), (128, 128, 64, 8, 8, 4),
        (128, 256, 64, 8, 8, 3), (128, 256, 64, 8, 8, 4), (128, 128, 128, 8, 8, 3),
        (64, 128, 64, 8, 4, 4), (64, 256, 64, 8, 4, 4), (64, 64, 64, 8, 4, 4),
    ])

def _fits_registers(configs, named_args, **meta):
    """With SILU_MUL a program holds two accumulators: the tiles above 128 x 128 would spill."""
    if not meta.get("SILU_MUL"):
        return configs
    return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128] or configs


_KEY = ["M_BUCKET", "N", "K", "HAS_RESIDUAL", "NORM", "RSTD_GIVEN", "SILU_MUL"]
_kernel = triton.autotune(configs=_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _fits_registers})(
    rmsnorm_linear_tma_kernel)


SMS_INTERPRETED = 3  # the interpreter's stand-in SM count: each program walks several tiles (guard.sm_count)


SUMS_OF_SQUARES = ("mainloop", "row_pass")


def tma_readable(t: torch.Tensor) -> bool:
    """Whether a TMA descriptor can read the 2-D ``t``: a 16-byte aligned start and row stride."""
    return (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def _check(x, w_folded, residual, rms_cols_start, sum_of_squares, silu_mul):
    op = "rmsnorm_linear_tma"
    if silu_mul and (w_folded.dim() != 2 or w_folded.shape[0] % 2 or rms_cols_start):
        raise ValueError(f"{op}: silu_mul needs w_folded [gate; up] with an even N (got {tuple(w_folded.shape)}) "
                         f"and rms_cols_start=0 (got {rms_cols_start})")
    if sum_of_squares not in SUMS_OF_SQUARES:
        raise ValueError(f"{op}: sum_of_squares={sum_of_squares!r}; choose one of {SUMS_OF_SQUARES}")
    if x.dim() != 2 or w_folded.dim() != 2 or x.shape[1] != w_folded.shape[1] or x.shape[1] == 0:
        raise ValueError(f"{op}: x {tuple(x.shape)} must be [M, K] and w_folded {tuple(w_folded.shape)} [N, K]")
    tensors = {"x": x, "w_folded": w_folded, **({"residual": residual} if residual is not None else {})}
    check_tensors(op, **tensors)
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"{op}: residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
    for name, t in tensors.items():
        if not tma_readable(t):
            raise ValueError(f"{op}: {name} needs a 16-byte aligned start and row stride for TMA "
                             f"(row stride {t.stride(0)} elements of {t.element_size()} bytes)")
    if x.is_cuda and torch.cuda.get_device_capability(x.device)[0] < 9:
        raise ValueError(f"{op}: TMA needs compute capability 9 or more; this GPU has "
                         f"{torch.cuda.get_device_capability(x.device)}")
    if not 0 <= rms_cols_start <= w_folded.shape[0]:
        raise ValueError(f"{op}: rms_cols_start={rms_cols_start} outside [0, N={w_folded.shape[0]}]")


def rmsnorm_linear_tma(x: torch.Tensor, w_folded: torch.Tensor, eps: float = 1e-6,
                       residual: torch.Tensor | None = None, rms_cols_start: int = 0, sum_of_squares: str = "mainloop",
                       silu_mul: bool = False):
    """``kernels.rmsnorm_linear(x, w_folded, eps, residual, rms_cols_start, silu_mul)`` through the Hopper TMA
    kernel: y [M, N] ([M, N / 2] with silu_mul), and with a residual ``(y, h)``. ``sum_of_squares``: "mainloop" or
    "row_pass" (the module docstring). Reference: ``rmsnorm_linear_ref``. Needs CUDA with compute
    capability >= 9, or CPU tensors under Triton's interpreter."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    _check(x, w_folded, residual, rms_cols_start, sum_of_squares, silu_mul)
    if not use_triton(x):
        return rmsnorm_linear_ref(x, w_folded, eps, residual, rms_cols_start, silu_mul)
    m, k = x.shape
    n = w_folded.shape[0] // 2 if silu_mul else w_folded.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    h = torch.empty_like(x) if residual is not None else None
    norm = rms_cols_start < n
    row_pass = sum_of_squares == "row_pass" and (norm or residual is not None)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device) if row_pass and norm else None
    if m and row_pass:
        launch_rows(x, residual, h, None, None, rstd, eps)
    if m and n:
        # Placeholder block shapes: the config's pre_hook sets the real ones.
        def desc(t):
            return TensorDescriptor.from_tensor(t, [16, 16])

        a, r = (h if residual is not None else x, None) if row_pass else (x, residual)
        sms = sm_count(x.device, SMS_INTERPRETED)
        _kernel[lambda meta: (min(sms, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])),)](
            desc(a), desc(r) if r is not None else None, desc(w_folded), h, y, rstd,
            m, n, k, _m_bucket(m), h.stride(0) if h is not None else 0, y.stride(0), rms_cols_start, eps,
            HAS_RESIDUAL=r is not None, NORM=norm, RSTD_GIVEN=rstd is not None, SILU_MUL=silu_mul,
            PRECISION=precision(x.dtype), NUM_SMS=sms,
        )
    return y if residual is None else (y, h)
