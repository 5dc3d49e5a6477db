"""Workload 4: RMSNorm -> linear on one GPU, the fused kernel against the torch paths.

    python -m kernels.bench [--quick] [--sweep] [--out data/results]

Writes ``<out>/kernels-<gpu slug>.json`` and prints a table. Implementations (bf16):

  fused               rmsnorm_linear as the engine dispatches it by M (GEMV_MAX_M, CUBLAS_MIN_M)
  fused_gemv          ... forced onto one path, for every M it can serve: gemv (M <= 8, no tl.dot),
  fused_dot           dot (tl.dot decode kernel, M <= 64), tiled (grouped GEMM tiles) and
  fused_tiled         cublas_route (row kernel + cuBLAS: the unfused route the dispatch takes
  cublas_route        at large M)
  cublas_linear_only  F.linear(x, W) alone: the GEMM with no norm work at all
  fused_tma           kernels.rmsnorm_linear_tma: the persistent TMA GEMM carrying the norm (Hopper, M >= 2),
                      its sums of squares (and h = x + residual) in the main loop
  fused_tma_rows      the same GEMM after a row pass that writes h and r (sum_of_squares="row_pass")
  full_tma_rows       for gate_up, fused_tma_rows with SiLU * up in the epilogue (against "full": the cuBLAS
                      route, then the SiLU kernel)
  tma_linear_only     the same kernel with no column normed: a plain GEMM, the yardstick against
                      cublas_linear_only
  eager_unfused       HF-style add + RMSNorm in eager torch, then F.linear (cuBLAS)
  compiled_unfused    the same under torch.compile: one fused norm kernel + cuBLAS
  liger_unfused       Liger-Kernel's fused add + RMSNorm (Triton), then cuBLAS (when liger-kernel
                      is installed)
  full, full_<path>   fusion="full"'s kernel: for qkv, rmsnorm_qkv_rope_store (+ QK-norm, RoPE,
                      KV-cache store; also full_splitk, its split-K GEMV, M <= 8); for gate_up,
                      rmsnorm_linear with silu_mul=True
  norm_linear_chain   what fusion="norm_linear" runs for the same work: fused, then the
                      engine's QK-norm, RoPE and store_kvcache, or SiLU * up (a Triton kernel each)
  sweep               (--sweep) the decode kernel at M=1 on a BLOCK_N x BLOCK_K grid
  sampler             (--sampler) sampling of [M, vocab] fp32 logits, temperature alone, top-k 50,
                      top-p 0.9 and both: kernels.sample against the full-vocabulary sort it replaced
                      (torch_sort) and gumbel_argmax (one pass); the floor is one read of the logits
  decode_attention    (--attention) paged_attention at decode, batch 1-256, contexts 512-8192 keys, against
                      one read of the KV cache
  prefill_attention   (--attention) paged_attention over one prompt of 512-8,192 tokens (causal), and
                      torch's scaled_dot_product_attention on the same tensors (torch_sdpa), against the
                      causal FLOPs at the matmul rate
  pdl_chain           (--pdl) programmatic dependent launch (kernels.guard) on and off: chains of
                      PDL_LAYERS * 4 M=1 GEMVs of one Qwen3-0.6B shape each (own weights, so HBM
                      reads; configs pinned: PDL_GEMV_CONFIGS), one CUDA graph per chain;
                      ``pdl_fit`` rows fit us per kernel = a + bytes / B over the shapes, a being the
                      fixed cost per kernel that PDL overlaps.
                      ``pdl_layer_chain``: the four shapes as a decode layer runs them, each GEMV
                      reading the previous one's output, with the result checked against no PDL

And the projections with no norm before them (o_proj, down): ``kernels.linear`` as dispatched
(fused), its GEMV kernel forced (fused_gemv) and cuBLAS (cublas_linear_only).

Times are medians of ``triton.testing.do_bench_cudagraph`` (launch overhead excluded), without
programmatic dependent launch except in the pdl rows.
Inputs are random; when one set of inputs would fit in L2 several sets are rotated so
each call reads W from HBM, as in a real forward pass. Floors use the copy bandwidth and bf16
matmul rate measured at the start of the run (``minivllm.costs.measure_ceilings``).
"""
import argparse
import importlib
import itertools
import math
import sys
import time
from typing import NamedTuple

import torch
import triton
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench, do_bench_cudagraph

from kernels.guard import PDL_ALLOWED, PDL_TRIGGER, autotuned_configs, pdl
from kernels.paged_attention import store_kvcache
from kernels.rmsnorm import rmsnorm, rmsnorm_ref
from kernels.rmsnorm_qkv import QKV_PATHS, kernel_for as qkv_kernel_for, rmsnorm_qkv_rope_store
from kernels.rope import rope
from kernels.silu_mul import silu_mul
from kernels.rmsnorm_linear_tma import rmsnorm_linear_tma
from kernels.rmsnorm_linear import (fold_rmsnorm_weight, kernel_for, launch, linear, rmsnorm_linear,
                                    rmsnorm_linear_kernel)
from kernels.shapes import ALL_MODELS, MODELS, MS, QUICK_MS, floor_us, linear_ops, ms_for, ops
from kernels import dispatch
from minivllm.costs import measure_ceilings
from minivllm.results import git_commit, gpu_slug, write_result

rl = importlib.import_module("kernels.rmsnorm_linear")  # the module (kernels exports a function of that name)
rl_tma = importlib.import_module("kernels.rmsnorm_linear_tma")

try:  # Liger-Kernel's Triton add + RMSNorm: a kernel-level peer, where it is installed
    from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
