"""End-to-end benchmarks (workloads 1, 2, 3 and 5 of the book's Method appendix) on one GPU:
every rung of the fusion ladder, and the peer engines, in one process run.

    python -m minivllm.bench throughput --model checkpoints/qwen3-0.6b --fusion off,norm_linear,full
    python -m minivllm.bench latency    --model checkpoints/qwen3-0.6b --fusion all --peers nano-vllm,hf
    python -m minivllm.bench latency    --model checkpoints/qwen3-8b --tensor-parallel-size 1,2
    python -m minivllm.bench ttft       --model checkpoints/qwen3-0.6b
    python -m minivllm.bench latency    --model checkpoints/qwen3-0.6b --fusion full --pdl off,on --batches 1

Each writes data/results/<benchmark>-<gpu slug>.json. The GPU's ceilings (copy bandwidth, bf16
matmul rate) are measured first and every floor is computed from them. Each configuration is
measured ``--reps`` times; a row keeps its samples and reports their median. Peers run in their
own processes (``minivllm.peers``) on the same GPU, after minivllm's engines have been shut down.
"""
import argparse
import gc
import itertools
import os
import signal
import statistics
import sys
import time

import torch

from kernels.guard import PDL_ALLOWED, PDL_TRIGGER, autotuned_configs
from minivllm import LLM, SamplingParams, workloads
from minivllm.config import FUSION_MODES
from minivllm.costs import decode_floor_ms, measure_ceilings, throughput_floor_parts_s
from minivllm.results import write_result

PEERS = ("nano-vllm", "hf", "hf_compiled")


def engines(args, **kwargs):
    """One engine per tensor-parallel size, fusion mode, PDL, async-scheduling and prefill-graph setting, each
    shut down before the next starts (a process is rank 0 of one tensor-parallel group at a time)."""
    for tp, fusion, pdl, overlap, prefill_graphs in itertools.product(
            args.tensor_parallel_size, args.fusion, args.pdl, args.async_scheduling, args.prefill_graphs):
        gc.collect()
        torch.cuda.empty_cache()
        llm = LLM(args.model, fusion=fusion, enforce_eager=args.enforce_eager, tensor_parallel_size=tp, pdl=pdl,
                  async_scheduling=overlap, prefill_graphs=prefill_graphs, **kwargs)
        try:
            yield llm
        finally:
            llm.shutdown()


def timed_generate(llm: LLM, prompts, params) -> float:
    """Seconds for one ``generate``, from a cold prefix cache."""
    llm.reset_prefix_cache()
    torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def stats(samples_ms: list[float]) -> dict:
    return dict(latency_ms=statistics.median(samples_ms), samples_ms=samples_ms,
                spread_ms=max(samples_ms) - min(samples_ms))


def base_row(llm: LLM, args, workload: str) -> dict:
    return dict(workload=workload, engine="minivllm", fusion=llm.config.fusion, pdl=llm.config.pdl,
                pdl_trigger=PDL_TRIGGER if llm.config.pdl and PDL_ALLOWED else None,
                async_scheduling=llm.config.async_scheduling, prefill_graphs=llm.config.prefill_graphs,
                tensor_parallel_size=llm.config.tensor_parallel_size, model_name=args.model_name)


def memory_fields(llm: LLM) -> dict:
    """``peak_memory_mb`` (the allocator's peak since the row's reset: mostly the preallocated KV pool) and
    what it is made of (``LLM.memory_stats``, rank 0's shard): weights, the largest step's activations,
    the KV pool and the most of it in use at once."""
    stats = {k.removesuffix("_bytes") + "_mb": None if v is None else v / 2**20 for k, v in llm.memory_stats().items()}
    return dict(peak_memory_mb=torch.cuda.max_memory_allocated() / 2**20, kv_cache_mb=stats.pop("kv_pool_mb"), **stats)


def profiled_run(llm: LLM, prompts, params) -> dict:
    """``run_profile``: one more ``generate`` under the profiler, its GPU time by kernel category
    (``minivllm.profile.gpu_time_by_category``) and its wall time, which the profiler lengthens."""
    from torch.profiler import ProfilerActivity, profile

    from minivllm.profile import gpu_time_by_category
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        wall_s = timed_generate(llm, prompts, params)
    return dict(run_profile=dict(gpu_time_by_category(prof), wall_s=wall_s))


