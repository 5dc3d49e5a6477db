"""The PDL code paths (``USE_PDL``, kernels.guard) compute what the plain ones compute: bit for bit under
the interpreter; compiled, within the last bit's rounding (the GEMV's peeled first K step is a separate
fp32 sum to ptxas).

With PDL the GEMVs peel their first K step off the loop (its W tiles are loaded before gdc_wait) and
every kernel waits before its first read. CPU: under Triton's interpreter, which runs one program at a
time in launch order, gdc_wait (counting its calls) and gdc_launch_dependents become no-ops, and
kernels.guard is told that PDL is on. GPU (compute capability >= 9): the kernels launch with PDL.
"""
import pytest
import torch

from tests.kernel_testing import DEVICE, EPS, kernel_test_setup, randn, select_interpreter

select_interpreter()

import kernels  # noqa: E402
from kernels import guard  # noqa: E402
from kernels.paged_attention import paged_attention  # noqa: E402
from tests.test_fused_epilogues import make_qkv_case  # noqa: E402
from tests.test_paged_attention import make_batch  # noqa: E402

ON_TRITON, runs_kernels, test_cpu_kernels_in_fresh_process = kernel_test_setup(__file__)


@pytest.fixture
def pdl_waits(monkeypatch):
    """PDL on for this test; returns a list that counts the interpreter's gdc_wait calls (None on a GPU)."""
    if not guard.INTERPRET:
        if not guard.pdl_enabled(torch.empty(0, device=DEVICE)):
            pytest.skip("this GPU has no programmatic dependent launch (compute capability < 9)")
        return None
    import triton.language.extra.cuda as cuda  # the interpreter runs the kernels as Python: patch what they call
    waits = []
    monkeypatch.setattr(cuda, "gdc_wait", lambda: waits.append(1))
    monkeypatch.setattr(cuda, "gdc_launch_dependents", lambda: None)
    monkeypatch.setattr(guard, "pdl_enabled", lambda t: guard._pdl_on.get())  # guard.pdl(False) still holds
    return waits


def gemv(K, **kwargs):
    x, residual = randn(1, K, dtype=torch.float32), randn(1, K, dtype=torch.float32)
    w = randn(38, K, dtype=torch.float32, scale=K**-0.5)
    return lambda: kernels.rmsnorm_linear(x, w, EPS, residual, **kwargs)


def linear(K):
    x, w = randn(1, K, dtype=torch.float32), randn(37, K, dtype=torch.float32, scale=K**-0.5)
    return lambda: kernels.linear(x, w)


def qkv(K, with_residual):
    case = make_qkv_case(1, 16, 4, 2, torch.float32, K=K)
    residual = randn(1, K, dtype=torch.float32) if with_residual else None

    def call():  # each call stores into fresh copies of the caches: they are outputs too
        caches = dict(k_cache=case["k_cache"].clone(), v_cache=case["v_cache"].clone())
        out = kernels.rmsnorm_qkv_rope_store(**{**case, **caches}, residual=residual)
        return out, caches["k_cache"], caches["v_cache"]
    return call


def attention(num_splits):
    batch = make_batch([(1, k_len) for k_len in (5, 40)], 4, 2, 16, torch.float32, device=DEVICE)
    return lambda: paged_attention(**batch, scale=0.25, decode=True, num_splits=num_splits)


def gumbel():
    logits = randn(3, 5000, dtype=torch.float32)
    temperatures = torch.tensor([0.0, 0.7, 1.3], device=DEVICE)
    keys = torch.randint(0, 2**32, (3,), device=DEVICE)
    return lambda: kernels.gumbel_argmax(logits, temperatures, keys)


def embedding():
    weight, ids = randn(50, 1100, dtype=torch.float32), torch.tensor([3, 49, 0, 3], device=DEVICE)
    return lambda: kernels.embedding(ids, weight)


# Interpreter tiles: GEMV BLOCK_K 32 (K = 72: the peeled step, then two more with a masked tail; K = 24:
# the peeled step alone), split-K qkv BLOCK_K 16 x 3 slices (K = 20: the last slice is empty).
CASES = {
    "gemv_residual": lambda: gemv(72),
    "gemv_one_tile": lambda: gemv(24),
    "gemv_silu_mul": lambda: gemv(40, silu_mul=True),
    "gemv_q_k_skip_rms": lambda: gemv(72, rms_cols_start=16),
    "linear": lambda: linear(72),
    "qkv_splitk_residual": lambda: qkv(40, True),
    "qkv_splitk_empty_slice": lambda: qkv(20, False),
    "attention_split_combine": lambda: attention(3),
    "attention_one_split": lambda: attention(1),
    "gumbel_argmax": gumbel,
    "embedding": embedding,
}


def flat(out):
    return [t for o in out for t in flat(o)] if isinstance(out, (tuple, list)) else [out]


@runs_kernels
@pytest.mark.parametrize("trigger", sorted(guard.PDL_TRIGGERS))
@pytest.mark.parametrize("case", list(CASES))
def test_pdl_path_gives_the_same_bits(case, trigger, pdl_waits, monkeypatch):
    monkeypatch.setattr(guard, "PDL_TRIGGER", trigger)
    torch.manual_seed(0)
    op = CASES[case]()
    with guard.pdl(False):
        plain = flat(op())
    if pdl_waits is not None:
        assert not pdl_waits, "a kernel waited with PDL off"
    with_pdl = flat(op())
    if pdl_waits is not None:
        assert pdl_waits, "no kernel took its PDL path"
    for a, b in zip(plain, with_pdl, strict=True):
        assert not a.is_floating_point() or not a.isnan().any()
        if guard.INTERPRET or not a.is_floating_point():
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(b, a)


def test_pdl_is_off_on_cpu():
    """On CPU, with or without the interpreter, kernels take no PDL arguments: their launches are unchanged."""
    cpu = torch.empty(0)
    assert not guard.pdl_enabled(cpu)
    assert guard.pdl_launch(cpu) == {"USE_PDL": False}


@runs_kernels
def test_an_inner_pdl_block_cannot_turn_pdl_back_on(pdl_waits):
    """The engine's ``pdl(Config.pdl)`` inside the profile's ``pdl(False)`` breakdown launches without PDL."""
    op = CASES["gemv_residual"]()
    with guard.pdl(False), guard.pdl(True):
        assert not guard.pdl_enabled(torch.empty(0, device=DEVICE))
        op()
    if pdl_waits is not None:
        assert not pdl_waits