except ImportError:
    LigerFusedAddRMSNormFunction = None

EPS = 1e-6
DTYPE = torch.bfloat16
ERR_ROWS = 128  # rows checked against fp64; rows are independent, so a sample suffices
SWEEP_BLOCK_N = (16, 32, 64, 128)
SWEEP_BLOCK_K = (64, 128, 256, 512)


class Inputs(NamedTuple):
    x: torch.Tensor
    residual: torch.Tensor
    gamma: torch.Tensor
    w: torch.Tensor
    w_folded: torch.Tensor


def unfused(x, residual, gamma, w):
    """The engine's unfused path: HF add + RMSNorm, then a separate linear."""
    h = x + residual
    return torch.nn.functional.linear(rmsnorm_ref(h, gamma, EPS), w), h


# dynamic=True: one compiled graph serves every shape instead of one compile per shape.
compiled_unfused = torch.compile(unfused, dynamic=True)


def liger_unfused(x, residual, gamma, w):
    """Liger's add + RMSNorm (casting mode "llama": HF's numerics), then cuBLAS."""
    y, h = LigerFusedAddRMSNormFunction.apply(x, residual, gamma, EPS, 0.0, "llama", False)
    return torch.nn.functional.linear(y, w), h


CEILINGS = {}  # measured once per run, in main


TMA_PATH = "tma"  # kernels.rmsnorm_linear_tma, timed beside the dispatched paths where TMA exists
FORCED_PATHS = {*QKV_PATHS, TMA_PATH}  # --paths narrows the forced-path columns


def times_tma(M):
    return (TMA_PATH in FORCED_PATHS and M >= 2 and torch.cuda.is_available()
            and torch.cuda.get_device_capability()[0] >= 9)


def paths(M, accepted=rl.PATHS):
    """The paths of ``accepted`` that can serve M rows (the tl.dot decode kernel only up to SMALL_M)."""
    out = []
    for path in (p for p in accepted if p in FORCED_PATHS):
        try:
            rl.path_for(M, path, accepted)
            out.append(path)
        except ValueError:
            pass
    return out


PATH_IMPL = {"gemv": "fused_gemv", "dot": "fused_dot", "tiled": "fused_tiled", "cublas": "cublas_route"}


def impls(op, M):
    forced = {PATH_IMPL[p]: (lambda s, p=p: rmsnorm_linear(s.x, s.w_folded, EPS, s.residual, op.rms_cols_start,
                                                            path=p)) for p in paths(M)}
    return {
        "fused": lambda s: rmsnorm_linear(s.x, s.w_folded, EPS, s.residual, op.rms_cols_start),
        **forced,
        **({"fused_tma": lambda s: rmsnorm_linear_tma(s.x, s.w_folded, EPS, s.residual, op.rms_cols_start),
            "fused_tma_rows": lambda s: rmsnorm_linear_tma(s.x, s.w_folded, EPS, s.residual, op.rms_cols_start,
                                                           "row_pass"),
            "tma_linear_only": lambda s: rmsnorm_linear_tma(s.x, s.w, EPS, None, op.N)} if times_tma(M) else {}),
        "cublas_linear_only": lambda s: torch.nn.functional.linear(s.x, s.w),
        "eager_unfused": lambda s: unfused(s.x, s.residual, s.gamma, s.w),
        "compiled_unfused": lambda s: compiled_unfused(s.x, s.residual, s.gamma, s.w),
        **({"liger_unfused": lambda s: liger_unfused(s.x, s.residual, s.gamma, s.w)}
           if LigerFusedAddRMSNormFunction is not None else {}),
    }


def full_impls(op, M):
    """"full" and the "norm_linear" chain it replaces, on Qwen3 attention state for M decode rows.
    lm_head has no epilogue."""
    if op.op == "gate_up":
        def chain(s):
            return silu_mul(rmsnorm_linear(s.x, s.w_folded, EPS, s.residual)[0])
        return {"full": lambda s: rmsnorm_linear(s.x, s.w_folded, EPS, s.residual, silu_mul=True),
                **({"full_tma_rows": lambda s: rmsnorm_linear_tma(s.x, s.w_folded, EPS, s.residual, 0, "row_pass",
                                                                  silu_mul=True)} if times_tma(M) else {}),
                **{f"full_{p}": (lambda s, p=p: rmsnorm_linear(s.x, s.w_folded, EPS, s.residual, silu_mul=True,
                                                               path=p)) for p in paths(M)},
                "norm_linear_chain": chain}
    if op.op != "qkv":
        return {}
    model = next(m for m in ALL_MODELS if m.name == op.model)
    head_dim, hq, hkv = model.head_dim, model.num_q_heads, model.num_kv_heads
    block = 256
    cache = torch.zeros(2, triton.cdiv(M, block) + 1, block, hkv, head_dim, device="cuda", dtype=DTYPE)
    # Llama and Mistral have no QK-norm: the fused op and the chain skip it.
    norm_q, norm_k = (torch.ones(head_dim, device="cuda", dtype=DTYPE) if model.qk_norm else None for _ in range(2))
    positions = torch.arange(M, device="cuda") + 1000
    slots = torch.randperm(cache.shape[1] * block, device="cuda")[:M].to(torch.int32)
    inv_freq = 1e6 ** (-torch.arange(0, head_dim, 2, device="cuda") / head_dim)  # Qwen3's rope_theta
    freqs = torch.arange(40960, device="cuda", dtype=torch.float32)[:, None] * inv_freq
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1)

    def chain(s):
        qkv, _ = rmsnorm_linear(s.x, s.w_folded, EPS, s.residual, op.rms_cols_start)
        q, k, v = qkv.view(M, -1, head_dim).split([hq, hkv, hkv], 1)
        if model.qk_norm:
            q, k = rmsnorm(q, norm_q, EPS), rmsnorm(k, norm_k, EPS)
        q, k = rope(q, k, cos_sin, positions)
        store_kvcache(k, v, cache[0], cache[1], slots)
        return q

    def full(s, path=None):
        return rmsnorm_qkv_rope_store(s.x, s.w_folded, EPS, s.residual, norm_q, norm_k,
                                      EPS if model.qk_norm else None, cos_sin, positions, cache[0], cache[1], slots,
                                      path=path)

    return {"full": full, **{f"full_{p}": (lambda s, p=p: full(s, p)) for p in paths(M, QKV_PATHS)},
            "norm_linear_chain": chain}


