"""Programmatic dependent launch through the decode step (kernels.guard, ``USE_PDL``).

CPU: each kernel of fusion="full"'s decode step at one row, compiled for sm_90 at Qwen3-0.6B's shapes
(no GPU needed), lets the next kernel launch (``griddepcontrol.launch_dependents``) before it waits
(``griddepcontrol.wait``); before the wait the GEMVs load exactly their first W tile(s) and the other
kernels load nothing, in the PTX and, where Triton ships nvdisasm, in the machine code ptxas made of it.
(tests/test_pdl_paths.py checks that the PDL paths compute the same bits.)
GPU: the engine's greedy tokens with PDL on and off under CUDA graphs, and the GEMV chain benchmark.
"""
import importlib
import os
import re
import subprocess
import sys

import pytest
import torch

from kernels import guard
from minivllm import LLM
from tests.helpers import greedy_tokens, random_prompts, tiny_checkpoint

rl = importlib.import_module("kernels.rmsnorm_linear")  # the package exports a function of that name
qkv = importlib.import_module("kernels.rmsnorm_qkv")
pa = importlib.import_module("kernels.paged_attention")
sampling = importlib.import_module("kernels.sampling")
emb = importlib.import_module("kernels.embedding")

compiles_here = pytest.mark.skipif(guard.INTERPRET or not guard.HAVE_TRITON,
                                   reason="no Triton, or its kernels are built for the interpreter in this "
                                          "process (test_compile_checks_in_fresh_process runs these)")

BF16 = "*bf16"
RL_POINTERS = dict(X=BF16, R=BF16, H=BF16, W=BF16, Y=BF16)


def rl_gemv(residual, silu_mul, block_n, block_k):
    return dict(HAS_RESIDUAL=residual, SILU_MUL=silu_mul, PRECISION="tf32", GEMV=True, BLOCK_M=1, BLOCK_N=block_n,
                BLOCK_K=block_k, GROUP_M=1)


# Qwen3-0.6B, bf16, M = 1: (kernel, constexprs, pointer types, num_warps, W tiles loaded per K step), one
# autotuner config of each GEMV (for split-K the H100 autotuner's choice, NOTES.md run 4).
GEMVS = {
    "gate_up_silu_mul": (rl.rmsnorm_linear_kernel, rl_gemv(True, True, 16, 256), RL_POINTERS, 4, 2),
    "linear_o_proj_down": (rl.rmsnorm_linear_kernel, rl_gemv(False, False, 32, 256), RL_POINTERS, 8, 1),
    "norm_lm_head": (rl.rmsnorm_linear_kernel, rl_gemv(True, False, 8, 512), RL_POINTERS, 4, 1),
    "qkv_splitk": (qkv.rmsnorm_qkv_kernel,
                   dict(HAS_RESIDUAL=True, PRECISION="tf32", GEMV=True, QK_NORM=True, HEAD_DIM=128, CACHE_BLOCK=256,
                        BLOCK_M=1, BLOCK_K=128, GROUP_M=1, SPLIT_K=8),
                   dict(X=BF16, R=BF16, H=BF16, W=BF16, Q=BF16, KC=BF16, VC=BF16, SLOTS="*i32", POS="*i64",
                        COS_SIN="*fp32", QW=BF16, KW=BF16, PARTIALS="*fp32", SUMSQ="*fp32", TICKETS="*i32"), 8, 1),
}
# (kernel, constexprs, pointer types, num_warps) of the kernels that wait before any load.
# Decode attention (split, so with the in-kernel merge) reads the step's index inputs before it waits: the
# sequence's key count and its first cache block, both 4-byte loads.
ATTENTION = (pa._paged_attention_kernel,
             dict(GROUP=2, HEAD_DIM=128, BLOCK_SIZE=256, BLOCK_M=16, BLOCK_N=64, DECODE=True, SPLITS_POW2=32),
             dict(Q=BF16, KC=BF16, VC=BF16, OUT=BF16, M_PART="*fp32", L_PART="*fp32", ACC_PART="*fp32",
                  TICKETS="*i32", CU_Q="*i32", SEQLENS_K="*i32", BLOCK_TABLES="*i32"), 4)
