"""The whole attention prologue in one kernel: RMSNorm + qkv projection (as in
``rmsnorm_linear``), then per-head QK RMSNorm (Qwen3; ``QK_NORM``: Llama and Mistral have none),
RoPE and the K/V store into the paged cache.

Unfused, a decode step runs norm -> qkv GEMM -> q_norm -> k_norm -> RoPE (q, k) ->
store_kvcache, each a kernel that re-reads what the previous one wrote. Here a program owns
BLOCK_M rows times ONE whole head of the qkv output, so everything after the GEMM is a
register epilogue:

  * v heads get the row's ``r = rsqrt(mean(h ** 2) + eps)`` and go to ``v_cache``;
  * without QK-norm, q and k heads get ``r`` as v does;
  * with it, q and k heads skip ``r`` (their own RMSNorm removes any per-row factor) and are
    normalised over the head. To stay exact, eps is scaled like the values it is added to:
    with ``a = q / r`` (what the GEMM gives), ``q * rsqrt(mean(q**2) + eps_qk)`` equals
    ``a * rsqrt(mean(a**2) + eps_qk / r**2)`` and ``1 / r**2 = mean(h**2) + eps``;
  * RoPE in the rotate-half convention pairs element i with i + head_dim/2 of the same head:
    the head's accumulator is split into its two halves in registers, and
    ``out1 = a1*cos - a2*sin, out2 = a2*cos + a1*sin``;
  * q is written out for attention; k and v go to the cache at ``slot_mapping`` (slot -1:
    not stored, for padded rows of a CUDA graph).

The K loop is ``rmsnorm_linear``'s (``_norm_matmul``), with BLOCK_N = head_dim. The same
kernel serves decode (one row block, programs = heads) and prefill (tiled, grouped order).

Split-K (``path="splitk"``, M <= GEMV_MAX_ROWS; the dispatch's choice at M <= GEMV_MAX_M): SPLIT_K programs per head,
each over a slice of K, publish fp32 partials (acc and the sum of squares) to a workspace and take
a ticket from the head's counter; the last to arrive sums the partials, runs the epilogue and
resets the counter to 0, so the next launch (or CUDA-graph replay) needs no host work. Workspace
and counters are allocated once per (device, heads, head_dim) and shared by every call: launches
must be ordered on one stream, and the first call (autotuning) must come before graph capture.
"""
import torch

from kernels.paged_attention import INDEX_DTYPES, _check_cache, store_kvcache_ref
from kernels.guard import INTERPRET, check_tensors, graph_bench, pdl_launch, tl, triton, use_triton
from kernels.rmsnorm import rmsnorm_ref
from kernels.rope import rope_ref
from kernels.rmsnorm_linear import (GEMV_MAX_ROWS, PATHS, _configs, _m_bucket, _norm_matmul, _tile_ids, norm_rows,
                                     path_for, precision, rmsnorm_linear_ref, select_kernel)

QKV_PATHS = PATHS + ("splitk",)

if INTERPRET:
    _GEMV_CONFIGS = _configs(("BLOCK_K",), [(16, 1, 1)])
    # K = 40 in the tests: slices of 16, 16 and 8 columns.
    _SPLITK_CONFIGS = _configs(("BLOCK_K", "SPLIT_K"), [(16, 3, 1, 1)])
    _DECODE_CONFIGS = _configs(("BLOCK_K",), [(32, 1, 1)])
    _PREFILL_CONFIGS = _configs(("BLOCK_M", "BLOCK_K", "GROUP_M"), [(32, 32, 2, 1, 1)])
