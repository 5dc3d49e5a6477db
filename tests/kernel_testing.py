"""What the kernel test modules share: running Triton's interpreter on CPU, and outputs that
start as NaN so an element a kernel never writes fails the test.

Triton picks the interpreter when it is first imported. A kernel test module calls
``select_interpreter()`` before importing ``kernels``; if another module imported Triton
first (a full `pytest` run), its ``test_cpu_kernels_in_fresh_process`` calls
``rerun_in_interpreter(__file__)`` to run the module again in a new process instead.
"""
import os
import subprocess
import sys

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
# Kernels and references compute in fp32, whose rsqrt may be off by an ulp or two for a whole
# row: error bounds allow that much on top of their factor.
SLACK = 4 * torch.finfo(torch.float32).eps


def select_interpreter():
    if not torch.cuda.is_available() and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def rerun_in_interpreter(test_file: str):
    root = os.path.dirname(os.path.dirname(os.path.abspath(test_file)))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not gpu", "-p", "no:cacheprovider", test_file],
                         cwd=root, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


def kernel_test_setup(test_file: str):
    """For a module of kernel tests, after it imported ``kernels``: whether the kernels run here
    (on the GPU, or under the interpreter), the ``runs_kernels`` skip mark (without it a CPU run
    would compare the torch reference with itself), and the test that reruns the module in a
    fresh interpreter process when they do not."""
    from kernels.guard import HAVE_TRITON, use_triton
    on_triton = use_triton(torch.empty(0, device=DEVICE))
    runs_kernels = pytest.mark.skipif(not on_triton, reason="kernels would run their torch references here; "
                                                            "test_cpu_kernels_in_fresh_process runs this test")

    def test_cpu_kernels_in_fresh_process():
        if on_triton or not HAVE_TRITON:
            pytest.skip("the kernel tests run in this process" if on_triton else "Triton is not installed")
        rerun_in_interpreter(test_file)

    return on_triton, runs_kernels, test_cpu_kernels_in_fresh_process


def rel_err(y: torch.Tensor, exact: torch.Tensor) -> float:
    return ((y.double() - exact).norm() / exact.norm()).item()


def poisoned(fn, *args, **kwargs):
    """Call ``fn`` with every torch.empty NaN-filled, so unwritten outputs show up."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)


def assert_no_worse(y, baseline, exact, what="kernel", slack=SLACK, factor=1.1):
    """``y`` fully written and its error against ``exact`` within ``factor`` times that of the
    unfused ``baseline`` in the same dtype, plus ``slack``."""
    assert not y.isnan().any(), f"{what}: elements left unwritten (NaN poison)"
    err, base = rel_err(y, exact), rel_err(baseline, exact)
    assert err <= factor * base + slack, f"{what}: error {err:.3e} vs unfused {base:.3e}"


def randn(*shape, dtype, device=DEVICE, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).to(dtype)


def norm_linear_inputs(M, N, K, dtype, device=DEVICE):
    """x, residual [M, K], the norm's gamma [K] and W [N, K] of a norm + linear test."""
    x = randn(M, K, dtype=dtype, device=device)
    residual = randn(M, K, dtype=dtype, device=device)
    gamma = (1 + 0.2 * torch.randn(K, device=device)).to(dtype)
    w = randn(N, K, dtype=dtype, device=device, scale=K**-0.5)
    return x, residual, gamma, w


def unfused_and_exact(h, gamma, w, w_folded, rms_cols_start):
    """The unfused torch path on h (RMSNorm with gamma, then the linear) in h's dtype, and the same in fp64.
    Columns before rms_cols_start (q, k) skip the norm in the fused op, so both take h @ W'^T there."""
    from kernels import rmsnorm_ref  # not at import: the test modules pick the interpreter before kernels loads
    unfused = torch.nn.functional.linear(rmsnorm_ref(h, gamma, EPS), w)
    unfused[:, :rms_cols_start] = torch.nn.functional.linear(h, w_folded[:rms_cols_start])
    exact = torch.nn.functional.linear(rmsnorm_ref(h.double(), gamma.double(), EPS), w.double())
    exact[:, :rms_cols_start] = h.double() @ (w.double() * gamma.double())[:rms_cols_start].T
    return unfused, exact