WAIT_FIRST = {
    "gumbel_argmax": (sampling._gumbel_argmax_kernel, dict(BLOCK_V=sampling.BLOCK_V, BLOCKS_POW2=128, SPLIT=True),
                      dict(LOGITS="*fp32", TEMPERATURES="*fp32", KEYS="*i64", OUT="*i64", PART_SCORE="*fp64",
                           PART_TOKEN="*i64"), 8),
    "gumbel_argmax_combine": (sampling._gumbel_argmax_combine_kernel, dict(SPLITS_POW2=128),
                              dict(PART_SCORE="*fp64", PART_TOKEN="*i64", OUT="*i64"), 1),
    "embedding": (emb._embedding_kernel, dict(BLOCK_D=emb.BLOCK_D), dict(IDS="*i64", W=BF16, OUT=BF16), 4),
}
FLOATS = {"eps", "qk_eps", "scale_log2e", "MIN_T"}
# Logits of the same forward whose roundings may differ at the last bit: bf16's tolerance, a tight fp32 one.
LOGIT_TOLERANCE = {"bfloat16": dict(rtol=1.6e-2, atol=5e-2), "float32": dict(rtol=1e-4, atol=1e-4)}


def compile_for_sm90(kernel, constexprs, pointers, num_warps, num_stages=3):
    """(PTX, cubin) of ``kernel`` for sm_90. Pointers, strides and the sizes N, K, D, V are 16-divisible, as
    the launcher specializes them at these shapes: without that nothing vectorizes."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "fp32" if n in FLOATS else "i32")
                 for n in names}
    aligned = [n for n in names if n in pointers or n.startswith("stride") or n in ("N", "K", "D", "V")]
    src = ASTSource(kernel, signature, {(names.index(n),): v for n, v in constexprs.items()},
                    {(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    try:
        compiled = triton_compile(src, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=num_warps, num_stages=num_stages))
    except Exception as e:  # e.g. no ptxas for this platform
        pytest.skip(f"cannot compile for sm_90 here: {type(e).__name__}: {e}")
    return compiled.asm["ptx"], compiled.asm["cubin"]


PTX_LOAD = re.compile(r"\bld\.global\S*")
SASS_LOAD = re.compile(r"\bLDG\S*")


def ptx_load_bytes(instruction: str) -> int:
    """Bytes per thread of one PTX global load, e.g. ``ld.global.v4.b32``: 16."""
    vector = re.search(r"\.v(\d)", instruction)
    bits = re.search(r"\.[bfsu](\d+)\b", instruction)
    return (int(vector.group(1)) if vector else 1) * int(bits.group(1)) // 8


def sass_load_bytes(instruction: str) -> int:
    """Bytes per thread of one SASS global load: ``LDG.E.128`` 16, ``LDG.E.64`` 8, ``LDG.E`` 4, ``.U16`` 2."""
    width = re.search(r"\.(128|64|U16|S16|U8|S8)\b", instruction)
    return {None: 4, "128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}[width and width.group(1)]


def before_wait(ptx: str) -> str:
    """The PTX up to ``griddepcontrol.wait``, checking that ``launch_dependents`` comes first."""
    assert ptx.count("griddepcontrol.wait") == 1, "one wait, on the path every program takes"
    launch, wait = ptx.find("griddepcontrol.launch_dependents"), ptx.find("griddepcontrol.wait")
    assert 0 <= launch < wait, "the next kernel may launch before this one waits"
    return ptx[:wait]


def sass_before_wait(cubin: bytes, tmp_path) -> str | None:
    """The machine code up to the grid-dependency wait (ACQBULK; PREEXIT is launch_dependents), or None
    without Triton's nvdisasm."""
    import triton
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    if not os.path.exists(nvdisasm):
        return None
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    sass = subprocess.run([nvdisasm, "-c", str(path)], capture_output=True, text=True, check=True).stdout
    assert "PREEXIT" in sass and "ACQBULK" in sass
    assert sass.find("PREEXIT") < sass.find("ACQBULK")
    return sass[:sass.find("ACQBULK")]


@compiles_here
@pytest.mark.slow
@pytest.mark.parametrize("name", list(GEMVS))
def test_ptx_gemv_with_the_after_loop_trigger_lets_the_next_kernel_launch_after_its_wait(name):
    kernel, constexprs, pointers, num_warps, _ = GEMVS[name]
    ptx, _ = compile_for_sm90(kernel, {**constexprs, "USE_PDL": guard.PDL_TRIGGERS["after_loop"]}, pointers, num_warps)
    assert ptx.count("griddepcontrol.launch_dependents") == 1
    assert ptx.find("griddepcontrol.wait") < ptx.find("griddepcontrol.launch_dependents")


