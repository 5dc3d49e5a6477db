"""The epilogues of fusion="full": SiLU(gate) * up after RMSNorm + gate_up, and QK-norm + RoPE +
KV-cache store after RMSNorm + qkv.

CPU: the kernels run under Triton's interpreter (fp32 and fp16: the interpreter's bf16 dot is
not faithful) on small awkward shapes, decode (M <= 64) and prefill tiling (M = 80), against
an fp64 evaluation of the same function: the kernel's error must not exceed that of the
unfused torch chain in the same dtype. Outputs start NaN-filled; KV caches start filled with
sentinel values, so stores to the wrong slot, to slot -1 or not at all show up.
"""
import sys

import pytest
import torch

from tests.kernel_testing import (DEVICE, EPS, assert_no_worse, kernel_test_setup, poisoned, randn,
                                  select_interpreter)

select_interpreter()

from kernels import (  # noqa: E402
    fold_rmsnorm_weight,
    rmsnorm_linear,
    rmsnorm_linear_ref,
    rmsnorm_qkv_rope_store,
    rmsnorm_qkv_rope_store_ref,
)
from kernels.rmsnorm_linear import GEMV_MAX_ROWS, path_for  # noqa: E402
from kernels.rmsnorm_qkv import QKV_PATHS  # noqa: E402
from minivllm.layers.rotary import RotaryEmbedding  # noqa: E402

ON_TRITON, runs_kernels, test_cpu_kernels_in_fresh_process = kernel_test_setup(__file__)


def norm_weight(n, dtype):
    return (1 + 0.2 * torch.randn(n, device=DEVICE)).to(dtype)


# ------------------------------------------------------------------ gate_up + SiLU * up


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("intermediate", [19, 48])
@pytest.mark.parametrize("M", [1, 3, 17, 80])
def test_rmsnorm_gate_up_silu_mul(M, intermediate, with_residual, dtype):
    K = 40
    torch.manual_seed(M * 100 + intermediate)
    x, residual = randn(M, K, dtype=dtype), randn(M, K, dtype=dtype)
    w = fold_rmsnorm_weight(norm_weight(K, dtype), randn(2 * intermediate, K, dtype=dtype, scale=K**-0.5))
    out = poisoned(rmsnorm_linear, x, w, EPS, residual if with_residual else None, silu_mul=True)
    y, h = out if with_residual else (out, x)
    assert y.shape == (M, intermediate)
    assert torch.equal(h, x + residual if with_residual else x)
    baseline = rmsnorm_linear_ref(h, w, EPS, silu_mul=True)
    exact = rmsnorm_linear_ref(h.double(), w.double(), EPS, silu_mul=True)
    assert_no_worse(y, baseline, exact, "silu(gate) * up")


def test_silu_mul_rejects_bad_inputs():
    x = randn(4, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match="even N"):
        rmsnorm_linear(x, randn(7, 32, dtype=torch.float16), silu_mul=True)
    with pytest.raises(ValueError, match="rms_cols_start"):
        rmsnorm_linear(x, randn(8, 32, dtype=torch.float16), rms_cols_start=2, silu_mul=True)


# --------------------------------------------------- qkv + QK norm + RoPE + KV store

CACHE_BLOCK = 16
MAX_POSITION = 300
# Far above Qwen3's 1e-6, so that the kernel's exact treatment of eps (q and k skip the row's
# 1/rms, so their eps is scaled by mean(h**2) + eps) is tested; x's scale makes 1/rms != 1.
QK_EPS = 0.1


def make_qkv_case(M, head_dim, num_q_heads, num_kv_heads, dtype, K=40, seed=0):
    """Inputs of one call: slots spread over shuffled cache blocks, a few rows with slot -1."""
    torch.manual_seed(seed * 100000 + M * 1000 + head_dim * 10 + num_q_heads)
    n = (num_q_heads + 2 * num_kv_heads) * head_dim
    num_blocks = M // CACHE_BLOCK + 3
    slots = torch.randperm(num_blocks * CACHE_BLOCK)[:M]
    slots[torch.rand(M) < 0.2] = -1
    cache = torch.randn(num_blocks, CACHE_BLOCK, num_kv_heads, head_dim)
    return dict(
        x=randn(M, K, dtype=dtype, scale=3.0),
        w_folded=fold_rmsnorm_weight(norm_weight(K, dtype), randn(n, K, dtype=dtype, scale=K**-0.5)),
        eps=EPS,
        q_norm_weight=norm_weight(head_dim, dtype),
        k_norm_weight=norm_weight(head_dim, dtype),
        qk_eps=QK_EPS,
        cos_sin=RotaryEmbedding(head_dim, MAX_POSITION, 10000.0).cos_sin.to(DEVICE),
        positions=torch.randint(0, MAX_POSITION, (M,), device=DEVICE),
        k_cache=cache.to(DEVICE, dtype),
        v_cache=(cache + 5).to(DEVICE, dtype),
        slot_mapping=slots.to(DEVICE, torch.int32),
    )


