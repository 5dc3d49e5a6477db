"""The Hopper TMA kernel of RMSNorm + linear (``kernels.rmsnorm_linear_tma``) against fp64 references.

Without a GPU it runs in Triton's interpreter on CPU tensors (fp32, fp16), which implements the
tensor descriptors' zero fill and clipping; on a GPU of compute capability >= 9 the same shapes run
compiled, and the ``gpu`` tests add bf16 at the benchmark's prefill shapes. The accuracy criterion is
tests/test_kernels.py's: no worse against fp64 than the unfused torch path in the same dtype.
"""
import pytest
import torch

from tests.kernel_testing import (DEVICE, EPS, assert_no_worse, kernel_test_setup, norm_linear_inputs, poisoned,
                                  randn, select_interpreter, unfused_and_exact)

select_interpreter()

from kernels import fold_rmsnorm_weight, rmsnorm_linear_ref  # noqa: E402
from kernels.rmsnorm_linear_tma import SUMS_OF_SQUARES, rmsnorm_linear_tma  # noqa: E402
from kernels.shapes import MODELS, TEST_MS, TEST_NKS, ops  # noqa: E402

ON_TRITON, runs_kernels, test_cpu_kernels_in_fresh_process = kernel_test_setup(__file__)
HOPPER = DEVICE == "cuda" and torch.cuda.get_device_capability()[0] >= 9
needs_tma = pytest.mark.skipif(DEVICE == "cuda" and not HOPPER, reason="TMA needs compute capability >= 9")


@runs_kernels
@needs_tma
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("columns", ["all", "a third without r", "none (plain GEMM)"])
@pytest.mark.parametrize("sum_of_squares", SUMS_OF_SQUARES)
@pytest.mark.parametrize("N,K", TEST_NKS)
@pytest.mark.parametrize("M", TEST_MS)
def test_tma_kernel_is_no_worse_than_the_unfused_path(M, N, K, sum_of_squares, columns, with_residual, dtype):
    torch.manual_seed(M * 1000 + N)
    x, residual, gamma, w = norm_linear_inputs(M, N, K, dtype)
    w_folded = fold_rmsnorm_weight(gamma, w)
    rms_cols_start = {"all": 0, "a third without r": N // 3, "none (plain GEMM)": N}[columns]
    x_before, residual_before = x.clone(), residual.clone()
    if with_residual:
        y, h = poisoned(rmsnorm_linear_tma, x, w_folded, EPS, residual, rms_cols_start, sum_of_squares)
        assert torch.equal(h, x_before + residual_before), "h must be x + residual in the model dtype"
    else:
        y, h = poisoned(rmsnorm_linear_tma, x, w_folded, EPS, None, rms_cols_start, sum_of_squares), x
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)
    baseline = rmsnorm_linear_ref(h, w_folded, EPS, rms_cols_start=rms_cols_start)
    exact = rmsnorm_linear_ref(h.double(), w_folded.double(), EPS, rms_cols_start=rms_cols_start)
    assert_no_worse(y, baseline, exact)


@runs_kernels
@needs_tma
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sum_of_squares", SUMS_OF_SQUARES)
@pytest.mark.parametrize("M,N,K", [(3, 40, 40), (80, 96, 72), (17, 38, 24)])  # N / 2 = 19: a gate tile past N
def test_tma_kernel_with_silu_mul_is_no_worse_than_the_unfused_path(M, N, K, sum_of_squares, dtype):
    torch.manual_seed(M * 1000 + N)
    x, residual, gamma, w = norm_linear_inputs(M, N, K, dtype)
    w_folded = fold_rmsnorm_weight(gamma, w)
    y, h = poisoned(rmsnorm_linear_tma, x, w_folded, EPS, residual, 0, sum_of_squares, True)
    assert y.shape == (M, N // 2) and torch.equal(h, x + residual)
    baseline = rmsnorm_linear_ref(h, w_folded, EPS, silu_mul=True)
    exact = rmsnorm_linear_ref(h.double(), w_folded.double(), EPS, silu_mul=True)
    assert_no_worse(y, baseline, exact)


@needs_tma
def test_tma_kernel_rejects_what_tma_cannot_read():
    x, w = randn(9, 40, dtype=torch.float16), randn(8, 40, dtype=torch.float16)
    with pytest.raises(ValueError, match="16-byte"):
        rmsnorm_linear_tma(randn(9, 41, dtype=torch.float16)[:, :40], w)  # an 82-byte row stride
    with pytest.raises(ValueError, match="K"):
        rmsnorm_linear_tma(x, randn(8, 32, dtype=torch.float16))
    with pytest.raises(ValueError, match="dtype"):
        rmsnorm_linear_tma(x, w.float())
    with pytest.raises(ValueError, match="residual"):
        rmsnorm_linear_tma(x, w, residual=randn(3, 40, dtype=torch.float16))
    with pytest.raises(ValueError, match="rms_cols_start"):
        rmsnorm_linear_tma(x, w, rms_cols_start=9)
    with pytest.raises(ValueError, match="sum_of_squares"):
        rmsnorm_linear_tma(x, w, sum_of_squares="epilogue")
    with pytest.raises(ValueError, match="silu_mul"):
        rmsnorm_linear_tma(x, randn(9, 40, dtype=torch.float16), silu_mul=True)
    with pytest.raises(ValueError, match="silu_mul"):
        rmsnorm_linear_tma(x, w, rms_cols_start=2, silu_mul=True)


PREFILL_OPS = [(op, m) for model in MODELS for op in ops(model) if op.op != "lm_head" for m in (128, 2048)]


@pytest.mark.gpu
@needs_tma
@pytest.mark.parametrize("sum_of_squares", SUMS_OF_SQUARES)
@pytest.mark.parametrize("op,M", PREFILL_OPS, ids=[f"{o.model}-{o.op}-M{m}" for o, m in PREFILL_OPS])
def test_tma_kernel_at_prefill_shapes_in_bf16(op, M, sum_of_squares):
    torch.manual_seed(M)
    x, residual, gamma, w = norm_linear_inputs(M, op.N, op.K, torch.bfloat16, device="cuda")
    w_folded = fold_rmsnorm_weight(gamma, w)
    y, h = poisoned(rmsnorm_linear_tma, x, w_folded, EPS, residual, op.rms_cols_start, sum_of_squares)
    assert torch.equal(h, x + residual)
    rows = slice(0, 64)
    unfused, exact = unfused_and_exact(h[rows], gamma, w, w_folded, op.rms_cols_start)
    assert_no_worse(y[rows], unfused, exact, slack=1e-4)


GATE_UP_OPS = [(op, m) for op, m in PREFILL_OPS if op.op == "gate_up"]


@pytest.mark.gpu
@needs_tma
@pytest.mark.parametrize("op,M", GATE_UP_OPS, ids=[f"{o.model}-M{m}" for o, m in GATE_UP_OPS])
def test_tma_kernel_with_silu_mul_at_gate_up_shapes_in_bf16(op, M):
    torch.manual_seed(M)
    x, residual, gamma, w = norm_linear_inputs(M, op.N, op.K, torch.bfloat16, device="cuda")
    w_folded = fold_rmsnorm_weight(gamma, w)
    y, h = poisoned(rmsnorm_linear_tma, x, w_folded, EPS, residual, 0, "row_pass", True)
    rows = slice(0, 64)
    baseline = rmsnorm_linear_ref(h[rows], w_folded, EPS, silu_mul=True)
    exact = rmsnorm_linear_ref(h[rows].double(), w_folded.double(), EPS, silu_mul=True)
    assert_no_worse(y[rows], baseline, exact, slack=1e-4)