else:
    # GEMV: a program streams one head's 128 x K slice of W (256 KB at K = 1024) with
    # 8-16 warps; the product [BLOCK_M, 128, BLOCK_K] is pruned to <= 64 fp32 per thread.
    _GEMV_CONFIGS = _configs(("BLOCK_K",), [
        (64, 4, 4),
        (128, 8, 4),
        (128, 8, 3),
        (256, 16, 3),
        (128, 16, 4),
        (32, 4, 4),
        (64, 16, 4),  # M = 4
        (32, 16, 4),  # M = 8
    ])
    # Split-K: heads x SPLIT_K programs (0.6B: 128-512 for 132 SMs), each streaming a
    # 128 x K / SPLIT_K slice of W (64 KB at K = 1024, SPLIT_K = 4); same register prune as GEMV.
    _SPLITK_CONFIGS = _configs(("BLOCK_K", "SPLIT_K"), [
        (64, 4, 4, 4),
        (128, 4, 8, 3),
        (64, 8, 4, 2),
        (128, 8, 8, 2),
        (64, 16, 4, 1),
        (32, 8, 4, 4),  # M = 2
        (32, 8, 8, 4),  # M = 4
        (16, 8, 8, 4),  # M = 8
    ])
    # BLOCK_N is the head (128 for Qwen3): a W tile is BLOCK_K x 128, 16-64 KB per stage.
    _DECODE_CONFIGS = _configs(("BLOCK_K",), [
        (64, 4, 4),
        (128, 4, 4),
        (128, 8, 4),
        (256, 8, 3),
    ])
    _PREFILL_CONFIGS = _configs(("BLOCK_M", "BLOCK_K", "GROUP_M"), [
        (128, 64, 8, 8, 3),
        (128, 64, 8, 8, 4),
        (64, 64, 8, 4, 4),
        (64, 64, 8, 4, 3),
    ])