def in_fp64(case):
    floats = (torch.bfloat16, torch.float16, torch.float32)
    return {name: t.double() if torch.is_tensor(t) and t.dtype in floats and name != "cos_sin" else t
            for name, t in case.items()}


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("M,head_dim,num_q_heads,num_kv_heads", [
    (1, 16, 4, 2),  # the tiny test model's attention
    (3, 32, 2, 2),  # no GQA
    (17, 16, 6, 2),  # a partial 32-row block, GQA group of 3
    (80, 32, 4, 1),  # prefill tiling: several row blocks, one KV head
])
def test_rmsnorm_qkv_rope_store(M, head_dim, num_q_heads, num_kv_heads, with_residual, dtype):
    case = make_qkv_case(M, head_dim, num_q_heads, num_kv_heads, dtype)
    check_qkv(case, randn(M, case["x"].shape[1], dtype=dtype) if with_residual else None)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 64, 300])
def test_rmsnorm_qkv_rope_store_qwen3_06b_bf16(M):
    case = make_qkv_case(M, 128, 16, 8, torch.bfloat16, K=1024)
    check_qkv(case, randn(M, 1024, dtype=torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 64, 300])
def test_rmsnorm_gate_up_silu_mul_qwen3_06b_bf16(M):
    torch.manual_seed(M)
    x, residual = randn(M, 1024, dtype=torch.bfloat16), randn(M, 1024, dtype=torch.bfloat16)
    w = fold_rmsnorm_weight(norm_weight(1024, torch.bfloat16), randn(6144, 1024, dtype=torch.bfloat16, scale=1 / 32))
    y, h = poisoned(rmsnorm_linear, x, w, EPS, residual, silu_mul=True)
    exact = rmsnorm_linear_ref(h.double(), w.double(), EPS, silu_mul=True)
    assert_no_worse(y, rmsnorm_linear_ref(h, w, EPS, silu_mul=True), exact, "silu(gate) * up")


def check_qkv(case, residual):
    """Run the kernel on ``case`` and compare q, the stored k and v, and the untouched slots."""
    case = dict(case)
    path = case.pop("path", None)
    M, with_residual = case["x"].shape[0], residual is not None
    num_kv_heads, head_dim = case["k_cache"].shape[2:]
    num_q_heads = case["w_folded"].shape[0] // head_dim - 2 * num_kv_heads
    baseline = {**case, "k_cache": case["k_cache"].clone(), "v_cache": case["v_cache"].clone()}
    exact = in_fp64(case)
    caches_before = case["k_cache"].clone(), case["v_cache"].clone()

    out = poisoned(rmsnorm_qkv_rope_store, residual=residual, path=path, **case)
    q, h = out if with_residual else (out, case["x"])
    q_base = rmsnorm_qkv_rope_store_ref(residual=residual, **baseline)
    q_exact = rmsnorm_qkv_rope_store_ref(residual=None if residual is None else residual.double(), **exact)
    q_base, q_exact = (q_base[0], q_exact[0]) if with_residual else (q_base, q_exact)

    assert q.shape == (M, num_q_heads, head_dim)
    if with_residual:
        assert torch.equal(h, case["x"] + residual)
    assert_no_worse(q, q_base, q_exact, "q")
    slots = case["slot_mapping"].long()
    stored = slots[slots >= 0]
    for name, before in zip(("k_cache", "v_cache"), caches_before):
        got = case[name].view(-1, num_kv_heads, head_dim)
        assert_no_worse(got[stored], baseline[name].view_as(got)[stored], exact[name].view_as(got)[stored], name)
        untouched = torch.ones(got.shape[0], dtype=torch.bool, device=DEVICE)
        untouched[stored] = False
        assert torch.equal(got[untouched], before.view_as(got)[untouched]), \
            f"{name}: a slot not in slot_mapping changed"