def make_inputs(M, op):
    set_bytes = (op.N * op.K + 2 * M * op.K) * DTYPE.itemsize
    l2_bytes = torch.cuda.get_device_properties().L2_cache_size
    n_sets = 1 if set_bytes > l2_bytes else min(64, math.ceil(3 * l2_bytes / set_bytes))  # 3x the L2: cold reads
    sets = []
    for _ in range(n_sets):
        x = torch.randn(M, op.K, device="cuda", dtype=DTYPE)
        residual = torch.randn(M, op.K, device="cuda", dtype=DTYPE)
        gamma = (1 + 0.2 * torch.randn(op.K, device="cuda")).to(DTYPE)
        w = (torch.randn(op.N, op.K, device="cuda") * op.K**-0.5).to(DTYPE)
        sets.append(Inputs(x, residual, gamma, w, fold_rmsnorm_weight(gamma, w)))
    return sets


def exact_fp64(s, rms_cols_start):
    """fp64 value of the first ERR_ROWS rows; columns < rms_cols_start without the rms factor."""
    h = (s.x[:ERR_ROWS] + s.residual[:ERR_ROWS]).double()  # both paths round h to bf16
    y = h @ (s.w.double() * s.gamma.double()).T
    y[:, rms_cols_start:] *= torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return y


def rel_err(y, exact):
    return ((y[:ERR_ROWS].double() - exact).norm() / exact.norm()).item()


def time_us(call, sets, rep):
    rotation = itertools.cycle(sets)

    def run():
        call(next(rotation))

    try:
        return do_bench_cudagraph(run, rep=rep, return_mode="median") * 1e3
    except Exception as e:  # graph capture refused: still time it, with launch overhead
        print(f"  do_bench_cudagraph failed ({type(e).__name__}: {e}); using do_bench", file=sys.stderr)
        torch.cuda.synchronize()
        return do_bench(run, rep=rep, return_mode="median") * 1e3


def config_dict(config, fixed_meta):
    return {**config.kwargs, **fixed_meta, "num_warps": config.num_warps, "num_stages": config.num_stages}


def row(op, M, impl, us, err=None, config=None, residual=True):
    return {
        "op": op.op, "model": op.model, "M": M, "N": op.N, "K": op.K, "dtype": "bf16", "impl": impl,
        "us_median": us,
        "floor_us": floor_us(M, op.N, op.K, residual, CEILINGS["copy_bytes_per_s"],
                             CEILINGS["bf16_matmul_flops_per_s"]),
        "rel_err_vs_fp64": err,
        "achieved_weight_TBps": op.N * op.K * DTYPE.itemsize / (us * 1e-6) / 1e12 if us else None,
        "config": config,
        "rms_cols_start": op.rms_cols_start,
    }


def bench_op(op, M, rep):
    sets = make_inputs(M, op)
    rows = []
    for impl, call in {**impls(op, M), **full_impls(op, M)}.items():
        out = call(sets[0])  # warm-up: autotuning, torch.compile
        err = None
        fused_path = {"fused": rl.path_for(M), "fused_tma": TMA_PATH, "fused_tma_rows": TMA_PATH,
                      **{v: k for k, v in PATH_IMPL.items()}}.get(impl)
        if fused_path or impl == "eager_unfused":
            err = rel_err(out[0], exact_fp64(sets[0], op.rms_cols_start if fused_path else 0))
        config = None
        if impl in ("fused_tma", "fused_tma_rows", "tma_linear_only", "full_tma_rows"):
            config = {"path": TMA_PATH, **config_dict(rl_tma._kernel.best_config, {})}
        elif fused_path is not None:
            config = {"path": fused_path}
            if fused_path != "cublas":
                kernel, fixed_meta = kernel_for(M, fused_path)
                config.update(config_dict(kernel.best_config, fixed_meta))
        elif impl.startswith("full"):  # fusion="full"'s kernel: record its path and config too
            accepted = QKV_PATHS if op.op == "qkv" else rl.PATHS
            full_path = rl.path_for(M, impl[5:] or None, accepted)
            config = {"path": full_path}
            if full_path != "cublas":
                kernel, fixed_meta = (qkv_kernel_for if op.op == "qkv" else kernel_for)(M, full_path)
                config.update(config_dict(kernel.best_config, fixed_meta))
        rows.append(row(op, M, impl, time_us(call, sets, rep), err, config))
    return rows


