"""RMSNorm fused into the linear layer that follows it (FlashNorm style).

RMSNorm's weight is folded into the next projection once, at load time:
``W' = W * gamma[None, :]`` (``fold_rmsnorm_weight``). Then

    y = rmsnorm(h) @ W.T = r * (h @ W'.T),   r = rsqrt(mean(h ** 2) + eps) per row,

so the kernel streams ``h`` once for the GEMM, accumulates ``sum(h ** 2)`` from the same
tiles and applies ``r`` in the epilogue: the normalised activations never exist.

``h = x + residual`` when a residual is given (rounded to the model dtype, as HF adds);
``h`` is then also returned, written once into a NEW tensor. It cannot go into
``residual`` in place: every column block reads ``residual``, so the block writing ``h``
would race the others still reading it.

``rms_cols_start`` applies ``r`` only to output columns ``n >= rms_cols_start``. Qwen3's
q and k go through a per-head RMSNorm right after the qkv projection, which cancels any
per-row scale, so for qkv pass ``rms_cols_start = (num_q_heads + num_kv_heads) * head_dim``
and only v gets ``r`` (q and k then differ from the unfused values by the factor 1/r,
which their own norms remove up to their eps).

``silu_mul=True`` (SwiGLU's gate_up, W = [gate; up]) returns ``silu(gate) * up`` instead:
a program owns matching gate and up rows, so the product is formed in registers.

The K loop (``_norm_matmul``) and program order (``_tile_ids``) are shared with
``rmsnorm_qkv``, whose epilogue adds QK-norm, RoPE and the KV-cache store.

Paths by M (``path_for``; NOTES.md "GPU measurements" has the H100 numbers behind them):
  * M <= GEMV_MAX_M (1): "gemv", the kernel with GEMV=True: no tl.dot, each program streams
    [BLOCK_N, BLOCK_K] K-contiguous W tiles once for all rows, fp32 multiply + tl.sum.
  * M >= CUBLAS_MIN_M (2): "cublas", the unfused route (row kernel, then cuBLAS), because
    cuBLAS beat both tl.dot launch shapes on the H100.
  * "dot" (one row block, M <= 64) and "tiled" (grouped GEMM tiles): the tl.dot kernels, used
    when the constants are moved (bench) or forced with ``path=``.
  * At M >= CUBLAS_MIN_M a dispatched call takes the Hopper TMA kernel (``kernels.rmsnorm_linear_tma``)
    instead of the cuBLAS route where ``kernels.dispatch`` holds a measurement of it winning on this GPU.
Each Triton path has its own autotuner keyed on (M bucket, N, K, residual, silu_mul), so warm
up before CUDA-graph capture.
"""
import torch

from kernels.guard import INTERPRET, check_tensors, graph_bench, pdl_launch, tl, triton, use_triton
from kernels.dispatch import takes_tma
from kernels.rmsnorm import launch_rows
from kernels.silu_mul import silu_mul as silu_mul_kernel

SMALL_M = 64  # largest M the tl.dot decode configs serve (one row block)
# Dispatch by M (module globals, read at every call: the bench overrides them):
#   M <= GEMV_MAX_M      -> "gemv": no tl.dot, W streamed once with wide K-contiguous loads
#   M >= CUBLAS_MIN_M    -> "cublas": row kernel (h, normalised rows) + cuBLAS; the UNFUSED route,
#                           taken because cuBLAS beat every tl.dot variant on the H100 (NOTES.md)
#   otherwise            -> "dot" (M <= SMALL_M, one row block) or "tiled" (grouped GEMM tiles)
# H100 (run 3, NOTES.md): GEMV beat cuBLAS at M = 1 on lm_head and 8B gate_up but took 2-2.6x
# cuBLAS at M = 4 (the fp32 [M, BLOCK_N, BLOCK_K] product outgrows the registers), so only M = 1.
GEMV_MAX_M = 1
CUBLAS_MIN_M = 2
GEMV_MAX_ROWS = 8  # the most rows the GEMV kernel serves when forced (its fp32 product grows with M)
PATHS = ("gemv", "dot", "tiled", "cublas")


def _configs(names, rows):
    """Configs from rows of (*values for names, num_warps, num_stages)."""
    return [triton.Config(dict(zip(names, row[:-2])), num_warps=row[-2], num_stages=row[-1]) for row in rows]


