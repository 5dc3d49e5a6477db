"""End-to-end benchmarks (../shared/BENCHMARKS.md workloads 1, 2, 3 and 5) on one GPU.

    python -m minivllm.bench throughput --model checkpoints/qwen3-0.6b --fusion off,norm_linear
    python -m minivllm.bench latency    --model checkpoints/qwen3-0.6b --fusion off,norm_linear
    python -m minivllm.bench latency    --model checkpoints/qwen3-8b --tensor-parallel-size 1,2
    python -m minivllm.bench ttft       --model checkpoints/qwen3-0.6b
    python -m minivllm.bench hf         --model checkpoints/qwen3-0.6b

Each writes data/results/<benchmark>-<gpu slug>.json; fusion modes and tensor-parallel sizes
run side by side in one process. Every row carries the workload's floor (bytes that must
move / measured bandwidth).
"""
import argparse
import datetime
import gc
import json
import os
import random
import re
import subprocess
import sys
import time

import torch

from minivllm import LLM, SamplingParams
from minivllm.config import ModelConfig

COPY_BANDWIDTH = 3.02e12  # bytes/s, device-to-device copy on our H100 (shared/anchors)


def gpu_slug() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def hardware() -> dict:
    import triton
    info = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True).stdout.strip()
        except OSError:
            info["driver"] = "unknown"
    return info


def git_commit() -> str:
    """The commit the code ran at. A copy of the tree without its history (a GPU box's) names it in
    MINIVLLM_GIT_COMMIT."""
    if os.environ.get("MINIVLLM_GIT_COMMIT"):
        return os.environ["MINIVLLM_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def write_result(benchmark: str, rows: list[dict], out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{benchmark}-{gpu_slug()}.json")
    doc = {"benchmark": benchmark, "hardware": hardware(), "git_commit": git_commit(),
           "date": datetime.date.today().isoformat(), "command": " ".join(["python -m minivllm.bench", *sys.argv[1:]]),
           "rows": rows}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {path}")
    return path


def weight_bytes(cfg: ModelConfig, itemsize: int) -> int:
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = h * d * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    per_layer = attn + 3 * h * i + 2 * h + 2 * d
    embed = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    return itemsize * (cfg.num_hidden_layers * per_layer + embed + h)


def kv_bytes_per_token(cfg: ModelConfig, itemsize: int) -> int:
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * itemsize


def decode_floor_ms(cfg: ModelConfig, itemsize: int, batch: int, context: int, tensor_parallel_size: int) -> float:
    """One decode step must read every weight once and each sequence's KV cache once; with
    tensor parallelism each GPU reads its share at the same time (the all-reduces are extra)."""
    step_bytes = weight_bytes(cfg, itemsize) + batch * context * kv_bytes_per_token(cfg, itemsize)
    return 1e3 * step_bytes / tensor_parallel_size / COPY_BANDWIDTH


def engines(args, **kwargs):
    """One engine per tensor-parallel size and fusion mode, each shut down before the next
    starts (a process is rank 0 of one tensor-parallel group at a time)."""
    for tp in args.tensor_parallel_size:
        for fusion in args.fusion:
            gc.collect()
            torch.cuda.empty_cache()
            llm = LLM(args.model, fusion=fusion, enforce_eager=args.enforce_eager, tensor_parallel_size=tp, **kwargs)
            try:
                yield llm
            finally:
                llm.shutdown()


def timed_generate(llm: LLM, prompts, params) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def throughput(args) -> list[dict]:
    """Workload 1: nano-vLLM's benchmark."""
    random.seed(0)
    num = args.num_seqs
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(num)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=random.randint(100, 1024))
              for _ in range(num)]
    out_tokens = sum(p.max_tokens for p in params)
    rows = []
    for llm in engines(args, max_model_len=4096):
        cfg, itemsize = llm.config.hf_config, llm.config.torch_dtype.itemsize
        llm.generate(["Benchmark warm-up"], SamplingParams(max_tokens=8), use_tqdm=False)
        torch.cuda.reset_peak_memory_stats()
        seconds = timed_generate(llm, prompts, params)
        # Floor: each decode step reads the weights once; every token's KV is read at every later step.
        steps = max(p.max_tokens for p in params)
        kv_reads = sum(sum(len(pr) + t for t in range(p.max_tokens)) for pr, p in zip(prompts, params))
        tp = llm.config.tensor_parallel_size
        floor_s = ((steps * weight_bytes(cfg, itemsize) + kv_reads * kv_bytes_per_token(cfg, itemsize))
                   / tp / COPY_BANDWIDTH)
        rows.append(dict(workload="throughput", engine="minivllm", fusion=llm.config.fusion, tensor_parallel_size=tp,
                         model_name=args.model_name,
                         batch_size=num, seq_len=None, output_tokens=out_tokens, seconds=seconds,
                         latency_ms=1e3 * seconds, throughput_tokens_per_sec=out_tokens / seconds,
                         floor_s=floor_s, floor_tokens_per_sec=out_tokens / floor_s,
                         peak_memory_mb=torch.cuda.max_memory_allocated() / 2**20,
                         kv_cache_mb=llm.model_runner.kv_cache.numel() * itemsize / 2**20,  # rank 0's shard
                         preemptions=llm.scheduler.num_preemptions))
        print(rows[-1], flush=True)
    return rows