def bench_linear(op, M, rep):
    """A projection with no norm: kernels.linear as dispatched, its GEMV kernel forced, cuBLAS."""
    sets = make_inputs(M, op)
    gemv, gemv_meta = kernel_for(M, "gemv") if M <= rl.GEMV_MAX_ROWS else (None, None)
    calls = {"fused": lambda s: linear(s.x, s.w),
             **({"fused_gemv": lambda s: launch(gemv, s.x, s.w, EPS, None, op.N, **gemv_meta)}
                if gemv and "gemv" in FORCED_PATHS else {}),
             "cublas_linear_only": lambda s: torch.nn.functional.linear(s.x, s.w)}
    exact = sets[0].x[:ERR_ROWS].double() @ sets[0].w.double().T
    rows = []
    for impl, call in calls.items():
        err = rel_err(call(sets[0]), exact)  # also the warm-up (autotuning)
        config = None
        if impl == "fused_gemv" or (impl == "fused" and rl.path_for(M) == "gemv"):
            config = {"path": "gemv", **config_dict(gemv.best_config, gemv_meta)}
        rows.append(row(op, M, impl, time_us(call, sets, rep), err, config, residual=False))
    return rows


SAMPLER_MS = (1, 8, 64, 256)
SAMPLER_MODES = {"temperature": (-1, 1.0), "top_k": (50, 1.0), "top_p": (-1, 0.9), "top_k_top_p": (50, 0.9)}


def torch_sort_sample(logits, temperatures, top_ks, top_ps, keys):
    """What the engine ran before ``kernels.sample`` for top-k/top-p: a sort of the whole vocabulary,
    the cumulative softmax in sorted order, a scatter back, and float64 Gumbel noise over [B, V]."""
    from kernels.sampling import MIN_TEMPERATURE, token_noise
    z = logits / temperatures.clamp(min=MIN_TEMPERATURE)[:, None]
    ordered, order = z.sort(-1, descending=True)
    vocab = z.shape[-1]
    rank = torch.arange(vocab, device=z.device)[None, :]
    drop = rank >= torch.where(top_ks > 0, top_ks, vocab)[:, None]
    probs = ordered.masked_fill(drop, float("-inf")).softmax(-1)
    drop |= ((probs.cumsum(-1) - probs) >= top_ps[:, None]) & (rank > 0)
    z = torch.empty_like(z).scatter_(-1, order, ordered.masked_fill(drop, float("-inf")))
    sampled = (z.double() - torch.log(-torch.log(token_noise(keys, vocab)))).argmax(-1)
    return torch.where(temperatures > 0, sampled, logits.argmax(-1))


def bench_sampler(rep):
    """Sampling at the Qwen3 vocabulary, per mode (temperature alone, top-k 50, top-p 0.9, both):
    ``kernels.sample`` (fused) against, with top-k/top-p, the sort path it replaced (torch_sort), and
    for temperature alone the one-pass kernel by itself (gumbel_argmax) and its eager reference
    (eager_unfused). The floor is one read of the fp32 logits at the measured copy bandwidth."""
    from kernels import sampling
    from kernels.sampling import gumbel_argmax, gumbel_argmax_ref, sample, sample_ref
    sampling.FILTER_KERNEL_ON_GPU = True  # this process times the kernel (the engine waits for its GPU tests)
    rows = []
    vocab = MODELS[0].vocab
    for (mode, (top_k, top_p)), M in itertools.product(SAMPLER_MODES.items(), SAMPLER_MS):
        # bf16-rounded logits, as the model makes them (ties included), at T in [0.1, 1.1)
        sets = [((torch.randn(M, vocab, device="cuda") * 3).bfloat16().float(), torch.rand(M, device="cuda") + 0.1,
                 torch.full((M,), top_k, device="cuda"), torch.full((M,), top_p, device="cuda"),
                 torch.randint(0, 2**32, (M,), device="cuda")) for _ in range(4)]
        exact = sample_ref(*sets[0])
        floor = M * vocab * 4 / CEILINGS["copy_bytes_per_s"] * 1e6
        # Without top-k/top-p the engine ran gumbel_argmax before (eager_unfused before that), with them the sort.
        impls = {"fused": sample, **({"gumbel_argmax": lambda x, t, k, p, keys: gumbel_argmax(x, t, keys),
                                      "eager_unfused": lambda x, t, k, p, keys: gumbel_argmax_ref(x, t, keys)}
                                     if mode == "temperature" else {"torch_sort": torch_sort_sample})}
        for impl, fn in impls.items():
            same = bool(torch.equal(fn(*sets[0]), exact))
            us = time_us(lambda s, fn=fn: fn(*s), sets, rep)
            rows.append({"op": "sampler", "model": MODELS[0].name, "M": M, "N": vocab, "K": None, "dtype": "fp32",
                         "impl": impl, "mode": mode, "us_median": us, "floor_us": floor,
                         "same_tokens_as_reference": same})
            print(f"  sampler {mode:<12} M={M:<4} {impl:<14} {us:9.2f} us (floor {floor:.2f}, "
                  f"{us / floor:5.2f}x), same tokens: {same}", flush=True)
    return rows


ATTENTION_BATCHES = (1, 8, 64, 256)
ATTENTION_CONTEXTS = (512, 2048, 8192)
ATTENTION_BLOCK = 256  # the engine's KV block on a GPU


