"""The benchmark protocol as the peer runners apply it, engine-agnostic: the shared command line, the timing of
``generate`` calls as ``minivllm.bench`` times minivllm's, and the result rows.

Timing: CUDA-synchronised wall time of one ``generate`` call that runs its requests to completion, after an
untimed warm-up of the same shape (a shape's first run compiles and autotunes: how much longer it took than the
median is kept as ``first_call_overhead_s``). Decode latency is minivllm.bench's
``(time of 1 + N tokens - time of 1 token) / N`` per decode step; here each sample is one such pair of runs, and
every configuration is measured ``--reps`` times (5 by default) with the samples and their spread kept in the row
and their median reported as ``latency_ms``. An engine's ``reset()`` runs untimed before every timed call
(nano-vLLM forgets its prefix cache, as minivllm.bench clears minivllm's).

An engine here is any object with ``reset()`` and ``generate(prompts, max_tokens) -> generated token counts``.
"""
import argparse
import functools
import json
import os
import statistics
import time

import torch

from minivllm.workloads import latency_prompts, throughput_requests, ttft_prompt

MIN_REPS = 5
LATENCY_BATCHES = [1, 8, 32, 128, 256]  # BENCHMARKS.md's workload 2
THROUGHPUT_REPS = 3  # enough when each run is longer than LONG_RUN_S, else MIN_REPS
LONG_RUN_S = 5.0


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def base_parser(description: str, workloads: list[str], gen_tokens: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True, help="HF-format checkpoint directory")
    parser.add_argument("--model-name", default=None, help="label for the rows (default: the directory name)")
    parser.add_argument("--workload", required=True, choices=workloads, help="one workload per process")
    parser.add_argument("--batches", type=int_list, default=LATENCY_BATCHES, help="latency: batch sizes")
    parser.add_argument("--prompt-lens", type=int_list, default=[128], help="latency and ttft: prompt lengths")
    parser.add_argument("--gen-tokens", type=int, default=gen_tokens, help="latency: decode steps timed")
    parser.add_argument("--reps", type=int, default=MIN_REPS, help="timed samples per configuration")
    parser.add_argument("--rows-out", required=True, help="JSON file for the result rows (rewritten after each row)")
    return parser


def finish_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if args.reps < 1 or args.gen_tokens < 1:
        parser.error("--reps and --gen-tokens must be positive")
    args.model_name = args.model_name or os.path.basename(os.path.normpath(args.model))
    return args


def check_vocab(args, vocab_size: int):
    """SystemExit unless the workload's prompts' token ids fit the model's vocabulary (the tiny test model's
    1,024 ids do not hold the workloads' random ids below 10,000)."""
    if args.workload == "throughput":
        top = max(max(r.prompt_token_ids) for r in throughput_requests(args.num_seqs))
    elif args.workload == "latency":
        top = max(max(p) for b in args.batches for n in args.prompt_lens for p in latency_prompts(b, n))
    else:
        top = max(max(ttft_prompt(n)) for n in args.prompt_lens)
    if top >= vocab_size:
        raise SystemExit(f"the {args.workload} prompts use token ids up to {top}, beyond the model's vocabulary "
                         f"({vocab_size})")


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak_memory():
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def timed_s(engine, run, clock=time.perf_counter) -> float:
    """Seconds of ``run()`` after an untimed ``engine.reset()``, the GPU synchronised on both sides."""
    engine.reset()
    synchronize()
    start = clock()
    run()
    synchronize()
    return clock() - start


def generate_checked(engine, prompts, max_tokens):
    counts = engine.generate(prompts, max_tokens)
    if list(counts) != [max_tokens] * len(prompts):
        raise RuntimeError(f"asked {len(prompts)} prompts for {max_tokens} tokens each, got {list(counts)}")


def median(xs) -> float:
    return statistics.median(xs)


def decode_latency_samples(engine, prompts, gen_tokens, reps, clock=time.perf_counter):
    """Per-step ms and prefill (1-token run) ms samples, one pair of runs per sample, after an untimed run of
    each; and how many seconds the first full run took beyond the median one (compiling, autotuning)."""
    one = functools.partial(generate_checked, engine, prompts, 1)
    full = functools.partial(generate_checked, engine, prompts, gen_tokens + 1)
    first_s = timed_s(engine, full, clock)
    timed_s(engine, one, clock)
    steps_ms, prefill_ms, full_s = [], [], []
    for _ in range(reps):
        one_s = timed_s(engine, one, clock)
        full_s.append(timed_s(engine, full, clock))
        steps_ms.append(1e3 * (full_s[-1] - one_s) / gen_tokens)
        prefill_ms.append(1e3 * one_s)
    return steps_ms, prefill_ms, first_s - median(full_s)