_TILE = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
if INTERPRET:
    # The interpreter runs programs one after another on the CPU: small tiles, so tests
    # on tiny shapes still cover several blocks, masked tails and a partial group.
    _DECODE_CONFIGS = _configs(("BLOCK_N", "BLOCK_K"), [(32, 32, 1, 1)])
    _GEMV_CONFIGS = _configs(("BLOCK_N", "BLOCK_K"), [(16, 32, 1, 1)])
    _PREFILL_CONFIGS = _configs(_TILE, [(32, 32, 32, 2, 1, 1)])
else:
    # Decode: the wrapper sets BLOCK_M from M (16/32/64, one row block). W tiles of
    # 8-32 KB per stage keep enough bytes in flight per SM; BLOCK_N 16-32 gives 128+
    # programs even for N = 4096. Compiled for sm_90 with a residual (the x + residual
    # tile lives in registers for the sum of squares), none spills more than 16 bytes at
    # BLOCK_M = 16 or 32; at 64 the big-K ones spill or overflow shared memory, and the
    # autotuner drops them.
    _DECODE_CONFIGS = _configs(("BLOCK_N", "BLOCK_K"), [
        (16, 256, 4, 4),
        (16, 256, 8, 4),
        (16, 512, 8, 3),
        (32, 128, 8, 4),
        (32, 256, 8, 3),
        (64, 128, 8, 4),
        (128, 128, 8, 3),
        (32, 64, 4, 3),  # fits shared memory even for fp32 + residual at BLOCK_M = 64
    ])
    # GEMV (M <= GEMV_MAX_M): a program owns BLOCK_N rows of W and reads [BLOCK_N, BLOCK_K]
    # tiles, 16-byte loads along K, the next tile in flight while it multiplies this one
    # (``_gemv_matmul``). At 4+ TB/s and about a microsecond to DRAM an SM needs some 32 KB in
    # flight: two 4-16 KB tiles per program and several programs per SM, so small BLOCK_N
    # too (N = 1024 at BLOCK_N 4: 256 programs). _fits_registers drops the tiles whose product
    # exceeds 64 fp32 values per thread (BLOCK_M * BLOCK_N * BLOCK_K, times 2 for silu_mul).
    # num_stages is 1: Triton pipelines tl.dot operands only.
    _GEMV_CONFIGS = _configs(("BLOCK_N", "BLOCK_K"), [
        (2, 1024, 4, 1),
        (4, 512, 4, 1),
        (4, 1024, 4, 1),
        (8, 256, 4, 1),
        (8, 512, 4, 1),
        (8, 1024, 8, 1),
        (16, 256, 4, 1),
        (16, 512, 8, 1),
        (32, 256, 8, 1),
        (16, 128, 4, 1),  # small products for M = 8
        (8, 64, 4, 1),
    ])
    # Prefill: the usual H100 bf16 GEMM tiles, minus those that spill with a residual
    # (256 x 128, and 128 x 128 on 4 warps).
    _PREFILL_CONFIGS = _configs(_TILE, [
        (128, 128, 64, 8, 8, 4),
        (128, 128, 64, 8, 8, 3),
        (128, 256, 64, 8, 8, 3),
        (64, 256, 64, 8, 8, 3),
        (64, 128, 64, 8, 4, 4),
        (128, 64, 64, 8, 8, 4),
        (64, 64, 64, 8, 4, 3),  # fits shared memory even for fp32 + residual
    ])