def bench_attention(rep, batches=ATTENTION_BATCHES, contexts=ATTENTION_CONTEXTS):
    """Decode attention (``paged_attention``, one new token per sequence, as the engine's decode step calls
    it) at Qwen3-0.6B's heads over paged bf16 caches of ``contexts`` keys per sequence, blocks scattered
    in the pool. The floor is one read of every sequence's K and V (and q, out) at the measured copy
    bandwidth; rows record the key splits the dispatch chose and the error against the torch reference."""
    from kernels.paged_attention import MAX_BLOCK_N, _default_num_splits, paged_attention, paged_attention_ref
    model = MODELS[0]
    hq, hkv, d = model.num_q_heads, model.num_kv_heads, model.head_dim
    rows = []
    for batch, context in itertools.product(batches, contexts):
        blocks = context // ATTENTION_BLOCK
        kv_bytes = 2 * batch * context * hkv * d * DTYPE.itemsize
        # As make_inputs: caches rotated until they overflow the L2 three times, so that each call reads HBM.
        n_sets = max(1, min(64, math.ceil(3 * torch.cuda.get_device_properties().L2_cache_size / kv_bytes)))

        def inputs():
            cache = torch.randn(2, batch * blocks, ATTENTION_BLOCK, hkv, d, device="cuda", dtype=DTYPE)
            tables = torch.randperm(batch * blocks, device="cuda", dtype=torch.int32).view(batch, blocks)
            return (torch.randn(batch, hq, d, device="cuda", dtype=DTYPE), cache[0], cache[1],
                    torch.arange(batch + 1, device="cuda", dtype=torch.int32),
                    torch.full((batch,), context, device="cuda", dtype=torch.int32), tables)

        sets = [inputs() for _ in range(n_sets)]

        def call(s):
            return paged_attention(*s, d**-0.5, max_seqlen_q=1, max_seqlen_k=context, decode=True)

        err = None
        if batch * context <= 64 * 2048:  # the reference loops over sequences in torch
            exact = paged_attention_ref(*(t.double() if t.is_floating_point() else t for t in sets[0]), d**-0.5)
            err = rel_err(call(sets[0]), exact[:ERR_ROWS])  # more sequences than ERR_ROWS at batch 256
        us = time_us(call, sets, rep)
        floor = (kv_bytes + 2 * batch * hq * d * DTYPE.itemsize) / CEILINGS["copy_bytes_per_s"] * 1e6
        splits = _default_num_splits(batch * hkv, triton.cdiv(context, min(MAX_BLOCK_N, ATTENTION_BLOCK)),
                                     torch.device("cuda"))
        rows.append({"op": "decode_attention", "model": model.name, "M": batch, "N": context, "K": d, "dtype": "bf16",
                     "impl": "fused", "us_median": us, "floor_us": floor, "rel_err_vs_fp64": err,
                     "config": {"num_splits": splits, "block_size": ATTENTION_BLOCK}})
        print(f"  decode attention batch {batch:<4} context {context:<5} {us:9.2f} us (floor {floor:.2f}, "
              f"{us / floor:5.2f}x, {splits} splits)", flush=True)
        del sets
        torch.cuda.empty_cache()
    return rows


PREFILL_ATTENTION_TOKENS = (512, 2048, 8192)