def test_rmsnorm_qkv_rope_store_rejects_bad_inputs():
    case = make_qkv_case(3, 16, 4, 2, torch.float16)
    bad = [
        (dict(w_folded=case["w_folded"][:-16]), "rows"),
        (dict(w_folded=case["w_folded"][:, :-1]), "must be"),
        (dict(q_norm_weight=case["q_norm_weight"][:8]), "q_norm_weight"),
        (dict(k_norm_weight=None), "both"),
        (dict(k_norm_weight=case["k_norm_weight"].float()), "dtype"),
        (dict(cos_sin=case["cos_sin"].half()), "cos_sin"),
        (dict(positions=case["positions"][:2]), "positions"),
        (dict(slot_mapping=case["slot_mapping"].float()), "slot_mapping"),
        (dict(v_cache=case["v_cache"][:, :, :1]), "v_cache"),
        (dict(residual=randn(2, 40, dtype=torch.float16)), "residual"),
    ]
    for change, match in bad:
        with pytest.raises(ValueError, match=match):
            rmsnorm_qkv_rope_store(**{"residual": None, **case, **change})


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,head_dim,num_q_heads,num_kv_heads,K,with_residual", [
    (1, 16, 4, 2, 40, True),  # SPLIT_K = 3 slices of 16, 16, 8 columns (interpreter BLOCK_K = 16); GQA
    (3, 32, 2, 2, 72, False),  # slices 32, 32, 8; no GQA; 3 rows in a 4-row block
    (1, 16, 6, 1, 20, False),  # slices 16, 4 and an empty one; one KV head
])
def test_split_k_path_twice(M, head_dim, num_q_heads, num_kv_heads, K, with_residual, dtype):
    # Each head's sum is only complete in the program that takes the last ticket; a second call on
    # fresh inputs runs no epilogue at all (q stays NaN) unless that program reset the tickets.
    for seed in range(2):
        case = make_qkv_case(M, head_dim, num_q_heads, num_kv_heads, dtype, K=K, seed=seed)
        check_qkv({**case, "path": "splitk"}, randn(M, K, dtype=dtype) if with_residual else None)


# Llama and Mistral: no QK-norm, so q and k get the row's 1/rms as v does, then RoPE.
NO_QK_NORM = dict(q_norm_weight=None, k_norm_weight=None, qk_eps=None)


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,path", [(1, "splitk"), (3, "splitk"), (1, "gemv"), (3, "dot"), (17, "tiled"),
                                    (17, "cublas"), (80, None)])
def test_qkv_paths_without_qk_norm(M, path, dtype):
    case = {**make_qkv_case(M, 16, 6, 2, dtype), **NO_QK_NORM, "path": path}
    check_qkv(case, randn(M, case["x"].shape[1], dtype=dtype))


def test_split_k_path_serves_qkv_gemv_rows_only(monkeypatch):
    assert path_for(1, None, QKV_PATHS) == "splitk" and path_for(1) == "gemv"  # the dispatch at one row
    monkeypatch.setattr(sys.modules["kernels.rmsnorm_linear"], "GEMV_MAX_M", GEMV_MAX_ROWS + 8)  # the module, not
    # the package's function of that name
    assert path_for(GEMV_MAX_ROWS + 1, None, QKV_PATHS) == "gemv"  # split-K's workspace holds GEMV_MAX_ROWS rows
    assert path_for(GEMV_MAX_ROWS, "splitk", QKV_PATHS) == "splitk"
    with pytest.raises(ValueError, match="splitk"):
        path_for(GEMV_MAX_ROWS + 1, "splitk", QKV_PATHS)
    with pytest.raises(ValueError, match="splitk"):
        path_for(1, "splitk")  # rmsnorm_linear has no split-K kernel


# ------------------------------------------------------------------------- in the engine


@runs_kernels
@pytest.mark.parametrize("preset,prompt_lens", [("qwen3-tiny", [5, 24]), ("qwen3-tiny", [9]), ("llama-tiny", [5, 24])])
def test_engine_with_full_fusion_runs_the_kernels_and_keeps_greedy_tokens(preset, prompt_lens):
    # The kernels (not their references) inside the engine: chunked prefill (16-token steps), decode
    # at two rows (cuBLAS routes) and at one (split-K qkv, GEMV o_proj and down_proj). Llama: the qkv
    # kernel without QK-norm.
    from minivllm import LLM
    from tests.helpers import greedy_tokens, random_prompts, tiny_checkpoint

    prompts = random_prompts(prompt_lens, seed=3)
    settings = dict(device=DEVICE, max_num_batched_tokens=16, max_model_len=64, kvcache_block_size=16)
    off = greedy_tokens(LLM(tiny_checkpoint(preset), fusion="off", **settings), prompts, max_tokens=3)
    assert greedy_tokens(LLM(tiny_checkpoint(preset), fusion="full", **settings), prompts, max_tokens=3) == off


# Every path, whatever the dispatch rule picks (see tests/test_kernels.py PATH_CASES).
EPILOGUE_PATHS = [(1, "gemv"), (3, "gemv"), (8, "gemv"), (3, "dot"), (17, "tiled"), (1, "cublas"), (17, "cublas")]


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,path", EPILOGUE_PATHS)
def test_epilogue_paths(M, path, dtype):
    case = make_qkv_case(M, 16, 6, 2, dtype)
    residual = randn(M, case["x"].shape[1], dtype=dtype)
    check_qkv({**case, "path": path}, residual)
    x, w = randn(M, 40, dtype=dtype), case["w_folded"][:38]
    y, h = poisoned(rmsnorm_linear, x, w, EPS, residual, silu_mul=True, path=path)
    exact = rmsnorm_linear_ref(h.double(), w.double(), EPS, silu_mul=True)
    assert_no_worse(y, rmsnorm_linear_ref(h, w, EPS, silu_mul=True), exact, f"silu(gate) * up ({path})")