@triton.jit
def _tile_ids(M, num_pid_n, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of this program, in grouped order (``grouped_tile``)."""
    return grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), num_pid_n, GROUP_M)


@triton.jit
def grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(row block, column block) of output tile ``tile`` in grouped order: GROUP_M row blocks run
    together and share each W tile while it is in L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (tile // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + (tile % num_pid_in_group) % group_size_m, (tile % num_pid_in_group) // group_size_m


@triton.jit
def _norm_matmul(
    X, R, H, W, offs_m, w_rows, w_rows_2, mask_n, M, k_start, K, h_rows,
    stride_xm, stride_rm, stride_hm,
    HAS_RESIDUAL: tl.constexpr, PAIRED: tl.constexpr, PRECISION: tl.constexpr, GEMV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
):
    """One pass over columns [k_start, K) (split-K programs pass their slice; k_start a multiple
    of BLOCK_K): ``h = x (+ residual)``, ``acc = h @ W[w_rows].T`` (and, when PAIRED,
    ``acc_2`` from the W rows at ``w_rows_2``, sharing every h tile) and ``sum(h ** 2)`` per row.

    ``w_rows``: [BLOCK_N] element offsets of the W rows. With a residual, h is also stored
    to H for rows below ``h_rows``: M for one column block, 0 for the others (all of them
    compute h for their dot, one writes it).
    GEMV: ``_gemv_matmul``. Otherwise the tl.dot loop, whose loads Triton's pipeliner stages.
    """
    if GEMV:
        return _gemv_matmul(X, R, H, W, offs_m, w_rows, w_rows_2, mask_n, M, k_start, K, h_rows,
                            stride_xm, stride_rm, stride_hm, HAS_RESIDUAL, PAIRED, BLOCK_M, BLOCK_N, BLOCK_K, USE_PDL)
    mask_m = offs_m < M
    mask_h = offs_m < h_rows
    rows = offs_m.to(tl.int64)[:, None]  # M * K and N * K can pass 2**31
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(k_start, K, BLOCK_K):
        cols = k + offs_k
        a, res = _x_tiles(X, R, rows, mask_m, cols, K, stride_xm, stride_rm, HAS_RESIDUAL)
        a = _h_from(a, res, H, rows, mask_h, cols, K, stride_hm, HAS_RESIDUAL)
        a32 = a.to(tl.float32)
        sumsq += tl.sum(a32 * a32, axis=1)
        acc = tl.dot(a, _w_tile(W, w_rows, mask_n, cols, K, False), acc, input_precision=PRECISION)
        if PAIRED:
            acc_2 = tl.dot(a, _w_tile(W, w_rows_2, mask_n, cols, K, False), acc_2, input_precision=PRECISION)
    return acc, acc_2, sumsq


@triton.jit
def _gemv_matmul(
    X, R, H, W, offs_m, w_rows, w_rows_2, mask_n, M, k_start, K, h_rows,
    stride_xm, stride_rm, stride_hm,
    HAS_RESIDUAL: tl.constexpr, PAIRED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
):
    """``_norm_matmul`` for the GEMV rows (BLOCK_M = next power of two >= M, at most GEMV_MAX_ROWS): no
    tensor cores; W tiles are [BLOCK_N, BLOCK_K] (K fastest), multiplied by the h rows in fp32.

    A GEMV is a stream of W: the time goes to keeping enough bytes in flight. Triton's pipeliner stages
    only tl.dot operands, so the loop is software-pipelined by hand: each step issues the next step's W
    tile(s), x and residual loads before it computes on the tiles the previous step loaded, and nothing
    in the loop waits on a reduction (at one row the products accumulate element-wise, [BLOCK_N, BLOCK_K],
    and the squares [BLOCK_M, BLOCK_K], each summed once after the loop). The first W tile(s) are loaded
    before anything else: with PDL (``kernels.guard``) before ``gdc_wait``, since weights are never
    written, so their DRAM round trip runs under the previous kernel's tail; x, the residual and h
    (which earlier kernels write or read) come after it. The next kernel may launch from entry
    (USE_PDL 1) or once the K loop is done (2).
    """
    mask_m = offs_m < M
    mask_h = offs_m < h_rows
    rows = offs_m.to(tl.int64)[:, None]
    offs_k = tl.arange(0, BLOCK_K)
    if USE_PDL == 1:
        tl.extra.cuda.gdc_launch_dependents()
    cols = k_start + offs_k
    b = _w_tile(W, w_rows, mask_n, cols, K, True)
    b_2 = b
    if PAIRED:
        b_2 = _w_tile(W, w_rows_2, mask_n, cols, K, True)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    a, res = _x_tiles(X, R, rows, mask_m, cols, K, stride_xm, stride_rm, HAS_RESIDUAL)
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_2 = acc
    squares = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for k in range(k_start, K, BLOCK_K):
        cols = k + offs_k
        next_cols = cols + BLOCK_K  # past K (the last step): masked, no memory traffic
        next_b = _w_tile(W, w_rows, mask_n, next_cols, K, True)
        next_b_2 = next_b
        if PAIRED:
            next_b_2 = _w_tile(W, w_rows_2, mask_n, next_cols, K, True)
        next_a, next_res = _x_tiles(X, R, rows, mask_m, next_cols, K, stride_xm, stride_rm, HAS_RESIDUAL)
        h = _h_from(a, res, H, rows, mask_h, cols, K, stride_hm, HAS_RESIDUAL).to(tl.float32)
        squares += h * h
        acc = _gemv_accumulate(acc, h, b.to(tl.float32), BLOCK_M)
        if PAIRED:
            acc_2 = _gemv_accumulate(acc_2, h, b_2.to(tl.float32), BLOCK_M)
        a, res, b, b_2 = next_a, next_res, next_b, next_b_2
    if USE_PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()
    if BLOCK_M == 1:
        out = tl.sum(acc, axis=1)[None, :]
        out_2 = tl.sum(acc_2, axis=1)[None, :]
    else:
        out = acc
        out_2 = acc_2
    return out, out_2, tl.sum(squares, axis=1)


@triton.jit
def _gemv_accumulate(acc, h, b, BLOCK_M: tl.constexpr):
    """One W tile's share of the GEMV: at one row element-wise products ([BLOCK_N, BLOCK_K], summed
    after the loop), else the [BLOCK_M, BLOCK_N] sums over this tile's K."""
    if BLOCK_M == 1:
        acc += h * b
    else:
        acc += tl.sum(h[:, None, :] * b[None, :, :], axis=2)
    return acc


