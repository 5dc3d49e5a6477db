"""Tests of the unfused engine's one-kernel ops: RoPE on q and k, SiLU(gate) * up, and RMSNorm over
heads read in place from the qkv output (QK-norm without a copy).

As in test_kernels.py: the interpreter on CPU (fp32, fp16), compiled on a GPU; fp64 references;
NaN-poisoned outputs.
"""
import pytest
import torch

from tests.kernel_testing import DEVICE, EPS, assert_no_worse, kernel_test_setup, poisoned, randn, select_interpreter

select_interpreter()

from kernels import rmsnorm, rmsnorm_ref, rope, rope_ref, silu_mul, silu_mul_ref  # noqa: E402
from kernels.shapes import TEST_MS  # noqa: E402

ON_TRITON, runs_kernels, test_cpu_kernels_in_fresh_process = kernel_test_setup(__file__)
HEADS = ((4, 2), (3, 3))  # (q heads, kv heads): GQA and MHA


def cos_sin_table(max_pos, head_dim, device=DEVICE):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], -1).to(device)


def qkv_views(tokens, hq, hk, d, dtype):
    """q and k as the engine hands them over: strided views into one [T, (hq + 2 hk) d] qkv output."""
    qkv = randn(tokens, (hq + 2 * hk) * d, dtype=dtype, scale=2.0)
    q, k, _ = qkv.split([hq * d, hk * d, hk * d], -1)
    return q.view(tokens, hq, d), k.view(tokens, hk, d)


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens", TEST_MS[:3])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("head_dim", [16, 128])
def test_rope(tokens, heads, head_dim, dtype):
    torch.manual_seed(tokens)
    q, k = qkv_views(tokens, *heads, head_dim, dtype)
    table = cos_sin_table(4096, head_dim)
    positions = torch.randint(0, 4096, (tokens,), device=DEVICE)
    q_out, k_out = poisoned(rope, q, k, table.float(), positions)
    cos, sin = table[positions].unsqueeze(1).chunk(2, dim=-1)
    for got, x in ((q_out, q), (k_out, k)):
        baseline = rope_ref(x, cos.float(), sin.float())
        assert got.shape == x.shape and got.dtype == x.dtype
        assert_no_worse(got, baseline, rope_ref(x.double(), cos, sin), "rope")


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", TEST_MS)
@pytest.mark.parametrize("inter", [24, 1030])  # one masked block; two blocks, the second partial
def test_silu_mul(rows, inter, dtype):
    torch.manual_seed(rows)
    gate_up = randn(rows, 2 * inter, dtype=dtype, scale=3.0)
    y = poisoned(silu_mul, gate_up)
    assert y.shape == (rows, inter)
    assert_no_worse(y, silu_mul_ref(gate_up), silu_mul_ref(gate_up.double()), "silu_mul")


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", HEADS)
def test_rmsnorm_reads_heads_in_place_from_the_qkv_output(heads, dtype):
    torch.manual_seed(1)
    q, k = qkv_views(17, *heads, 32, dtype)
    assert not q.is_contiguous()  # the case the grouped rows exist for
    for x in (q, k):
        gamma = (1 + 0.2 * torch.randn(32, device=DEVICE)).to(dtype)
        y = poisoned(rmsnorm, x, gamma, EPS)
        assert y.shape == x.shape
        torch.testing.assert_close(y, rmsnorm_ref(x, gamma, EPS))
        assert_no_worse(y, rmsnorm_ref(x, gamma, EPS), rmsnorm_ref(x.double(), gamma.double(), EPS), "head norm")


def test_rope_and_silu_mul_reject_bad_inputs():
    q, k = qkv_views(3, 4, 2, 16, torch.float32)
    table, positions = cos_sin_table(64, 16).float(), torch.arange(3, device=DEVICE)
    with pytest.raises(ValueError, match="rope"):
        rope(q, k[:2], table, positions)  # token counts differ
    with pytest.raises(ValueError, match="cos_sin"):
        rope(q, k, table[:, :8], positions)
    with pytest.raises(ValueError, match="positions"):
        rope(q, k, table, positions.float())
    with pytest.raises(ValueError, match="silu_mul"):
        silu_mul(randn(3, 5, dtype=torch.float32))