@triton.jit
def _qkv_epilogue(
    acc, head, offs_m, M, v_rstd, qk_eps_rows,
    Q, KC, VC, SLOTS, POS, COS_SIN, QW, KW, num_q_heads, num_kv_heads,
    stride_qm, stride_qh, stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, stride_cs,
    QK_NORM: tl.constexpr, HEAD_DIM: tl.constexpr, CACHE_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """One head of qkv for BLOCK_M rows (``acc``, fp32 [BLOCK_M, HEAD_DIM]): v gets ``* v_rstd``
    and goes to the cache; q, k get their head RMSNorm with ``qk_eps_rows`` as eps (QK_NORM, else
    ``* v_rstd`` as v), RoPE; k to the cache, q out."""
    HALF: tl.constexpr = HEAD_DIM // 2
    mask_m = offs_m < M
    slot = tl.load(SLOTS + offs_m, mask=mask_m, other=-1).to(tl.int64)  # int64: block * stride can pass 2**31
    cache_block, cache_offset = slot // CACHE_BLOCK, slot % CACHE_BLOCK
    mask_cache = (mask_m & (slot >= 0))[:, None]
    if head >= num_q_heads + num_kv_heads:
        v = acc * v_rstd[:, None]
        v_head = head - num_q_heads - num_kv_heads
        cols = tl.arange(0, HEAD_DIM)[None, :]
        dst = VC + cache_block[:, None] * stride_vcb + cache_offset[:, None] * stride_vcs + v_head * stride_vch
        tl.store(dst + cols, v.to(VC.dtype.element_ty), mask=mask_cache)
    else:
        a1, a2 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
        d = tl.arange(0, HALF)[None, :]
        if QK_NORM:
            head_mean_sq = (tl.sum(a1 * a1, axis=1) + tl.sum(a2 * a2, axis=1)) / HEAD_DIM
            rstd = tl.rsqrt(head_mean_sq + qk_eps_rows)[:, None]
            if head < num_q_heads:
                g1 = tl.load(QW + d).to(tl.float32)
                g2 = tl.load(QW + HALF + d).to(tl.float32)
            else:
                g1 = tl.load(KW + d).to(tl.float32)
                g2 = tl.load(KW + HALF + d).to(tl.float32)
            n1 = a1 * rstd * g1
            n2 = a2 * rstd * g2
        else:
            n1 = a1 * v_rstd[:, None]
            n2 = a2 * v_rstd[:, None]
        pos = tl.load(POS + offs_m, mask=mask_m, other=0).to(tl.int64)[:, None]
        cos = tl.load(COS_SIN + pos * stride_cs + d, mask=mask_m[:, None], other=0.0)
        sin = tl.load(COS_SIN + pos * stride_cs + HALF + d, mask=mask_m[:, None], other=0.0)
        out1 = n1 * cos - n2 * sin
        out2 = n2 * cos + n1 * sin
        if head < num_q_heads:
            dst = Q + offs_m.to(tl.int64)[:, None] * stride_qm + head * stride_qh
            tl.store(dst + d, out1.to(Q.dtype.element_ty), mask=mask_m[:, None])
            tl.store(dst + HALF + d, out2.to(Q.dtype.element_ty), mask=mask_m[:, None])
        else:
            k_head = head - num_q_heads
            dst = KC + cache_block[:, None] * stride_kcb + cache_offset[:, None] * stride_kcs + k_head * stride_kch
            tl.store(dst + d, out1.to(KC.dtype.element_ty), mask=mask_cache)
            tl.store(dst + HALF + d, out2.to(KC.dtype.element_ty), mask=mask_cache)


@triton.jit
def _split_k_sum(acc, sumsq, head, split, PARTIALS, SUMSQ, TICKETS,
                 SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Publish this program's partial ``acc`` [BLOCK_M, HEAD_DIM] and ``sumsq`` [BLOCK_M]; returns
    the sums over the head's SPLIT_K programs and whether this program arrived last (only then are
    the sums complete). The last one also re-arms the head's ticket for the next launch."""
    rows = tl.arange(0, BLOCK_M)
    first = head * SPLIT_K * BLOCK_M  # this head's rows of the workspace: [SPLIT_K, BLOCK_M]
    tile = rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(PARTIALS + (first + split * BLOCK_M) * HEAD_DIM + tile, acc)
    tl.store(SUMSQ + first + split * BLOCK_M + rows, sumsq)
    # All threads' stores before the ticket: bar.sync, then the atomic's release (GPU scope).
    tl.debug_barrier()
    ticket = tl.atomic_add(TICKETS + head, 1, sem="acq_rel")
    tl.debug_barrier()  # the acquire (one thread) before any thread's loads
    is_last = ticket == SPLIT_K - 1
    load_rows = rows < tl.where(is_last, BLOCK_M, 0)  # all rows or none (a tensor mask, for the interpreter)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        # .cg: the other programs' partials are in L2; this SM's L1 may hold none or stale lines.
        acc += tl.load(PARTIALS + (first + s * BLOCK_M) * HEAD_DIM + tile, mask=load_rows[:, None], other=0.0,
                       cache_modifier=".cg")
        sumsq += tl.load(SUMSQ + first + s * BLOCK_M + rows, mask=load_rows, other=0.0, cache_modifier=".cg")
    tl.store(TICKETS + head, 0, mask=is_last)  # every program of this launch has taken its ticket
    return acc, sumsq, is_last


@triton.jit
def rmsnorm_qkv_kernel(
    X, R, H, W, Q, KC, VC, SLOTS, POS, COS_SIN, QW, KW, PARTIALS, SUMSQ, TICKETS,
    M, K, M_BUCKET,  # M_BUCKET: only read by the autotuners' keys
    num_q_heads, num_kv_heads,
    stride_xm, stride_rm, stride_hm, stride_wn, stride_qm, stride_qh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, stride_cs,
    eps, qk_eps,
    HAS_RESIDUAL: tl.constexpr, PRECISION: tl.constexpr, GEMV: tl.constexpr, QK_NORM: tl.constexpr,
    HEAD_DIM: tl.constexpr, CACHE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    num_heads = num_q_heads + 2 * num_kv_heads  # qkv columns: q heads, k heads, v heads
    pid_m, head = _tile_ids(M, num_heads, BLOCK_M, GROUP_M)
    # K slice of this program (grid axis 1, SPLIT_K wide): whole BLOCK_K tiles, the last slice short
    # or empty. Head 0's programs write h, each for its own slice, so every h element once.
    split = tl.program_id(1)
    k_slice = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = split * k_slice
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = head * HEAD_DIM + tl.arange(0, HEAD_DIM)
    w_rows = offs_n.to(tl.int64) * stride_wn
    acc, _, sumsq = _norm_matmul(
        X, R, H, W, offs_m, w_rows, w_rows, offs_n < num_heads * HEAD_DIM, M, k_start,
        tl.minimum(k_start + k_slice, K), tl.where(head == 0, M, 0), stride_xm, stride_rm, stride_hm,
        HAS_RESIDUAL, False, PRECISION, GEMV, BLOCK_M, HEAD_DIM, BLOCK_K, USE_PDL,
    )
    # The split-K workspace and tickets are touched only after _norm_matmul's gdc_wait: the previous
    # launch that used them has completed by then (each kernel of the chain waits for its predecessor).
    is_last = True
    if SPLIT_K > 1:
        acc, sumsq, is_last = _split_k_sum(acc, sumsq, head, split, PARTIALS, SUMSQ, TICKETS,
                                           SPLIT_K, BLOCK_M, HEAD_DIM)
    if is_last:
        # With QK-norm, q and k skip r; their eps is scaled by 1 / r**2 = mean(h**2) + eps instead (exact).
        mean_sq = sumsq / K
        _qkv_epilogue(acc, head, offs_m, M, tl.rsqrt(mean_sq + eps), qk_eps * (mean_sq + eps),
                      Q, KC, VC, SLOTS, POS, COS_SIN, QW, KW, num_q_heads, num_kv_heads,
                      stride_qm, stride_qh, stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                      stride_cs, QK_NORM, HEAD_DIM, CACHE_BLOCK, BLOCK_M)


@triton.jit
def qkv_epilogue_kernel(
    QKV, Q, KC, VC, SLOTS, POS, COS_SIN, QW, KW,
    M, num_q_heads, num_kv_heads,
    stride_m, stride_qm, stride_qh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, stride_cs,
    qk_eps,
    QK_NORM: tl.constexpr, HEAD_DIM: tl.constexpr, CACHE_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """The cuBLAS route's second kernel: the same epilogue on a qkv that is already normalised
    (``F.linear(normed rows, W_folded)``), so v gets no factor and q, k use plain qk_eps."""
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = head * HEAD_DIM + tl.arange(0, HEAD_DIM)
    acc = tl.load(QKV + offs_m.to(tl.int64)[:, None] * stride_m + cols[None, :], mask=(offs_m < M)[:, None],
                  other=0.0).to(tl.float32)
    ones = tl.full((BLOCK_M,), 1.0, tl.float32)
    _qkv_epilogue(acc, head, offs_m, M, ones, ones * qk_eps,
                  Q, KC, VC, SLOTS, POS, COS_SIN, QW, KW, num_q_heads, num_kv_heads,
                  stride_qm, stride_qh, stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                  stride_cs, QK_NORM, HEAD_DIM, CACHE_BLOCK, BLOCK_M)


def _fits_registers(configs, named_args, **meta):
    """GEMV: drop configs whose [BLOCK_M, HEAD_DIM, BLOCK_K] product exceeds 64 fp32 per thread."""
    if not meta.get("GEMV"):
        return configs
    head_dim = meta.get("HEAD_DIM", 128)
    size = {c: meta["BLOCK_M"] * head_dim * c.kwargs["BLOCK_K"] / (32 * c.num_warps) for c in configs}
    fits = [c for c in configs if size[c] <= 64]
    return fits or [min(configs, key=size.get)]


_KEY = ["M_BUCKET", "num_q_heads", "num_kv_heads", "K", "HAS_RESIDUAL", "QK_NORM"]
_PRUNE = {"early_config_prune": _fits_registers}
_gemv_kernel = triton.autotune(configs=_GEMV_CONFIGS, key=_KEY, prune_configs_by=_PRUNE,
                               do_bench=graph_bench)(rmsnorm_qkv_kernel)
_splitk_kernel = triton.autotune(configs=_SPLITK_CONFIGS, key=_KEY, prune_configs_by=_PRUNE,
                                 do_bench=graph_bench)(rmsnorm_qkv_kernel)
_decode_kernel = triton.autotune(configs=_DECODE_CONFIGS, key=_KEY)(rmsnorm_qkv_kernel)
_prefill_kernel = triton.autotune(configs=_PREFILL_CONFIGS, key=_KEY)(rmsnorm_qkv_kernel)
EPILOGUE_BLOCK_M = 16  # rows per program of the cuBLAS route's epilogue kernel


def kernel_for(m: int, path: str | None = None):
    """As ``rmsnorm_linear.kernel_for`` (the same dispatch rule), plus "splitk"."""
    if path_for(m, path, QKV_PATHS) == "splitk":
        return _splitk_kernel, {"BLOCK_M": triton.next_power_of_2(m), "GROUP_M": 1, "GEMV": True}
    kernel, meta = select_kernel(m, path, _gemv_kernel, _decode_kernel, _prefill_kernel)
    return kernel, {**meta, "SPLIT_K": 1}


_SPLITK_BUFFERS = {}


def _splitk_buffers(device, num_heads, head_dim):
    """(partials, sums of squares, tickets): the split-K workspace, sized for any config and M, and
    one int32 ticket per head, zeroed once here and re-armed by the kernel. Allocated on the first
    call and reused, so CUDA graphs captured after it replay with the same buffers."""
    key = (device, num_heads, head_dim)
    if key not in _SPLITK_BUFFERS:
        rows = num_heads * max(c.kwargs["SPLIT_K"] for c in _SPLITK_CONFIGS) * GEMV_MAX_ROWS
        _SPLITK_BUFFERS[key] = (torch.empty(rows * head_dim, dtype=torch.float32, device=device),
                                torch.empty(rows, dtype=torch.float32, device=device),
                                torch.zeros(num_heads, dtype=torch.int32, device=device))
    return _SPLITK_BUFFERS[key]


def _check_args(op, x, w_folded, residual, q_norm_weight, k_norm_weight, cos_sin, positions, k_cache, v_cache,
                slot_mapping):
    _check_cache(op, k_cache, v_cache)
    if x.dim() != 2 or w_folded.dim() != 2 or x.shape[1] != w_folded.shape[1] or x.shape[1] == 0:
        raise ValueError(f"{op}: x {tuple(x.shape)} must be [M, K] and w_folded {tuple(w_folded.shape)} [N, K]")
    num_kv_heads, head_dim = k_cache.shape[2:]
    num_q_heads = w_folded.shape[0] // head_dim - 2 * num_kv_heads
    if w_folded.shape[0] % head_dim or num_q_heads < num_kv_heads or num_q_heads % num_kv_heads:
        raise ValueError(f"{op}: w_folded has {w_folded.shape[0]} rows; expected (Hq + 2 * {num_kv_heads}) * "
                         f"{head_dim} with Hq a multiple of the cache's {num_kv_heads} KV heads")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"{op}: residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError(f"{op}: q_norm_weight and k_norm_weight must both be given (QK-norm) or both be None")
    norms = {} if q_norm_weight is None else dict(q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight)
    for name, t in norms.items():
        if t.shape != (head_dim,):
            raise ValueError(f"{op}: {name} {tuple(t.shape)} must be [head_dim={head_dim}]")
    tensors = dict(x=x, w_folded=w_folded, **norms, k_cache=k_cache, v_cache=v_cache)
    check_tensors(op, **tensors, **({} if residual is None else {"residual": residual}))
    if cos_sin.dim() != 2 or cos_sin.shape[1] != head_dim or cos_sin.dtype != torch.float32:
        raise ValueError(f"{op}: cos_sin must be an fp32 [max_position, head_dim={head_dim}] table, got "
                         f"{tuple(cos_sin.shape)} {cos_sin.dtype}")
    check_tensors(op, cos_sin=cos_sin)
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping)):
        if t.shape != x.shape[:1] or t.dtype not in INDEX_DTYPES or not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be a contiguous [M={x.shape[0]}] int32/int64 tensor, got "
                             f"{tuple(t.shape)} {t.dtype}")
    for name, t in (("cos_sin", cos_sin), ("positions", positions), ("slot_mapping", slot_mapping)):
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    return num_q_heads