@compiles_here
@pytest.mark.slow
@pytest.mark.parametrize("name", list(GEMVS))
def test_ptx_gemv_loads_its_first_w_tiles_before_waiting(name, tmp_path):
    kernel, constexprs, pointers, num_warps, tiles = GEMVS[name]
    plain, _ = compile_for_sm90(kernel, {**constexprs, "USE_PDL": False}, pointers, num_warps)
    assert "griddepcontrol" not in plain
    ptx, cubin = compile_for_sm90(kernel, {**constexprs, "USE_PDL": True}, pointers, num_warps)
    block_n = constexprs.get("BLOCK_N", constexprs.get("HEAD_DIM"))
    w_bytes = tiles * block_n * constexprs["BLOCK_K"] * 2 // (32 * num_warps)  # per thread, bf16
    loads = PTX_LOAD.findall(before_wait(ptx))
    assert sum(map(ptx_load_bytes, loads)) == w_bytes, loads
    assert all(ptx_load_bytes(i) == 16 for i in loads), f"W tile loads not 16 bytes wide: {loads}"
    sass = sass_before_wait(cubin, tmp_path)
    if sass is not None:  # ptxas kept them there
        assert sum(map(sass_load_bytes, SASS_LOAD.findall(sass))) == w_bytes


@compiles_here
@pytest.mark.slow
@pytest.mark.parametrize("name", list(WAIT_FIRST))
def test_ptx_kernel_waits_before_any_load(name, tmp_path):
    kernel, constexprs, pointers, num_warps = WAIT_FIRST[name]
    plain, _ = compile_for_sm90(kernel, {**constexprs, "USE_PDL": False}, pointers, num_warps)
    assert "griddepcontrol" not in plain
    ptx, cubin = compile_for_sm90(kernel, {**constexprs, "USE_PDL": True}, pointers, num_warps)
    assert not PTX_LOAD.findall(before_wait(ptx))
    sass = sass_before_wait(cubin, tmp_path)
    assert sass is None or not SASS_LOAD.findall(sass)


@compiles_here
@pytest.mark.slow
def test_ptx_decode_attention_reads_only_its_index_inputs_before_waiting(tmp_path):
    kernel, constexprs, pointers, num_warps = ATTENTION
    plain, _ = compile_for_sm90(kernel, {**constexprs, "USE_PDL": False}, pointers, num_warps)
    assert "griddepcontrol" not in plain
    ptx, cubin = compile_for_sm90(kernel, {**constexprs, "USE_PDL": True}, pointers, num_warps)
    loads = PTX_LOAD.findall(before_wait(ptx))
    assert [ptx_load_bytes(i) for i in loads] == [4, 4], loads
    sass = sass_before_wait(cubin, tmp_path)
    assert sass is None or [sass_load_bytes(i) for i in SASS_LOAD.findall(sass)] == [4, 4]


@compiles_here
@pytest.mark.slow
def test_ptx_decode_attention_merge_loads_every_split_without_waiting_between_them():
    # After the ticket, the last split reads every split's partials: one barrier (the row max's layout change)
    # after the [splits, rows] max and sum, none between the per-split acc loads, so they issue together.
    kernel, constexprs, pointers, num_warps = ATTENTION
    ptx, _ = compile_for_sm90(kernel, {**constexprs, "USE_PDL": False}, pointers, num_warps)
    merge = ptx[ptx.index("atom.global"):]
    loads = [m.start() for m in re.finditer(r"ld\.global\.cg", merge)]
    assert len(loads) > constexprs["SPLITS_POW2"]
    assert merge[loads[0]:loads[-1]].count("bar.sync") <= 1