def bench_prefill_attention(rep, tokens=PREFILL_ATTENTION_TOKENS):
    """Prefill attention: one prompt of ``tokens`` new tokens over the paged bf16 cache that holds them (causal,
    ``paged_attention``'s varlen path as the engine's prefill calls it), at Qwen3-0.6B's heads; beside it torch's
    ``scaled_dot_product_attention`` (its fastest backend on the GPU: a flash kernel) on the same q, K, V laid out
    contiguously. The floor is the causal FLOPs (QK^T and PV over the keys each query sees) at the measured bf16
    matmul rate: prefill attention is compute-bound."""
    import torch.nn.functional as F

    from kernels.paged_attention import paged_attention, paged_attention_ref
    model = MODELS[0]
    hq, hkv, d = model.num_q_heads, model.num_kv_heads, model.head_dim
    rows = []
    for n in tokens:
        blocks = triton.cdiv(n, ATTENTION_BLOCK)
        q, k, v = (torch.randn(n, h, d, device="cuda", dtype=DTYPE) for h in (hq, hkv, hkv))
        order = torch.randperm(blocks, device="cuda", dtype=torch.int32)
        cache = torch.zeros(2, blocks, ATTENTION_BLOCK, hkv, d, device="cuda", dtype=DTYPE)
        t = torch.arange(n, device="cuda")  # token t in table entry t // block, slot t % block, as the engine stores
        slots = order[t // ATTENTION_BLOCK].long() * ATTENTION_BLOCK + t % ATTENTION_BLOCK
        store_kvcache(k, v, cache[0], cache[1], slots)
        paged = (q, cache[0], cache[1], torch.tensor([0, n], device="cuda", dtype=torch.int32),
                 torch.tensor([n], device="cuda", dtype=torch.int32), order.view(1, blocks))
        dense = tuple(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, n, d]

        def ours(s):
            return paged_attention(*s, d**-0.5, max_seqlen_q=n, max_seqlen_k=n, decode=False)

        def sdpa(s):
            return F.scaled_dot_product_attention(*s, is_causal=True, scale=d**-0.5, enable_gqa=True)

        err = None
        if n <= 2048:  # the fp64 reference: every query's scores in memory
            exact = paged_attention_ref(*(t.double() if t.is_floating_point() else t for t in paged), d**-0.5)
            err = rel_err(ours(paged)[-ERR_ROWS:], exact[-ERR_ROWS:])  # the last queries: they see every key
        flops = 4 * hq * d * n * (n + 1) / 2  # QK^T and PV, 2 FLOPs a multiply-add, over the causal keys
        floor = flops / CEILINGS["bf16_matmul_flops_per_s"] * 1e6
        for impl, fn, s in (("fused", ours, paged), ("torch_sdpa", sdpa, dense)):
            us = time_us(fn, [s], rep)
            rows.append({"op": "prefill_attention", "model": model.name, "M": n, "N": n, "K": d, "dtype": "bf16",
                         "impl": impl, "us_median": us, "floor_us": floor, "tflops": flops / us / 1e6,
                         "rel_err_vs_fp64": err if impl == "fused" else None,
                         "config": {"block_size": ATTENTION_BLOCK}})
            print(f"  prefill attention {n:<5} tokens {impl:<10} {us:9.2f} us (floor {floor:.2f}, {us / floor:5.2f}x, "
                  f"{flops / us / 1e6:4.0f} TFLOP/s)", flush=True)
        torch.cuda.empty_cache()
    return rows


PDL_LAYERS = 14  # x 4 GEMVs: 56-kernel chains, half the 113 weight-streaming kernels of a 0.6B decode step
# (BLOCK_N, BLOCK_K, num_warps, num_stages) of the GEMV per shape: the H100 autotuner's choices at M = 1
# (kernels-decode-nvidia-h100-80gb-hbm3.json). Fixed, so that the chains autotune nothing (seconds of
# compiling on the GPU box) and both settings run the same configs.
PDL_GEMV_CONFIGS = {"qkv": (8, 512, 4, 3), "gate_up": (16, 512, 8, 3), "o_proj": (16, 1024, 8, 2),
                    "down": (16, 1024, 8, 2)}


def pinned_gemv(shape, x, w):
    """fusion="full"'s GEMV for one shape at its pinned config: norm + linear for qkv (rmsnorm_linear's
    kernel; the engine's split-K qkv kernel needs a KV cache and takes the same PDL path), with SiLU * up
    for gate_up, no norm (``linear``) for o_proj and down. PDL as ``kernels.guard`` says."""
    block_n, block_k, num_warps, num_stages = PDL_GEMV_CONFIGS[shape]
    return launch(rmsnorm_linear_kernel, x, w, EPS, None, w.shape[0] if shape in ("o_proj", "down") else 0,
                  silu_mul=shape == "gate_up", BLOCK_M=1, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=1, GEMV=True,
                  num_warps=num_warps, num_stages=num_stages)


def pdl_layer_chain(model, layers):
    """A run of ``layers`` decode layers' GEMVs at one row without attention, each reading the previous
    one's output: gate_up + SiLU * up, down, qkv, o_proj on qkv's first Hq * D columns. Returns the
    function that runs them and the same chain in float64 (from the same bf16 weights and input)."""
    d, q = model.hidden, model.num_q_heads * model.head_dim
    n_qkv = q + 2 * model.num_kv_heads * model.head_dim

    def weight(n, k):
        return (torch.randn(n, k, device="cuda") * k**-0.5).to(DTYPE)

    weights = [(weight(2 * model.intermediate, d), weight(d, model.intermediate), weight(n_qkv, d), weight(d, q))
               for _ in range(layers)]
    x = torch.randn(1, d, device="cuda", dtype=DTYPE)

    def run():
        h = x
        for gate_up, down, qkv, o_proj in weights:
            h = pinned_gemv("down", pinned_gemv("gate_up", h, gate_up), down)
            h = pinned_gemv("o_proj", pinned_gemv("qkv", h, qkv)[:, :q], o_proj)
        return h

    def run_fp64():
        def normed(h):
            return h * torch.rsqrt(h.square().mean(-1, keepdim=True) + EPS)
        h = x.double()
        for gate_up, down, qkv, o_proj in weights:
            gate, up = (normed(h) @ gate_up.double().T).chunk(2, dim=-1)
            h = (torch.nn.functional.silu(gate) * up) @ down.double().T
            h = (normed(h) @ qkv.double().T)[:, :q] @ o_proj.double().T
        return h
    return run, run_fp64


def pdl_shape_chain(op, length):
    """``length`` M=1 GEMVs of one shape, each on its own weights."""
    x = torch.randn(1, op.K, device="cuda", dtype=DTYPE)
    weights = [(torch.randn(op.N, op.K, device="cuda") * op.K**-0.5).to(DTYPE) for _ in range(length)]
    return lambda: [pinned_gemv(op.op, x, w) for w in weights]


def fit_fixed_cost(points):
    """Least squares of us = a + bytes / B over (bytes, us) points: (a in us, B in TB/s)."""
    mean_b = sum(b for b, _ in points) / len(points)
    mean_t = sum(t for _, t in points) / len(points)
    slope = sum((b - mean_b) * (t - mean_t) for b, t in points) / sum((b - mean_b) ** 2 for b, _ in points)
    return mean_t - slope * mean_b, 1e-6 / slope


def bench_pdl(rep, layers=PDL_LAYERS):
    """PDL on and off (``kernels.guard.pdl``) for chains of M=1 GEMVs (``pinned_gemv``) in one CUDA graph each."""
    def impl(on):
        return "pdl" if on else "no_pdl"

    model = MODELS[0]
    shapes = [o for o in ops(model) if o.op in ("qkv", "gate_up")] + linear_ops(model)
    length = 4 * layers
    rows, points = [], {False: [], True: []}
    for op in shapes:
        chain = pdl_shape_chain(op, length)
        weight_bytes = op.N * op.K * DTYPE.itemsize
        for on in (False, True):
            with pdl(on):
                chain()  # compiles this USE_PDL variant outside the capture
                us = time_us(lambda s: chain(), [None], rep) / length
            points[on].append((weight_bytes, us))
            rows.append({"op": "pdl_chain", "impl": impl(on), "model": model.name, "shape": op.op, "M": 1, "N": op.N,
                         "K": op.K, "dtype": "bf16", "pdl": on, "kernels": length, "weight_bytes": weight_bytes,
                         "us_per_kernel": us, "config": dict(zip(("BLOCK_N", "BLOCK_K", "num_warps", "num_stages"),
                                                                 PDL_GEMV_CONFIGS[op.op]))})
            print(f"  pdl={on!s:<5} {op.op:<8} {length} x {op.N} x {op.K}: {us:7.2f} us per kernel", flush=True)
        del chain
        torch.cuda.empty_cache()
    for on in (False, True):
        fixed, bandwidth = fit_fixed_cost(points[on])
        rows.append({"op": "pdl_fit", "impl": impl(on), "model": model.name, "pdl": on, "fixed_us_per_kernel": fixed,
                     "bandwidth_TBps": bandwidth, "points_bytes_us": points[on]})
    chain, chain_fp64 = pdl_layer_chain(model, layers)
    with pdl(False):
        expected = chain()
    exact = chain_fp64()

    def relative(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())
    for on in (False, True):
        with pdl(on):
            graph = torch.cuda.CUDAGraph()
            chain()  # compiles outside the capture
            with torch.cuda.graph(graph):
                out = chain()
            graph.replay()
            us = time_us(lambda s: chain(), [None], rep)
        rows.append({"op": "pdl_layer_chain", "impl": impl(on), "model": model.name, "pdl": on, "kernels": length,
                     "us_total": us, "same_output_as_without_pdl": bool(torch.equal(out, expected)),
                     # A chain of random GEMVs amplifies any last-bit rounding (book/challenges.md): compare
                     # each chain's distance from float64, not the two chains' bits.
                     "relative_difference_to_without_pdl": relative(out, expected),
                     "relative_error_to_fp64": relative(out, exact)})
    fits = {r["pdl"]: r for r in rows if r["op"] == "pdl_fit"}
    chains = {r["pdl"]: r for r in rows if r["op"] == "pdl_layer_chain"}
    for on in (False, True):
        print(f"  pdl={on!s:<5} fit: {fits[on]['fixed_us_per_kernel']:5.2f} us per kernel + bytes / "
              f"{fits[on]['bandwidth_TBps']:.2f} TB/s; layer chain {chains[on]['us_total']:8.1f} us "
              f"({length} kernels), same output: {chains[on]['same_output_as_without_pdl']}, "
              f"{chains[on]['relative_error_to_fp64']:.3f} from float64", flush=True)
    saved = (chains[False]["us_total"] - chains[True]["us_total"]) / length
    print(f"  PDL (trigger: {PDL_TRIGGER}) saves {saved:.2f} us per kernel in the layer chain", flush=True)
    return [{**r, "pdl_trigger": PDL_TRIGGER if r["pdl"] else None} for r in rows]


def sweep(rep, models):
    """The decode kernel at M=1 on the qkv shapes, one fixed config per point."""
    rows = []
    for op in [o for model in models for o in ops(model) if o.op == "qkv"]:
        sets = make_inputs(1, op)
        for block_n, block_k in itertools.product(SWEEP_BLOCK_N, SWEEP_BLOCK_K):
            meta = {"BLOCK_M": 16, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 1,
                    "num_warps": 4, "num_stages": 4 if block_n * block_k <= 16384 else 3}

            def call(s, meta=meta):
                return launch(rmsnorm_linear_kernel, s.x, s.w_folded, EPS, s.residual, op.rms_cols_start, **meta)

            try:
                call(sets[0])  # compiles; tiles too big for shared memory fail here
                us = time_us(call, sets, rep)
            except OutOfResources:
                us = None
            rows.append(row(op, 1, "sweep", us, config=meta))
            print(f"  sweep {op.model} qkv BLOCK_N={block_n:<3} BLOCK_K={block_k:<3} "
                  f"{'out of resources' if us is None else f'{us:8.2f} us'}", flush=True)
    return rows


def print_table(rows):
    us = {(r["model"], r["op"], r["M"], r["N"], r["impl"]): r["us_median"] for r in rows}
    keys = list(dict.fromkeys((r["model"], r["op"], r["M"], r["N"], r["K"], r["floor_us"])
                              for r in rows if r["impl"] == "fused" and r["op"] != "sampler"
                              and (r["model"], r["op"], r["M"], r["N"], "eager_unfused") in us))
    print(f"\n{'model':<11}{'op':<8}{'M':>6}{'N':>8}{'K':>6}{'floor':>9}{'fused':>9}{'cublas':>9}"
          f"{'eager':>9}{'compiled':>9}{'fused/cublas':>13}{'fused/compiled':>15}{'full':>9}{'nl_chain':>9}"
          + "".join(f"{p:>9}" for p in rl.PATHS) + "".join(f"{'full_' + p[:4]:>10}" for p in QKV_PATHS) + "   (us)")
    for model, op, M, N, K, floor in keys:
        t = [us[(model, op, M, N, impl)]
             for impl in ("fused", "cublas_linear_only", "eager_unfused", "compiled_unfused")]
        full = [us.get((model, op, M, N, impl)) for impl in ("full", "norm_linear_chain")]
        print(f"{model:<11}{op:<8}{M:>6}{N:>8}{K:>6}{floor:>9.2f}" + "".join(f"{v:>9.2f}" for v in t)
              + f"{t[0] / t[1]:>13.2f}{t[0] / t[3]:>15.2f}"
              + "".join(f"{v:>9.2f}" if v is not None else f"{'-':>9}" for v in full)
              + "".join(f"{v:>9.2f}" if v is not None else f"{'-':>9}"
                        for v in (us.get((model, op, M, N, PATH_IMPL[p])) for p in rl.PATHS))
              + "".join(f"{v:>10.2f}" if v is not None else f"{'-':>10}"
                        for v in (us.get((model, op, M, N, f"full_{p}")) for p in QKV_PATHS)))
    print(f"\n{'model':<11}{'linear':<8}{'M':>6}{'N':>8}{'K':>6}{'floor':>9}{'fused':>9}{'gemv':>9}{'cublas':>9}"
          "   (us)")
    for r in rows:
        if r["impl"] == "fused" and (r["model"], r["op"], r["M"], r["N"], "eager_unfused") not in us:
            t = [us.get((r["model"], r["op"], r["M"], r["N"], impl))
                 for impl in ("fused", "fused_gemv", "cublas_linear_only")]
            print(f"{r['model']:<11}{r['op']:<8}{r['M']:>6}{r['N']:>8}{r['K']:>6}{r['floor_us']:>9.2f}"
                  + "".join(f"{v:>9.2f}" if v is not None else f"{'-':>9}" for v in t))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"M in {QUICK_MS} only, shorter timing")
    parser.add_argument("--sweep", action="store_true", help="add the BLOCK_N x BLOCK_K sweep at M=1")
    parser.add_argument("--sampler", action="store_true", help=f"add the sampler (batch {SAMPLER_MS})")
    parser.add_argument("--attention", action="store_true",
                        help=f"add decode attention (batch {ATTENTION_BATCHES}, context {ATTENTION_CONTEXTS}) and "
                             f"prefill attention (one prompt of {PREFILL_ATTENTION_TOKENS} tokens)")
    parser.add_argument("--pdl", action="store_true", help=f"add GEMV chains ({4 * PDL_LAYERS} kernels in a CUDA "
                                                             "graph) with programmatic dependent launch on and off")
    parser.add_argument("--out", default="data/results", help="output folder")
    parser.add_argument("--gemv-max-m", type=int, default=rl.GEMV_MAX_M, help="dispatch: GEMV up to this M")
    parser.add_argument("--cublas-min-m", type=int, default=rl.CUBLAS_MIN_M, help="dispatch: cuBLAS route from this M")
    parser.add_argument("--paths", type=lambda v: set(v.split(",")) if v else set(), default=set(FORCED_PATHS),
                        help=f"forced paths to time besides the dispatched one (comma-separated, of "
                             f"{(*QKV_PATHS, TMA_PATH)}; empty: none)")
    parser.add_argument("--ms", type=lambda v: tuple(int(m) for m in v.split(",") if m),
                        help="comma-separated M values (overrides --quick's; empty: none, e.g. with --sampler, --pdl)")
    parser.add_argument("--tag", default="", help="suffix of the result file's benchmark name, e.g. -decode")
    parser.add_argument("--models", type=lambda v: v.split(","), default=[m.preset for m in MODELS],
                        help=f"comma-separated presets, of {[m.preset for m in ALL_MODELS]}")
    args = parser.parse_args(argv)
    models = [m for m in ALL_MODELS if m.preset in args.models]
    if len(models) != len(set(args.models)):
        parser.error(f"--models: unknown presets {sorted(set(args.models) - {m.preset for m in models})}")
    rl.GEMV_MAX_M, rl.CUBLAS_MIN_M = args.gemv_max_m, args.cublas_min_m
    FORCED_PATHS.intersection_update(args.paths)
    if not torch.cuda.is_available():
        sys.exit("kernels.bench needs a CUDA GPU")
    CEILINGS.update(measure_ceilings())
    torch.manual_seed(0)
    rep = 10 if args.quick else 20
    start = time.time()
    rows = []

    def save():  # after every model too, so that a run cut short still leaves its rows
        write_result("kernels" + args.tag, rows, args.out, "python -m kernels.bench", argv, ceilings=CEILINGS,
                     dispatch={"GEMV_MAX_M": rl.GEMV_MAX_M, "CUBLAS_MIN_M": rl.CUBLAS_MIN_M, "SMALL_M": rl.SMALL_M},
                     autotuned=autotuned_configs())
    ms = args.ms if args.ms is not None else (QUICK_MS if args.quick else MS)
    # Per-kernel rows without PDL, comparable with the runs before it: the timing graph repeats one call,
    # and with PDL each launch would overlap the previous one's tail. bench_pdl measures that overlap.
    with pdl(False):
        for model in models:
            for op, bench in [(op, bench_op) for op in ops(model)] + [(op, bench_linear) for op in linear_ops(model)]:
                for M in ms_for(op, ms):
                    op_rows = bench(op, M, rep)
                    rows += op_rows
                    fused = op_rows[0]
                    print(f"{time.time() - start:6.0f}s {op.model} {op.op} M={M}: fused {fused['us_median']:.2f} us "
                          f"(floor {fused['floor_us']:.2f}), err {fused['rel_err_vs_fp64']:.2e}", flush=True)
                    torch.cuda.empty_cache()
            save()
        if any(r["impl"] in ("fused_tma_rows", "full_tma_rows") for r in rows):
            table = dispatch.write_table(rows, torch.cuda.get_device_name(), gpu_slug(), git_commit())
            print(f"wrote {table}: the TMA kernel's measured wins, which rmsnorm_linear's dispatch follows", flush=True)
        if args.sweep:
            rows += sweep(rep, models)
            save()
        if args.sampler:
            rows += bench_sampler(rep)
            save()
        if args.attention:
            rows += bench_attention(rep) + bench_prefill_attention(rep)
            save()
    if args.pdl:
        if not PDL_ALLOWED:
            raise SystemExit("--pdl, but KERNELS_PDL=0 in the environment turns PDL off (kernels.guard)")
        rows += bench_pdl(rep)
        save()
    print_table(rows)
    print(f"\n{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
