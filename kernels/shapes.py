"""Shapes shared by the kernel tests, the benchmark and NOTES.md.

Every fused op is ``y = rmsnorm(x + residual) @ W.T`` with ``W`` [N, K], as in a Qwen3, Llama
or Mistral decoder layer (input_layernorm -> qkv_proj, post_attention_layernorm -> gate_up_proj)
and at the end of the model (final norm -> lm_head). Each model here is a preset of
``minivllm.make_checkpoint`` (``preset``); ``MODELS`` are the ones benchmarked by default.
"""
from dataclasses import dataclass

# The H100 of the first edition: copy bandwidth and bf16 matmul rate measured there (chapter 3's
# worked example). Benchmarks measure the GPU in hand instead (minivllm.costs.measure_ceilings).
HBM_BYTES_PER_S = 3.02e12
PEAK_FLOPS = 790e12

MS = (1, 4, 16, 64, 256, 1024, 4096, 8192)
QUICK_MS = (1, 16, 256, 4096)
LM_HEAD_MAX_M = 256  # logits are only needed for the last token of each sequence

# Tiny, awkward shapes for the interpreter tests: N and K are not multiples of any
# block size (and (5, 24) fits in a single, masked block); M covers one row, a partial
# row block, the decode/prefill boundary (64) and a few prefill row blocks.
TEST_MS = (1, 3, 17, 64, 80)
TEST_NKS = ((37, 40), (96, 72), (5, 24))


@dataclass(frozen=True)
class Model:
    name: str
    hidden: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    preset: str
    qk_norm: bool = False  # Qwen3's per-head RMSNorm of q and k inside the qkv op
    lm_head: bool = False  # benchmark its norm -> lm_head pair too


QWEN3_0_6B = Model("Qwen3-0.6B", hidden=1024, num_q_heads=16, num_kv_heads=8, head_dim=128,
                   intermediate=3072, vocab=151936, preset="qwen3-0.6b", qk_norm=True, lm_head=True)
QWEN3_8B = Model("Qwen3-8B", hidden=4096, num_q_heads=32, num_kv_heads=8, head_dim=128,
                 intermediate=12288, vocab=151936, preset="qwen3-8b", qk_norm=True)
LLAMA_3_2_1B = Model("Llama-3.2-1B", hidden=2048, num_q_heads=32, num_kv_heads=8, head_dim=64,
                     intermediate=8192, vocab=128256, preset="llama-3.2-1b", lm_head=True)
LLAMA_3_1_8B = Model("Llama-3.1-8B", hidden=4096, num_q_heads=32, num_kv_heads=8, head_dim=128,
                     intermediate=14336, vocab=128256, preset="llama-3.1-8b")
LLAMA_2_7B = Model("Llama-2-7B", hidden=4096, num_q_heads=32, num_kv_heads=32, head_dim=128,
                   intermediate=11008, vocab=32000, preset="llama-2-7b")
LLAMA_2_13B = Model("Llama-2-13B", hidden=5120, num_q_heads=40, num_kv_heads=40, head_dim=128,
                    intermediate=13824, vocab=32000, preset="llama-2-13b")
MISTRAL_7B = Model("Mistral-7B-v0.3", hidden=4096, num_q_heads=32, num_kv_heads=8, head_dim=128,
                   intermediate=14336, vocab=32768, preset="mistral-7b")
MODELS = (QWEN3_0_6B, QWEN3_8B)
ALL_MODELS = (QWEN3_0_6B, QWEN3_8B, LLAMA_3_2_1B, LLAMA_3_1_8B, LLAMA_2_7B, LLAMA_2_13B, MISTRAL_7B)


@dataclass(frozen=True)
class Op:
    model: str
    op: str
    N: int
    K: int
    rms_cols_start: int  # columns before it skip the rms factor (q and k of qkv)


def ops(model: Model) -> list[Op]:
    """The norm -> linear pairs of one model; lm_head only where ``model.lm_head``."""
    n_qkv = (model.num_q_heads + 2 * model.num_kv_heads) * model.head_dim
    out = [
        # rms_cols_start = 0 as the engine runs it: on the cuBLAS route a q/k split costs a second GEMM
        # (run 3 of NOTES.md), and q/k's own RMSNorm removes the factor either way.
        Op(model.name, "qkv", n_qkv, model.hidden, 0),
        Op(model.name, "gate_up", 2 * model.intermediate, model.hidden, 0),
    ]
    if model.lm_head:
        out.append(Op(model.name, "lm_head", model.vocab, model.hidden, 0))
    return out


def linear_ops(model: Model) -> list[Op]:
    """The projections with no norm before them (o_proj, down_proj): ``kernels.linear``, where every
    column skips the rms factor (rms_cols_start = N)."""
    return [Op(model.name, "o_proj", model.hidden, model.num_q_heads * model.head_dim, model.hidden),
            Op(model.name, "down", model.hidden, model.intermediate, model.hidden)]


def ms_for(op: Op, ms=MS) -> list[int]:
    return [m for m in ms if op.op != "lm_head" or m <= LM_HEAD_MAX_M]


def cost(M: int, N: int, K: int, residual: bool = True, elem_bytes: int = 2) -> tuple[int, int]:
    """(bytes, flops) of the fused op: W, x, y (and residual read, h written) once each."""
    nbytes = (N * K + M * K + M * N + (2 * M * K if residual else 0)) * elem_bytes
    return nbytes, 2 * M * N * K


def unfused_cost(M: int, N: int, K: int, elem_bytes: int = 2) -> int:
    """Bytes of the same work unfused: add + RMSNorm (read x and the residual, write h and the
    normalised rows), then the linear (read the rows and W, write y)."""
    return elem_bytes * (4 * M * K + M * K + N * K + M * N)


def floor_us(M: int, N: int, K: int, residual: bool = True, bandwidth: float = HBM_BYTES_PER_S,
             flops_per_s: float = PEAK_FLOPS, elem_bytes: int = 2) -> float:
    """Roofline lower bound of the fused op, in microseconds, at the given ceilings (bytes/s, FLOP/s)."""
    nbytes, flops = cost(M, N, K, residual, elem_bytes)
    return max(nbytes / bandwidth, flops / flops_per_s) * 1e6
