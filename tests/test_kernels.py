"""Tests of kernels/: RMSNorm, add + RMSNorm and RMSNorm fused into a linear layer.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (fp32 and fp16
only: the interpreter's bf16 is not faithful). With a GPU the same tiny, awkward shapes
run compiled on CUDA, and the ``gpu`` tests add bf16/fp16 at the benchmark shapes.

Accuracy criterion: relative Frobenius error against an fp64 evaluation of the same
function must not exceed that of the plain-torch unfused path in the same dtype, with a
small slack. Outputs are allocated NaN-filled, so an element the kernel never writes
fails the test.
"""
import pytest
import torch

from tests.kernel_testing import (DEVICE, EPS, assert_no_worse, kernel_test_setup, norm_linear_inputs, poisoned,
                                  randn, select_interpreter, unfused_and_exact)

select_interpreter()

from kernels import (  # noqa: E402
    add_rmsnorm,
    fold_rmsnorm_weight,
    linear,
    rmsnorm,
    rmsnorm_linear,
    rmsnorm_linear_ref,
    rmsnorm_ref,
)
from kernels.rmsnorm_linear import path_for  # noqa: E402
from kernels.shapes import MODELS, TEST_MS, TEST_NKS, linear_ops, ms_for, ops  # noqa: E402

ON_TRITON, runs_kernels, test_cpu_kernels_in_fresh_process = kernel_test_setup(__file__)



# ---------------------------------------------------------------- rmsnorm, add_rmsnorm


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 37), (3, 128), (2, 17, 96)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm(shape, dtype, with_residual):
    torch.manual_seed(0)
    x, residual = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype, scale=3.0)
    gamma = (1 + 0.2 * torch.randn(shape[-1], device=DEVICE)).to(dtype)
    if with_residual:
        h_expected = x + residual
        y, h = poisoned(add_rmsnorm, x, residual, gamma, EPS)
        assert h is residual and torch.equal(residual, h_expected), "h must be written into residual"
    else:
        h_expected = x
        y = poisoned(rmsnorm, x, gamma, EPS)
    baseline = rmsnorm_ref(h_expected, gamma, EPS)
    torch.testing.assert_close(y, baseline)
    exact = rmsnorm_ref(h_expected.double(), gamma.double(), EPS)
    assert_no_worse(y, baseline, exact)


def test_rmsnorm_ref_matches_hf_qwen3():
    # Also proves that importing kernels first leaves transformers importable.
    modeling = pytest.importorskip("transformers.models.qwen3.modeling_qwen3")
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = randn(5, 64, dtype=dtype, device="cpu", scale=4.0)
        norm = modeling.Qwen3RMSNorm(64, eps=EPS)
        norm.weight.data = 1 + 0.2 * torch.randn(64)
        norm.to(dtype)
        with torch.no_grad():
            assert torch.equal(rmsnorm_ref(x, norm.weight, EPS), norm(x))


def test_rmsnorm_rejects_bad_inputs():
    x = randn(4, 32, dtype=torch.float16)
    gamma = torch.ones(32, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="gamma"):
        rmsnorm(x, gamma[:31])
    with pytest.raises(ValueError, match="dtype"):
        rmsnorm(x, gamma.float())
    with pytest.raises(ValueError, match="dtype"):
        rmsnorm(x.double(), gamma.double())
    with pytest.raises(ValueError, match="contiguous"):
        rmsnorm(randn(32, 4, dtype=torch.float16).t(), gamma)
    with pytest.raises(ValueError, match="residual"):
        add_rmsnorm(x, randn(4, 64, dtype=torch.float16)[:, ::2], gamma)
    with pytest.raises(ValueError, match="residual"):
        add_rmsnorm(x, randn(5, 32, dtype=torch.float16), gamma)