def throughput(args, ceilings, emit):
    """Workload 1: nano-vLLM's benchmark; ``latency_ms`` is the median wall time of ``generate``, and with
    ``--profile-run`` a row has its ``run_profile`` too."""
    requests = workloads.throughput_requests(args.num_seqs)
    prompts = [r.prompt_token_ids for r in requests]
    params = [SamplingParams(temperature=r.temperature, ignore_eos=r.ignore_eos, max_tokens=r.max_tokens)
              for r in requests]
    out_tokens = sum(r.max_tokens for r in requests)
    for llm in engines(args, max_model_len=4096):
        cfg, itemsize, tp = llm.config.hf_config, llm.config.torch_dtype.itemsize, llm.config.tensor_parallel_size
        llm.generate(["Benchmark warm-up"], SamplingParams(max_tokens=8), use_tqdm=False)
        torch.cuda.reset_peak_memory_stats()
        s = stats([1e3 * timed_generate(llm, prompts, params) for _ in range(args.reps)])
        floor = throughput_floor_parts_s(cfg, itemsize, [len(p) for p in prompts], [r.max_tokens for r in requests],
                                         tp, ceilings["copy_bytes_per_s"])
        floor_s = sum(floor.values())
        profiled = profiled_run(llm, prompts, params) if args.profile_run else {}
        emit(dict(base_row(llm, args, "throughput"), batch_size=len(requests), seq_len=None,
                  output_tokens=out_tokens, **s, seconds=s["latency_ms"] / 1e3,
                  throughput_tokens_per_sec=1e3 * out_tokens / s["latency_ms"],
                  throughput_samples=[1e3 * out_tokens / t for t in s["samples_ms"]],
                  floor_s=floor_s, floor_weights_s=floor["weights"], floor_kv_s=floor["kv"],
                  floor_tokens_per_sec=out_tokens / floor_s,
                  **memory_fields(llm), preemptions=llm.scheduler.num_preemptions, **profiled))