@triton.jit
def _x_tiles(X, R, rows, mask_m, cols, K, stride_xm, stride_rm, HAS_RESIDUAL: tl.constexpr):
    """The x tile of columns ``cols`` and, with a residual, the residual's (else x again)."""
    mask_mk = mask_m[:, None] & (cols < K)[None, :]
    a = tl.load(X + rows * stride_xm + cols[None, :], mask=mask_mk, other=0.0)
    res = a
    if HAS_RESIDUAL:
        res = tl.load(R + rows * stride_rm + cols[None, :], mask=mask_mk, other=0.0)
    return a, res


@triton.jit
def _h_from(a, res, H, rows, mask_h, cols, K, stride_hm, HAS_RESIDUAL: tl.constexpr):
    """h = x (+ residual), rounded to the model dtype as HF adds, and stored to H for rows below h_rows."""
    if HAS_RESIDUAL:
        a = (a.to(tl.float32) + res.to(tl.float32)).to(a.dtype)
        tl.store(H + rows * stride_hm + cols[None, :], a, mask=mask_h[:, None] & (cols < K)[None, :])
    return a


@triton.jit
def _w_tile(W, w_rows, mask_n, cols, K, GEMV: tl.constexpr):
    """The tile of W's rows at ``w_rows`` and columns ``cols``: [BLOCK_N, BLOCK_K] (K fastest) for the
    GEMV, [BLOCK_K, BLOCK_N] for tl.dot. W is [N, K] row-major: both read K-contiguous rows."""
    mask_k = cols < K
    if GEMV:
        b = tl.load(W + w_rows[:, None] + cols[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
    else:
        b = tl.load(W + w_rows[None, :] + cols[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
    return b


@triton.jit
def rmsnorm_linear_kernel(
    X, R, H, W, Y,
    M, N, K,
    M_BUCKET,  # only read by the autotuners' keys
    stride_xm, stride_rm, stride_hm, stride_wn, stride_ym,
    rms_cols_start, eps,
    HAS_RESIDUAL: tl.constexpr,
    SILU_MUL: tl.constexpr,
    PRECISION: tl.constexpr, GEMV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # With SILU_MUL, W is [gate; up] with N rows each and Y = silu(gate) * up is N wide: a
    # program owns gate columns n and up columns N + n, so the product never leaves registers.
    pid_m, pid_n = _tile_ids(M, tl.cdiv(N, BLOCK_N), BLOCK_M, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc, acc_up, sumsq = _norm_matmul(
        X, R, H, W, offs_m,
        offs_n.to(tl.int64) * stride_wn, (offs_n + N).to(tl.int64) * stride_wn,
        mask_n, M, 0, K, tl.where(pid_n == 0, M, 0), stride_xm, stride_rm, stride_hm,
        HAS_RESIDUAL, SILU_MUL, PRECISION, GEMV, BLOCK_M, BLOCK_N, BLOCK_K, USE_PDL,
    )

    # r needs the whole row, so it can only be applied after the K loop.
    rstd = tl.rsqrt(sumsq / K + eps)
    if SILU_MUL:
        gate = acc * rstd[:, None]
        y = gate * tl.sigmoid(gate) * (acc_up * rstd[:, None])
    else:
        y = acc * tl.where(offs_n[None, :] >= rms_cols_start, rstd[:, None], 1.0)
    rows = offs_m.to(tl.int64)[:, None]
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    tl.store(Y + rows * stride_ym + offs_n[None, :], y.to(Y.dtype.element_ty), mask=mask)


def _fits_registers(configs, named_args, **meta):
    """With SILU_MUL a program holds two accumulators: drop the tiles that would then exceed
    the 128 x 128 fp32 accumulator a program keeps without spilling. GEMV: drop the tiles
    whose [BLOCK_M, BLOCK_N, BLOCK_K] product exceeds 64 fp32 values per thread."""
    pairs = 2 if meta.get("SILU_MUL") else 1

    def block_m(c):
        return meta.get("BLOCK_M", c.kwargs.get("BLOCK_M", 0))

    if meta.get("GEMV"):
        size = {c: pairs * block_m(c) * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] / (32 * c.num_warps) for c in configs}
        fits = [c for c in configs if size[c] <= 64]
        return fits or [min(configs, key=size.get)]
    fits = [c for c in configs if pairs * block_m(c) * c.kwargs["BLOCK_N"] <= 128 * 128]
    return fits or configs


_KEY = ["M_BUCKET", "N", "K", "HAS_RESIDUAL", "SILU_MUL"]
_PRUNE = {"early_config_prune": _fits_registers}
_gemv_kernel = triton.autotune(configs=_GEMV_CONFIGS, key=_KEY, prune_configs_by=_PRUNE,
                               do_bench=graph_bench)(rmsnorm_linear_kernel)
_decode_kernel = triton.autotune(configs=_DECODE_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)(rmsnorm_linear_kernel)
_prefill_kernel = triton.autotune(configs=_PREFILL_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)(rmsnorm_linear_kernel)


def _m_bucket(m: int) -> int:
    return min(max(triton.next_power_of_2(m), 16), 8192)


def path_for(m: int, path: str | None = None, accepted=PATHS) -> str:
    """The path that serves M rows: ``path`` if given (one of ``accepted``, and able to serve M), else
    the dispatch rule. "splitk" (``rmsnorm_qkv``'s only) serves the GEMV rows, and takes them where accepted."""
    if path is None:
        if m <= GEMV_MAX_M:
            return "splitk" if "splitk" in accepted and m <= GEMV_MAX_ROWS else "gemv"
        if m >= CUBLAS_MIN_M:
            return "cublas"
        return "dot" if m <= SMALL_M else "tiled"
    if (path not in accepted or (path in ("gemv", "splitk") and m > GEMV_MAX_ROWS)
            or (path == "dot" and m > SMALL_M)):
        raise ValueError(f"path {path!r} cannot serve M={m} (paths {accepted}; gemv, splitk M <= {GEMV_MAX_ROWS}, "
                         f"dot M <= {SMALL_M})")
    return path


def select_kernel(m: int, path: str | None, gemv, dot, tiled):
    """Of a fused op's three autotuned kernels, the one that serves M rows on a Triton path, and the
    meta-parameters the wrapper fixes. ``kernel.best_config`` holds the config of its latest launch
    (the bench records it)."""
    path = path_for(m, path)
    if path == "gemv":
        return gemv, {"BLOCK_M": triton.next_power_of_2(max(m, 1)), "GROUP_M": 1, "GEMV": True}
    if path == "dot":
        return dot, {"BLOCK_M": _m_bucket(m), "GROUP_M": 1, "GEMV": False}
    if path == "tiled":
        return tiled, {"GEMV": False}
    raise ValueError("the cublas path runs no fused kernel")


def kernel_for(m: int, path: str | None = None):
    return select_kernel(m, path, _gemv_kernel, _decode_kernel, _prefill_kernel)


def precision(dtype: torch.dtype) -> str:
    # tl.dot would round fp32 operands to tf32; fp32 callers expect fp32 accuracy.
    return "ieee" if dtype == torch.float32 else "tf32"


def launch(kernel, x, w_folded, eps, residual, rms_cols_start, silu_mul=False, **meta):
    """Run ``kernel`` (an autotuner or the bare kernel with full meta) on checked inputs; with PDL where
    ``kernels.guard.pdl_launch`` says (USE_PDL and launch_pdl go together: ``meta`` cannot set them)."""
    m, k = x.shape
    n = w_folded.shape[0] // 2 if silu_mul else w_folded.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    h = torch.empty((m, k), dtype=x.dtype, device=x.device) if residual is not None else None
    if m == 0 or n == 0:
        return y if residual is None else (y, h)

    def grid(cfg):
        return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)

    kernel[grid](
        x, residual, h, w_folded, y,
        m, n, k, _m_bucket(m),
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        h.stride(0) if residual is not None else 0,
        w_folded.stride(0), y.stride(0),
        rms_cols_start, eps,
        HAS_RESIDUAL=residual is not None,
        SILU_MUL=silu_mul,
        PRECISION=precision(x.dtype),
        **{"GEMV": False, **meta},
        # PDL only on the GEMV rows (the decode step at one row): the tl.dot paths keep their K loop whole.
        **pdl_launch(x, meta.get("GEMV", False)),
    )
    return y if residual is None else (y, h)


def _check_args(x, w_folded, residual, rms_cols_start, silu_mul):
    """ValueError on anything the kernel does not handle."""
    op = "rmsnorm_linear"
    if x.dim() != 2 or w_folded.dim() != 2:
        raise ValueError(f"{op}: x {tuple(x.shape)} must be [M, K] and w_folded {tuple(w_folded.shape)} [N, K]")
    if x.shape[1] != w_folded.shape[1] or x.shape[1] == 0:
        raise ValueError(f"{op}: K mismatch or empty: x {tuple(x.shape)}, w_folded {tuple(w_folded.shape)}")
    if residual is None:
        check_tensors(op, x=x, w_folded=w_folded)
    else:
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
        check_tensors(op, x=x, w_folded=w_folded, residual=residual)
    if not 0 <= rms_cols_start <= w_folded.shape[0]:
        raise ValueError(f"{op}: rms_cols_start={rms_cols_start} outside [0, N={w_folded.shape[0]}]")
    if silu_mul and (w_folded.shape[0] % 2 or rms_cols_start):
        raise ValueError(f"{op}: silu_mul needs w_folded [gate; up] with an even N (got {w_folded.shape[0]}) "
                         f"and rms_cols_start=0 (got {rms_cols_start})")


def rmsnorm_linear(
    x: torch.Tensor,
    w_folded: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    rms_cols_start: int = 0,
    silu_mul: bool = False,
    path: str | None = None,
):
    """``y = rmsnorm(h) @ W.T`` [M, N] with ``w_folded = fold_rmsnorm_weight(gamma, W)``.

    ``h = x`` or ``x + residual``; with a residual returns ``(y, h)``, ``h`` a new tensor
    (inputs are not modified). Columns ``n < rms_cols_start`` get plain ``h @ w_folded.T``.
    ``silu_mul``: W is SwiGLU's ``[gate; up]`` and y is ``silu(gate) * up``, [M, N / 2].
    x, w_folded, residual: same dtype (fp16/bf16/fp32) and device, contiguous in K.
    ``path``: force one of ``PATHS`` (tests, bench); None dispatches on M (``path_for``).
    """
    _check_args(x, w_folded, residual, rms_cols_start, silu_mul)
    if not use_triton(x):
        return rmsnorm_linear_ref(x, w_folded, eps, residual, rms_cols_start, silu_mul)
    dispatched = path is None
    path = path_for(x.shape[0], path)
    if path == "cublas":
        if dispatched and takes_tma(x.shape[0], *w_folded.shape, silu_mul, x.device):
            from kernels.rmsnorm_linear_tma import rmsnorm_linear_tma, tma_readable  # it imports this module
            tensors = [x, w_folded] + ([residual] if residual is not None else [])
            if all(map(tma_readable, tensors)):
                return rmsnorm_linear_tma(x, w_folded, eps, residual, rms_cols_start, "row_pass", silu_mul)
        return cublas_route(x, w_folded, eps, residual, rms_cols_start, silu_mul)
    kernel, meta = kernel_for(x.shape[0], path)
    return launch(kernel, x, w_folded, eps, residual, rms_cols_start, silu_mul, **meta)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` [M, N] with no norm: the GEMV kernel for M <= GEMV_MAX_M (with
    ``rms_cols_start = N`` every column skips the rms factor), else ``F.linear`` (cuBLAS).
    fusion="full" runs o_proj and down_proj through it: at M = 1 cuBLAS splits their long K
    into two kernels (split-K GEMM + reduce), the GEMV is one. x, w: same dtype and device,
    contiguous in K."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1] or x.shape[1] == 0:
        raise ValueError(f"linear: x {tuple(x.shape)} must be [M, K] and w {tuple(w.shape)} [N, K], K > 0")
    check_tensors("linear", x=x, w=w)
    if not use_triton(x) or path_for(x.shape[0]) != "gemv":
        return torch.nn.functional.linear(x, w)
    kernel, meta = kernel_for(x.shape[0], "gemv")
    return launch(kernel, x, w, 0.0, None, w.shape[0], **meta)


def norm_rows(x, residual, eps, want_rstd=False):
    """One row kernel: ``h = x (+ residual)`` (a new tensor), the normalised rows
    ``round(h * r)`` (gamma is folded into the next weight) and, if asked, ``r`` in fp32.
    Returns ``(normed, h, rstd)``; ``h`` is ``x`` without a residual."""
    m = x.shape[0]
    normed = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else x
    rstd = torch.empty(m, dtype=torch.float32, device=x.device) if want_rstd else None
    if m > 0:
        launch_rows(x, residual, h if residual is not None else None, None, normed, rstd, eps)
    return normed, h, rstd


def cublas_route(x, w_folded, eps, residual, rms_cols_start=0, silu_mul=False):
    """The UNFUSED route, for large M where cuBLAS beats the Triton GEMMs: ``norm_rows`` then
    ``F.linear`` (cuBLAS), then SiLU(gate) * up as one kernel (``kernels.silu_mul``, as the unfused
    engine runs it). The normalised rows are rounded to x's dtype, as the unfused engine path does."""
    normed, h, _ = norm_rows(x, residual, eps)
    if rms_cols_start:
        y = torch.cat([torch.nn.functional.linear(h, w_folded[:rms_cols_start]),
                       torch.nn.functional.linear(normed, w_folded[rms_cols_start:])], dim=-1)
    else:
        y = torch.nn.functional.linear(normed, w_folded)
    if silu_mul:
        y = silu_mul_kernel(y)
    return y if residual is None else (y, h)


def fold_rmsnorm_weight(gamma: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``W' = W * gamma[None, :]``, computed in fp32 (or fp64) and returned in W's dtype."""
    if gamma.dim() != 1 or w.dim() != 2 or w.shape[1] != gamma.shape[0]:
        raise ValueError(f"fold_rmsnorm_weight: gamma {tuple(gamma.shape)} must be [K], w {tuple(w.shape)} [N, K]")
    acc = torch.promote_types(w.dtype, torch.float32)
    return (w.to(acc) * gamma.to(acc)[None, :]).to(w.dtype)


def rmsnorm_linear_ref(x, w_folded, eps=1e-6, residual=None, rms_cols_start=0, silu_mul=False):
    """``rmsnorm_linear`` as the unfused engine path computes it: normalise (rounding to
    x's dtype), a separate linear, then (``silu_mul``) SiLU(gate) * up. fp64 inputs give the
    exact function."""
    h = x if residual is None else x + residual
    hidden = h.to(torch.promote_types(h.dtype, torch.float32))
    normed = (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    y = torch.cat([
        torch.nn.functional.linear(h, w_folded[:rms_cols_start]),
        torch.nn.functional.linear(normed, w_folded[rms_cols_start:]),
    ], dim=-1)
    if silu_mul:
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    return y if residual is None else (y, h)