# ------------------------------------------------------------------- rmsnorm_linear


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("N,K", TEST_NKS)
@pytest.mark.parametrize("M", TEST_MS)
def test_rmsnorm_linear(M, N, K, with_residual, dtype):
    torch.manual_seed(M * 1000 + N)
    x, residual, gamma, w = norm_linear_inputs(M, N, K, dtype)
    w_folded = fold_rmsnorm_weight(gamma, w)
    x_before, residual_before = x.clone(), residual.clone()
    if with_residual:
        y, h = poisoned(rmsnorm_linear, x, w_folded, EPS, residual)
        assert torch.equal(h, x_before + residual_before), "h must be x + residual in the model dtype"
        assert torch.equal(residual, residual_before), "residual must not be modified"
    else:
        y = poisoned(rmsnorm_linear, x, w_folded, EPS)
    assert torch.equal(x, x_before)
    h = x + residual if with_residual else x

    # Against the same function (folded weight) evaluated in fp64.
    baseline = rmsnorm_linear_ref(h, w_folded, EPS)
    exact = rmsnorm_linear_ref(h.double(), w_folded.double(), EPS)
    assert_no_worse(y, baseline, exact)

    # Against HF semantics: RMSNorm with gamma, then the unfolded linear. Folding rounds
    # W * gamma once, which on these few-element outputs can cost a little: 1.5x.
    hf_unfused = torch.nn.functional.linear(rmsnorm_ref(h, gamma, EPS), w)
    hf_exact = torch.nn.functional.linear(rmsnorm_ref(h.double(), gamma.double(), EPS), w.double())
    assert_no_worse(y, hf_unfused, hf_exact, factor=1.5)


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [3, 80])
@pytest.mark.parametrize("rms_cols_start", [0, 13, 64, 96])
def test_rmsnorm_linear_column_split(M, rms_cols_start, dtype):
    N, K = 96, 72
    torch.manual_seed(rms_cols_start)
    x, residual, gamma, w = norm_linear_inputs(M, N, K, dtype)
    w_folded = fold_rmsnorm_weight(gamma, w)
    y, h = poisoned(rmsnorm_linear, x, w_folded, EPS, residual, rms_cols_start)
    baseline = rmsnorm_linear_ref(h, w_folded, EPS, rms_cols_start=rms_cols_start)
    exact = rmsnorm_linear_ref(h.double(), w_folded.double(), EPS, rms_cols_start=rms_cols_start)
    assert_no_worse(y, baseline, exact)
    # Columns before the split are the plain projection: no per-row factor at all.
    plain = h.double() @ w_folded.double()[:rms_cols_start].T
    torch.testing.assert_close(y[:, :rms_cols_start].double(), plain, rtol=2e-3, atol=2e-3)


def test_fold_rmsnorm_weight():
    gamma = torch.tensor([0.5, 2.0, 3.0], dtype=torch.bfloat16)
    w = torch.tensor([[1.0, 1.0, 1.0], [0.3, -0.7, 1.1]], dtype=torch.bfloat16)
    w_folded = fold_rmsnorm_weight(gamma, w)
    assert w_folded.dtype == torch.bfloat16
    assert torch.equal(w_folded, (w.float() * gamma.float()).bfloat16())
    with pytest.raises(ValueError):
        fold_rmsnorm_weight(gamma[:2], w)