def test_compile_checks_in_fresh_process():
    if not guard.INTERPRET or not guard.HAVE_TRITON:
        pytest.skip("the compile checks run in this process" if guard.HAVE_TRITON else "no Triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "ptx", __file__],
                         cwd=root, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


def test_pdl_switch():
    """Off on CPU; on a GPU of compute capability >= 9 on (unless KERNELS_PDL=0) unless ``guard.pdl(False)``, with the
    trigger point ``KERNELS_PDL_TRIGGER`` names."""
    assert guard.pdl_launch(torch.empty(0)) == {"USE_PDL": False}
    if not torch.cuda.is_available():
        return
    t = torch.empty(0, device="cuda")
    supported = (guard.PDL_ALLOWED and not guard.INTERPRET and torch.version.hip is None
                 and torch.cuda.get_device_capability()[0] >= 9)
    assert guard.pdl_enabled(t) == supported
    assert guard.pdl_launch(t) == ({"USE_PDL": guard.PDL_TRIGGERS[guard.PDL_TRIGGER], "launch_pdl": True} if supported
                                   else {"USE_PDL": False})
    assert guard.pdl_launch(t, wanted=False) == {"USE_PDL": False}
    with guard.pdl(False):
        assert not guard.pdl_enabled(t)
    assert guard.pdl_enabled(t) == supported


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_engine_tokens_and_logits_do_not_depend_on_pdl(dtype):
    """fusion="full" under CUDA graphs: batch 1 replays the all-Triton graph at one row (embedding, split-K
    qkv, attention, the GEMVs, lm_head), batch 3 a graph of more rows. The same greedy
    tokens either way, and logits within the dtype's tolerance: compiled, the GEMV's peeled first K step
    can round an element one ulp apart (kernels.guard)."""
    if not guard.PDL_ALLOWED:
        pytest.skip("KERNELS_PDL=0: both engines would run without PDL")
    prompts = random_prompts([7, 30, 65], seed=3)
    runs = {}
    for pdl in (False, True):
        with LLM(tiny_checkpoint(), device="cuda", dtype=dtype, fusion="full", pdl=pdl, kvcache_block_size=16,
                 max_num_seqs=4, max_model_len=512, gpu_memory_utilization=0.3) as llm:
            with llm.record_logits() as logits:
                tokens = (greedy_tokens(llm, prompts[:1], max_tokens=24), greedy_tokens(llm, prompts, max_tokens=24))
            runs[pdl] = tokens, [t.clone() for t in logits]
    assert runs[True][0] == runs[False][0]
    assert len(runs[True][1]) == len(runs[False][1])
    for with_pdl, without in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(with_pdl, without, **LOGIT_TOLERANCE[dtype])


@pytest.mark.gpu
def test_gemv_chain_bench_runs_and_pdl_keeps_the_chain_s_result():
    """kernels.bench --pdl at a small size: the dependent chain of eight GEMVs replayed with PDL ends where it
    ends without, but for the last-bit roundings the chain amplifies (0.6 % measured on the H200 at this
    length; a race or a wrong kernel is O(1)), and every row and both fits are there."""
    from kernels.bench import bench_pdl
    if not guard.pdl_enabled(torch.empty(0, device="cuda")):
        pytest.skip("this GPU has no programmatic dependent launch (compute capability < 9)")
    rows = bench_pdl(rep=5, layers=2)
    chains = [r for r in rows if r["op"] == "pdl_layer_chain"]
    assert [r["pdl"] for r in chains] == [False, True]
    assert chains[0]["same_output_as_without_pdl"]  # without PDL the replay is the eager chain, bit for bit
    assert chains[1]["relative_difference_to_without_pdl"] < 0.05
    assert all(r["relative_error_to_fp64"] < 0.05 for r in chains)
    fits = [r for r in rows if r["op"] == "pdl_fit"]
    assert {r["pdl"] for r in fits} == {False, True}
    assert all(r["fixed_us_per_kernel"] is not None and r["bandwidth_TBps"] > 0 for r in fits)


@compiles_here
@pytest.mark.slow
def test_ptx_gumbel_argmax_scores_each_token_once_in_float32_with_two_hardware_logs():
    # One float32 pass (the float64 one revisits chosen blocks only), and its two logs a token are the SFU's
    # lg2.approx, not libdevice's ~45-instruction logf: the two changes that make the sampler cheap.
    kernel, constexprs, pointers, num_warps = WAIT_FIRST["gumbel_argmax"]
    ptx, _ = compile_for_sm90(kernel, {**constexprs, "USE_PDL": False}, pointers, num_warps)
    tokens_per_thread = constexprs["BLOCK_V"] // (32 * num_warps)
    assert ptx.count("lg2.approx.f32") == 2 * tokens_per_thread