def latency(args) -> list[dict]:
    """Workload 2: ms per decode step = (time for 1 + N tokens - time for 1 token) / N."""
    gen = args.gen_tokens
    rows = []
    for llm in engines(args, max_model_len=max(args.prompt_lens) + gen + 16):
        cfg, itemsize = llm.config.hf_config, llm.config.torch_dtype.itemsize
        llm.generate([[1] * 16], SamplingParams(max_tokens=4), use_tqdm=False)
        for batch in args.batches:
            for plen in args.prompt_lens:
                gen_ = torch.Generator().manual_seed(batch * 100003 + plen)
                prompts = [torch.randint(0, 10000, (plen,), generator=gen_).tolist() for _ in range(batch)]
                # The first run of a prompt shape autotunes its prefill kernels: keep it out of the timing.
                for _ in range(2):
                    llm.scheduler.block_manager.hash_to_block_id.clear()  # no cross-run prefix hits
                    one = timed_generate(llm, prompts, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
                llm.scheduler.block_manager.hash_to_block_id.clear()
                torch.cuda.reset_peak_memory_stats()
                full = timed_generate(llm, prompts, SamplingParams(temperature=0, max_tokens=gen + 1, ignore_eos=True))
                step_ms = 1e3 * (full - one) / gen
                tp = llm.config.tensor_parallel_size
                floor = decode_floor_ms(cfg, itemsize, batch, plen + gen // 2, tp)
                rows.append(dict(workload="decode_latency", engine="minivllm", fusion=llm.config.fusion,
                                 tensor_parallel_size=tp,
                                 model_name=args.model_name, batch_size=batch, seq_len=plen, latency_ms=step_ms,
                                 prefill_ms=1e3 * one, floor_ms=floor, measured_over_floor=step_ms / floor,
                                 throughput_tokens_per_sec=batch * 1e3 / step_ms,
                                 peak_memory_mb=torch.cuda.max_memory_allocated() / 2**20,
                                 cuda_graphs=not args.enforce_eager))
                print(rows[-1], flush=True)
    return rows


def ttft(args) -> list[dict]:
    """Workload 3: time to first token at batch 1."""
    rows = []
    for llm in engines(args, max_model_len=max(args.prompt_lens) + 8):
        llm.generate([[1] * 16], SamplingParams(max_tokens=2), use_tqdm=False)
        for plen in args.prompt_lens:
            prompt = torch.randint(0, 10000, (plen,), generator=torch.Generator().manual_seed(plen)).tolist()
            times = []
            for _ in range(5):
                llm.scheduler.block_manager.hash_to_block_id.clear()
                times.append(timed_generate(llm, [prompt], SamplingParams(temperature=0, max_tokens=1)))
            rows.append(dict(workload="ttft", engine="minivllm", fusion=llm.config.fusion,
                             tensor_parallel_size=llm.config.tensor_parallel_size, model_name=args.model_name,
                             batch_size=1, seq_len=plen, latency_ms=1e3 * sorted(times)[2],
                             throughput_tokens_per_sec=plen / sorted(times)[2]))
            print(rows[-1], flush=True)
    return rows


def hf_peer(args) -> list[dict]:
    """HF transformers generate on the same checkpoint and GPU (eager, its default)."""
    from transformers import Qwen3ForCausalLM
    model = Qwen3ForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).cuda().eval()
    rows = []
    for batch in args.batches:
        plen = args.prompt_lens[0]
        ids = torch.randint(0, 10000, (batch, plen), device="cuda")
        timings = {}
        for gen in (1, args.gen_tokens + 1):
            with torch.inference_mode():
                model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)
                torch.cuda.synchronize()
                start = time.perf_counter()
                model.generate(ids, max_new_tokens=gen, min_new_tokens=gen, do_sample=False)
                torch.cuda.synchronize()
                timings[gen] = time.perf_counter() - start
        step_ms = 1e3 * (timings[args.gen_tokens + 1] - timings[1]) / args.gen_tokens
        rows.append(dict(workload="decode_latency", engine="hf_transformers", fusion="off", tensor_parallel_size=1,
                         model_name=args.model_name,
                         batch_size=batch, seq_len=plen, latency_ms=step_ms,
                         throughput_tokens_per_sec=batch * 1e3 / step_ms))
        print(rows[-1], flush=True)
    return rows


BENCHMARKS = {"throughput": ("engine_throughput", throughput), "latency": ("engine_latency", latency),
              "ttft": ("ttft", ttft), "hf": ("hf_latency", hf_peer)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS))
    parser.add_argument("--model", required=True)
    parser.add_argument("--model-name", default=None, help="label for the rows (default: the directory name)")
    parser.add_argument("--fusion", default="off", help="comma-separated fusion modes, run side by side")
    parser.add_argument("--tensor-parallel-size", default="1",
                        help="comma-separated tensor-parallel sizes (GPUs per engine), run side by side")
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--batches", default="1,8,32,128,256")
    parser.add_argument("--prompt-lens", default="32,512,4096")
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--out", default="data/results")
    parser.add_argument("--tag", default="", help="suffix for the result file's benchmark name")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("the benchmarks time a GPU; none is available")
    args.fusion = args.fusion.split(",")
    args.tensor_parallel_size = [int(t) for t in args.tensor_parallel_size.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.prompt_lens = [int(p) for p in args.prompt_lens.split(",")]
    args.model_name = args.model_name or os.path.basename(os.path.normpath(args.model))
    name, fn = BENCHMARKS[args.benchmark]
    write_result(name + args.tag, fn(args), args.out)


if __name__ == "__main__":
    main()