def test_rmsnorm_linear_rejects_bad_inputs():
    x = randn(4, 32, dtype=torch.float16)
    w = randn(8, 32, dtype=torch.float16)
    cases = [
        ((x[0], w), "must be"),
        ((x, w[:, :16]), "K mismatch"),
        ((x, w.float()), "dtype"),
        ((x.double(), w.double()), "dtype"),
        ((x.int(), w.int()), "dtype"),
        ((randn(32, 4, dtype=torch.float16).t(), w), "contiguous"),
        ((x, randn(32, 8, dtype=torch.float16).t()), "contiguous"),
        ((x, w.to("meta")), "is on"),
        ((x, w, EPS, x[:3]), "residual"),
        ((x, w, EPS, x.float()), "dtype"),
        ((x, w, EPS, None, 9), "rms_cols_start"),
        ((x, w, EPS, None, -1), "rms_cols_start"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            rmsnorm_linear(*args)


@runs_kernels
def test_rmsnorm_linear_accepts_row_strides():
    # Rows may be padded (a slice of a wider buffer); only K must be contiguous.
    torch.manual_seed(0)
    x = randn(17, 64, dtype=torch.float16)[:, :40]
    residual = randn(17, 48, dtype=torch.float16)[:, :40]
    w = randn(37, 56, dtype=torch.float16, scale=0.2)[:, :40]
    y, h = poisoned(rmsnorm_linear, x, w, EPS, residual)
    y_ref, h_ref = rmsnorm_linear_ref(x, w, EPS, residual)
    assert torch.equal(h, h_ref)
    torch.testing.assert_close(y, y_ref, rtol=2e-3, atol=2e-3)


# -------------------------------------------------------------- linear (no norm)


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,K", TEST_NKS)
@pytest.mark.parametrize("M", [1, 3])
def test_linear(M, N, K, dtype):
    # M = 1 runs the GEMV kernel, M = 3 cuBLAS (F.linear): both against fp64.
    torch.manual_seed(M * 1000 + N)
    x, w = randn(M, K, dtype=dtype), randn(N, K, dtype=dtype, scale=K**-0.5)
    y = poisoned(linear, x, w)
    assert y.shape == (M, N) and y.dtype == dtype
    assert_no_worse(y, torch.nn.functional.linear(x, w), x.double() @ w.double().T)


def test_linear_rejects_bad_inputs():
    x, w = randn(1, 32, dtype=torch.float16), randn(8, 32, dtype=torch.float16)
    cases = [((x[0], w), "must be"), ((x, w[:, :16]), "must be"), ((x[:, :0], w[:, :0]), "K > 0"),
             ((x, w.float()), "dtype"), ((x, randn(32, 8, dtype=torch.float16).t()), "contiguous"),
             ((x, w.to("meta")), "is on")]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            linear(*args)


# ------------------------------------------------------------- GPU, benchmark shapes

GPU_MS = (1, 16, 256, 1024)
GPU_OPS = [(op, m) for model in MODELS for op in ops(model) for m in ms_for(op, GPU_MS)]
CHECK_ROWS = 256  # rows compared in fp64; each row is computed independently


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op,M", GPU_OPS, ids=[f"{o.model}-{o.op}-M{m}" for o, m in GPU_OPS])
def test_rmsnorm_linear_gpu(op, M, dtype):
    torch.manual_seed(M)
    x, residual, gamma, w = norm_linear_inputs(M, op.N, op.K, dtype, device="cuda")
    w_folded = fold_rmsnorm_weight(gamma, w)
    y, h = poisoned(rmsnorm_linear, x, w_folded, EPS, residual, op.rms_cols_start)
    assert not y.isnan().any()
    assert torch.equal(h, x + residual)
    rows = slice(0, CHECK_ROWS)
    unfused, exact = unfused_and_exact(h[rows], gamma, w, w_folded, op.rms_cols_start)
    assert_no_worse(y[rows], unfused, exact, slack=1e-4)


LINEAR_GPU_OPS = [(op, m) for model in MODELS for op in linear_ops(model) for m in (1, 16)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op,M", LINEAR_GPU_OPS, ids=[f"{o.model}-{o.op}-M{m}" for o, m in LINEAR_GPU_OPS])
def test_linear_gpu(op, M, dtype):
    torch.manual_seed(M)
    x, w = randn(M, op.K, dtype=dtype), randn(op.N, op.K, dtype=dtype, scale=op.K**-0.5)
    y = poisoned(linear, x, w)
    assert_no_worse(y, torch.nn.functional.linear(x, w), x.double() @ w.double().T, slack=1e-4)


@pytest.mark.gpu
def test_graph_bench_times_reads_from_dram_not_the_l2():
    """The GEMV autotuners' timing: a read of a buffer a fifth of the L2 takes longer with the L2 flushed
    before each call than replayed back to back (where it stays in the L2), and no faster than 10 TB/s,
    above any HBM's rate."""
    from triton.testing import do_bench_cudagraph

    from kernels.guard import graph_bench
    l2 = torch.cuda.get_device_properties().L2_cache_size
    buf = torch.randn(l2 // 5 // 4, device="cuda")
    out = torch.empty((), device="cuda")

    def read():
        torch.sum(buf, dim=0, out=out)

    cold_ms = graph_bench(read, quantiles=(0.5, 0.2, 0.8))
    hot_ms = do_bench_cudagraph(read, return_mode="median")
    assert len(cold_ms) == 3 and 0 < cold_ms[1] <= cold_ms[0] <= cold_ms[2]
    assert cold_ms[0] > hot_ms
    assert cold_ms[0] * 1e-3 > buf.numel() * 4 / 10e12  # no HBM reads 10 TB/s


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 256, 8192])
@pytest.mark.parametrize("N", [128, 1024, 4096])
def test_rmsnorm_gpu(M, N, dtype):
    torch.manual_seed(N)
    x, residual = randn(M, N, dtype=dtype), randn(M, N, dtype=dtype, scale=3.0)
    gamma = (1 + 0.2 * torch.randn(N, device=DEVICE)).to(dtype)
    h_expected = x + residual
    y, h = poisoned(add_rmsnorm, x, residual, gamma, EPS)
    assert torch.equal(h, h_expected)
    assert_within_roundings(y, h_expected, gamma)
    assert_within_roundings(poisoned(rmsnorm, x, gamma, EPS), x, gamma)


def ulp(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` values at |t| (fp64), down to the subnormal spacing."""
    info = torch.finfo(dtype)
    mag = t.double().abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * info.eps


def assert_within_roundings(y, h, gamma):
    """Kernel and reference both compute ``normed = h * rsqrt(mean(h**2) + eps)`` in fp32 and round
    it to the dtype, then round ``gamma * normed`` again (HF's order). Their fp32 sums differ in
    order, so ``normed`` may round to neighbouring values: |y - ref| <= |gamma| * ulp(normed) plus
    half an ulp for each final rounding. Any real error (a wrong row, eps, gamma) is far larger."""
    ref = rmsnorm_ref(h, gamma, EPS)
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)
    dtype = y.dtype
    bound = gamma.double().abs() * ulp(normed, dtype) + (ulp(y, dtype) + ulp(ref, dtype)) / 2
    diff = (y.double() - ref.double()).abs()
    assert not y.isnan().any()
    assert (diff <= bound).all(), f"max excess {(diff - bound).max().item():.3e}"


# Every path on the interpreter, whatever the dispatch rule picks: GEMV at M = 1 (no 3-D
# product), 3 and 5 (padded row block), 8 (full); the tl.dot decode kernel; the tiled kernel
# on one partial and several row blocks; the cuBLAS route.
PATH_CASES = [(1, "gemv"), (3, "gemv"), (5, "gemv"), (8, "gemv"), (1, "dot"), (17, "dot"), (3, "tiled"),
              (80, "tiled"), (1, "cublas"), (80, "cublas")]


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,K", TEST_NKS)
@pytest.mark.parametrize("M,path", PATH_CASES)
def test_rmsnorm_linear_paths(M, path, N, K, dtype):
    torch.manual_seed(M * 1000 + N)
    x, residual, gamma, w = norm_linear_inputs(M, N, K, dtype)
    w_folded = fold_rmsnorm_weight(gamma, w)
    rms_cols_start = N // 3
    y, h = poisoned(rmsnorm_linear, x, w_folded, EPS, residual, rms_cols_start, path=path)
    assert torch.equal(h, x + residual), "h must be x + residual in the model dtype"
    baseline = rmsnorm_linear_ref(h, w_folded, EPS, rms_cols_start=rms_cols_start)
    exact = rmsnorm_linear_ref(h.double(), w_folded.double(), EPS, rms_cols_start=rms_cols_start)
    assert_no_worse(y, baseline, exact)


def test_rmsnorm_linear_rejects_impossible_paths():
    x, w = randn(9, 32, dtype=torch.float16), randn(8, 32, dtype=torch.float16)
    for path in ("gemv", "bogus"):
        with pytest.raises(ValueError, match="path"):
            rmsnorm_linear(x, w, path=path) if ON_TRITON else path_for(9, path)


def test_autotuned_configs_name_each_kernels_choices():
    # What the result files record: every autotuner's cache, by module and kernel name.
    import types

    import triton

    from kernels.guard import autotuned_configs

    @triton.jit
    def _kernel(X, N):
        pass

    configs = [triton.Config({"BLOCK": 16}, num_warps=2), triton.Config({"BLOCK": 64}, num_warps=4)]
    tuned = triton.autotune(configs=configs, key=["N"])(_kernel)
    untouched = triton.autotune(configs=configs, key=["N"])(_kernel)
    tuned.cache[(1024,)] = configs[1]  # as a run would have chosen
    module = types.SimpleNamespace(__name__="kernels.example", tuned=tuned, untouched=untouched, other=3)
    got = autotuned_configs([module])
    assert list(got) == ["kernels.example.tuned"]  # autotuners that chose nothing are left out
    (key, config), = got["kernels.example.tuned"].items()
    assert key == "(1024,)" and "BLOCK: 64" in config and "num_warps: 4" in config