def repeat_until_enough(run) -> list[float]:
    """Seconds of THROUGHPUT_REPS runs of ``run()`` (itself timed), more up to MIN_REPS while any was shorter
    than LONG_RUN_S."""
    samples = [run() for _ in range(THROUGHPUT_REPS)]
    while len(samples) < MIN_REPS and min(samples) < LONG_RUN_S:
        samples.append(run())
    return samples


def row(base: dict, workload: str, batch_size: int, seq_len: int | None, samples_ms: list[float], tokens: int,
        **fields) -> dict:
    """A result row: ``latency_ms`` is the median sample, ``throughput_tokens_per_sec`` ``tokens`` per median."""
    latency_ms = median(samples_ms)
    return dict(workload=workload, **base, batch_size=batch_size, seq_len=seq_len, latency_ms=latency_ms,
                samples_ms=samples_ms, spread_ms=max(samples_ms) - min(samples_ms),
                throughput_tokens_per_sec=tokens * 1e3 / latency_ms, **fields)


def latency_rows(engine, args, base: dict, clock=time.perf_counter):
    """Workload 2: ms per decode step for each batch size and prompt length."""
    for batch in args.batches:
        for prompt_len in args.prompt_lens:
            prompts = latency_prompts(batch, prompt_len)
            reset_peak_memory()
            steps_ms, prefill_ms, first_extra_s = decode_latency_samples(engine, prompts, args.gen_tokens,
                                                                         args.reps, clock)
            yield row(base, "decode_latency", batch, prompt_len, steps_ms, batch, gen_tokens=args.gen_tokens,
                      prefill_ms=median(prefill_ms), prefill_samples_ms=prefill_ms,
                      first_call_overhead_s=first_extra_s, peak_memory_mb=peak_memory_mb())


def ttft_rows(engine, args, base: dict, clock=time.perf_counter):
    """Workload 3: time to first token at batch 1, one untimed run first."""
    for prompt_len in args.prompt_lens:
        prompt = [ttft_prompt(prompt_len)]
        run = functools.partial(generate_checked, engine, prompt, 1)
        reset_peak_memory()
        first_s = timed_s(engine, run, clock)
        samples_ms = [1e3 * timed_s(engine, run, clock) for _ in range(args.reps)]
        yield row(base, "ttft", 1, prompt_len, samples_ms, prompt_len,
                  first_call_overhead_s=first_s - median(samples_ms) / 1e3, peak_memory_mb=peak_memory_mb())


def emit(rows, path: str) -> list[dict]:
    """Print each row as it comes and rewrite the file with the rows so far (a run cut short keeps them)."""
    done = []
    for r in rows:
        done.append(r)
        with open(path, "w") as f:
            json.dump(done, f, indent=1)
        print(json.dumps(r), flush=True)
    return done


def run_requests_checked(engine, requests):
    counts = engine.generate_requests(requests)
    if counts != [r.max_tokens for r in requests]:
        raise RuntimeError(f"throughput: {sum(counts)} tokens generated, {sum(r.max_tokens for r in requests)} asked")


def throughput_rows(engine, args, base, clock=time.perf_counter):
    """Workload 1, nano-vLLM's bench: total output tokens / wall time of one generate of all requests, after the
    engine's own warm-up; an engine here also has ``generate_requests``, ``warm_up`` and ``kv_cache_mb``."""
    requests = throughput_requests(args.num_seqs)
    out_tokens = sum(r.max_tokens for r in requests)
    engine.warm_up(requests)
    reset_peak_memory()
    samples_s = repeat_until_enough(
        functools.partial(timed_s, engine, functools.partial(run_requests_checked, engine, requests), clock))
    yield row(base, "throughput", len(requests), None, [1e3 * s for s in samples_s], out_tokens,
              output_tokens=out_tokens, peak_memory_mb=peak_memory_mb(), kv_cache_mb=engine.kv_cache_mb())


def workload_rows(engine, args, base, clock=time.perf_counter):
    rows = {"throughput": throughput_rows, "latency": latency_rows, "ttft": ttft_rows}[args.workload]
    return rows(engine, args, base, clock)