def rmsnorm_qkv_rope_store(
    x: torch.Tensor,
    w_folded: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    qk_eps: float | None,
    cos_sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    path: str | None = None,
):
    """The attention input: returns q ``[M, Hq, D]`` (normed, rotated) and stores k, v.

    ``h = x (+ residual)``; ``qkv = rmsnorm(h) @ W.T`` with ``w_folded = fold_rmsnorm_weight(
    input_layernorm.weight, W_qkv)`` ([(Hq + 2 Hkv) * D, K], rows q heads, k heads, v heads);
    ``q = rope(q_norm(q))``, ``k = rope(k_norm(k))`` (Qwen3; with ``q_norm_weight``,
    ``k_norm_weight`` and ``qk_eps`` None there is no QK-norm: ``q = rope(q)``) with ``cos_sin`` [max_position, D] (cos
    then sin, fp32) at ``positions`` [M]; k, v written to the ``[blocks, block_size, Hkv, D]``
    caches at ``slot_mapping`` [M] (-1: skipped). With a residual returns ``(q, h)``.
    ``path``: as in ``rmsnorm_linear``, plus "splitk" (M <= GEMV_MAX_ROWS, module docstring). None
    dispatches as ``rmsnorm_linear`` does, with "splitk" for the GEMV rows: H100 (NOTES.md) one head
    per program (path "gemv") leaves most SMs idle (0.6B qkv, M = 1: 18.4 us, against 10.1 us for
    "cublas", the unfused route: row kernel, cuBLAS qkv, then ``qkv_epilogue_kernel``).
    """
    op = "rmsnorm_qkv_rope_store"
    num_q_heads = _check_args(op, x, w_folded, residual, q_norm_weight, k_norm_weight, cos_sin, positions,
                              k_cache, v_cache, slot_mapping)
    if not use_triton(x):
        return rmsnorm_qkv_rope_store_ref(x, w_folded, eps, residual, q_norm_weight, k_norm_weight, qk_eps, cos_sin,
                                          positions, k_cache, v_cache, slot_mapping)
    m, k = x.shape
    num_kv_heads, head_dim = k_cache.shape[2:]
    qk_norm = q_norm_weight is not None
    qk_eps = qk_eps if qk_norm else 0.0  # read only with QK-norm
    q = torch.empty((m, num_q_heads, head_dim), dtype=x.dtype, device=x.device)
    h = torch.empty_like(x) if residual is not None else None
    path = path_for(m, path, QKV_PATHS)
    cache_args = (*k_cache.stride()[:3], *v_cache.stride()[:3], cos_sin.stride(0))
    if m > 0 and path == "cublas":
        normed, h_route, _ = norm_rows(x, residual, eps)
        if h is not None:
            h = h_route
        qkv = torch.nn.functional.linear(normed, w_folded)
        grid = (triton.cdiv(m, EPILOGUE_BLOCK_M), num_q_heads + 2 * num_kv_heads)
        qkv_epilogue_kernel[grid](
            qkv, q, k_cache, v_cache, slot_mapping, positions, cos_sin, q_norm_weight, k_norm_weight,
            m, num_q_heads, num_kv_heads, qkv.stride(0), q.stride(0), q.stride(1), *cache_args, qk_eps,
            QK_NORM=qk_norm, HEAD_DIM=head_dim, CACHE_BLOCK=k_cache.shape[1], BLOCK_M=EPILOGUE_BLOCK_M,
            num_warps=4,
        )
    elif m > 0:
        kernel, meta = kernel_for(m, path)
        num_heads = num_q_heads + 2 * num_kv_heads
        split_k_buffers = _splitk_buffers(x.device, num_heads, head_dim) if path == "splitk" else (None,) * 3

        def grid(cfg):
            return (triton.cdiv(m, cfg["BLOCK_M"]) * num_heads, cfg["SPLIT_K"])

        kernel[grid](
            x, residual, h, w_folded, q, k_cache, v_cache, slot_mapping, positions, cos_sin,
            q_norm_weight, k_norm_weight, *split_k_buffers,
            m, k, _m_bucket(m), num_q_heads, num_kv_heads,
            x.stride(0), residual.stride(0) if residual is not None else 0, h.stride(0) if h is not None else 0,
            w_folded.stride(0), q.stride(0), q.stride(1), *cache_args,
            eps, qk_eps,
            HAS_RESIDUAL=residual is not None, PRECISION=precision(x.dtype), QK_NORM=qk_norm,
            HEAD_DIM=head_dim, CACHE_BLOCK=k_cache.shape[1], **pdl_launch(x, meta["GEMV"]), **meta,
        )
    return q if residual is None else (q, h)


def rmsnorm_qkv_rope_store_ref(x, w_folded, eps, residual, q_norm_weight, k_norm_weight, qk_eps, cos_sin, positions,
                               k_cache, v_cache, slot_mapping):
    """``rmsnorm_qkv_rope_store`` as the unfused engine path computes it (each step rounded to
    x's dtype, r applied to every column as HF does); fp64 inputs give the exact function."""
    out = rmsnorm_linear_ref(x, w_folded, eps, residual)
    qkv, h = (out, x) if residual is None else out
    num_kv_heads, head_dim = k_cache.shape[2:]
    q, k, v = qkv.view(x.shape[0], -1, head_dim).split([qkv.shape[1] // head_dim - 2 * num_kv_heads,
                                                        num_kv_heads, num_kv_heads], dim=1)
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
    if q_norm_weight is not None:
        q, k = rmsnorm_ref(q, q_norm_weight, qk_eps), rmsnorm_ref(k, k_norm_weight, qk_eps)
    q, k = rope_ref(q, cos, sin), rope_ref(k, cos, sin)
    store_kvcache_ref(k, v, k_cache, v_cache, slot_mapping)
    return q if residual is None else (q, h)