def latency(args, ceilings, emit):
    """Workload 2: ms per decode step. Each sample is (time for 1 + N tokens - time for 1 token) / N,
    the mean step of one run; ``latency_ms`` is the median of the samples."""
    gen = args.gen_tokens
    greedy = dict(temperature=0, ignore_eos=True)
    for llm in engines(args, max_model_len=max(args.prompt_lens) + gen + 16):
        cfg, itemsize, tp = llm.config.hf_config, llm.config.torch_dtype.itemsize, llm.config.tensor_parallel_size
        llm.generate([[1] * 16], SamplingParams(max_tokens=4), use_tqdm=False)
        for batch in args.batches:
            for plen in args.prompt_lens:
                prompts = workloads.latency_prompts(batch, plen)
                # The first run of a prompt shape autotunes its prefill kernels: keep it out of the timing.
                timed_generate(llm, prompts, SamplingParams(max_tokens=1, **greedy))
                torch.cuda.reset_peak_memory_stats()
                samples, prefill = [], []
                for _ in range(args.reps):
                    one = timed_generate(llm, prompts, SamplingParams(max_tokens=1, **greedy))
                    full = timed_generate(llm, prompts, SamplingParams(max_tokens=gen + 1, **greedy))
                    samples.append(1e3 * (full - one) / gen)
                    prefill.append(1e3 * one)
                floor = decode_floor_ms(cfg, itemsize, batch, plen + gen // 2, tp, ceilings["copy_bytes_per_s"])
                s = stats(samples)
                emit(dict(base_row(llm, args, "decode_latency"), batch_size=batch, seq_len=plen, **s,
                          prefill_ms=statistics.median(prefill), floor_ms=floor,
                          measured_over_floor=s["latency_ms"] / floor,
                          throughput_tokens_per_sec=batch * 1e3 / s["latency_ms"],
                          **memory_fields(llm), cuda_graphs=not args.enforce_eager))


def ttft(args, ceilings, emit):
    """Workload 3: time to first token at batch 1 (a generate of one token, from a cold cache); with
    ``--profile-run`` a row has its ``run_profile`` too."""
    for llm in engines(args, max_model_len=max(args.prompt_lens) + 8):
        llm.generate([[1] * 16], SamplingParams(max_tokens=2), use_tqdm=False)
        for plen in args.prompt_lens:
            prompt = workloads.ttft_prompt(plen)
            params = SamplingParams(temperature=0, max_tokens=1)
            timed_generate(llm, [prompt], params)  # autotunes this prompt shape's kernels
            s = stats([1e3 * timed_generate(llm, [prompt], params) for _ in range(args.reps)])
            profiled = profiled_run(llm, [prompt], params) if args.profile_run else {}
            emit(dict(base_row(llm, args, "ttft"), batch_size=1, seq_len=plen, **s,
                      throughput_tokens_per_sec=1e3 * plen / s["latency_ms"], **profiled))


def peer_rows(args, emit, failed: dict, save):
    """The peers of ``--peers`` on the same workload and prompts, each in its own process (run after
    minivllm's engines are shut down: nano-vLLM sizes its KV cache from the GPU memory left free).
    HF runs its own batch sizes and decode length (its eager steps are CPU-bound, tens of ms, so it times
    fewer tokens). A peer that fails is named in ``failed`` with its output's tail, and the others still run;
    a stage limit's SIGTERM names the peer it stopped and those it left unstarted, saved before exiting."""
    from minivllm import peers
    common = ["--model", args.model, "--model-name", args.model_name, "--workload", args.benchmark,
              "--prompt-lens", ",".join(map(str, args.prompt_lens)), "--reps", str(args.reps)]
    for i, peer in enumerate(args.peers):
        if peer == "nano-vllm":
            module, argv = "nano_vllm", ["--nano-vllm", args.nano_vllm, "--num-seqs", str(args.num_seqs),
                                         "--batches", ",".join(map(str, args.batches)),
                                         "--gen-tokens", str(args.gen_tokens)]
        else:
            module, argv = "hf", ["--mode", "compiled" if peer == "hf_compiled" else "eager",
                                  "--num-seqs", str(args.num_seqs)]
        gc.collect()
        torch.cuda.empty_cache()
        start = time.perf_counter()
        try:
            for row in peers.run_peer(module, argv + common, args.peer_timeout):
                emit(row)
        except peers.PeerError as e:
            failed[peer] = str(e)[-4000:]
            print(f"peer {peer} failed: {e}", flush=True)
        except SystemExit:
            failed[peer] = f"stopped by SIGTERM (a stage limit) {time.perf_counter() - start:.0f} s after it started"
            failed.update({p: "not started: the run was stopped before it" for p in args.peers[i + 1:]})
            save()
            raise


BENCHMARKS = {"throughput": ("engine_throughput", throughput), "latency": ("engine_latency", latency),
              "ttft": ("ttft", ttft)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS))
    parser.add_argument("--model", required=True)
    parser.add_argument("--model-name", default=None, help="label for the rows (default: the directory name)")
    parser.add_argument("--fusion", default="off",
                        help=f"comma-separated fusion modes run side by side, or 'all' ({', '.join(FUSION_MODES)})")
    parser.add_argument("--tensor-parallel-size", default="1",
                        help="comma-separated tensor-parallel sizes (GPUs per engine), run side by side")
    parser.add_argument("--peers", default="", help=f"comma-separated peer engines to run too, of {PEERS}")
    parser.add_argument("--nano-vllm", default=os.environ.get("NANO_VLLM_DIR"),
                        help="nano-vLLM's source directory (a git archive of a named commit), for --peers nano-vllm")
    parser.add_argument("--peer-timeout", type=float, default=600, help="seconds each peer process may take")
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--batches", default="1,8,32,128,256")
    parser.add_argument("--prompt-lens", default="32,512,4096")
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5, help="samples per configuration")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--pdl", default="on" if PDL_ALLOWED else "off", choices=("on", "off", "on,off", "off,on"),
                        help="programmatic dependent launch (Config.pdl): on (the default unless KERNELS_PDL=0), off, "
                             "or both side by side (A/B)")
    parser.add_argument("--async-scheduling", default="on", choices=("on", "off", "on,off", "off,on"),
                        help="generate's overlap of the host with the GPU (Config.async_scheduling): on, off, or both")
    parser.add_argument("--prefill-graphs", default="on", choices=("on", "off", "on,off", "off,on"),
                        help="small prefill steps replayed from padded graphs (Config.prefill_graphs): on, off or both")
    parser.add_argument("--profile-run", action="store_true",
                        help="throughput, ttft: one more run under the profiler, its GPU time by kernel category")
    parser.add_argument("--out", default="data/results")
    parser.add_argument("--tag", default="", help="suffix for the result file's benchmark name")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("the benchmarks time a GPU; none is available")
    # A stage limit (timeout) sends SIGTERM: unwind, so that a running peer's process is killed with us
    # instead of holding the GPU's memory for the next stage.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    args.fusion = list(FUSION_MODES) if args.fusion == "all" else args.fusion.split(",")
    args.pdl = [v == "on" for v in args.pdl.split(",")]
    args.async_scheduling = [v == "on" for v in args.async_scheduling.split(",")]
    args.prefill_graphs = [v == "on" for v in args.prefill_graphs.split(",")]
    if any(args.pdl) and not PDL_ALLOWED:
        parser.error("--pdl on, but KERNELS_PDL=0 in the environment turns PDL off (kernels.guard)")
    args.peers = [p for p in args.peers.split(",") if p]
    unknown = set(args.peers) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}: choose from {PEERS}")
    if "nano-vllm" in args.peers and not args.nano_vllm:
        parser.error("--peers nano-vllm needs --nano-vllm DIR (or NANO_VLLM_DIR)")
    args.tensor_parallel_size = [int(t) for t in args.tensor_parallel_size.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.prompt_lens = [int(p) for p in args.prompt_lens.split(",")]
    args.model_name = args.model_name or os.path.basename(os.path.normpath(args.model))
    ceilings = measure_ceilings()
    print(f"ceilings: copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
          f"bf16 matmul {ceilings['bf16_matmul_flops_per_s'] / 1e12:.0f} TFLOP/s", flush=True)
    name, fn = BENCHMARKS[args.benchmark]
    rows, failed = [], {}

    def save():
        return write_result(name + args.tag, rows, args.out, "python -m minivllm.bench", argv, ceilings=ceilings,
                     failed_peers=failed, autotuned=autotuned_configs())

    def emit(row):  # the file is rewritten after every row: a run cut short keeps what it measured
        rows.append(row)
        print(row, flush=True)
        save()

    fn(args, ceilings, emit)
    peer_rows(args, emit, failed, save)
    return save()


if __name__ == "__main__":
    main()
