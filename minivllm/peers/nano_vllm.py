"""nano-vLLM, the original (GeeeekExplorer/nano-vllm), on one of the benchmark workloads, as minivllm.bench
measures minivllm: the same requests (minivllm.workloads), the same timing and formulas (minivllm.peers.protocol).

    python -m minivllm.peers.nano_vllm --nano-vllm .peers/nano-vllm --model checkpoints/qwen3-0.6b \\
        --workload throughput|latency|ttft [--batches 1,8,32,128,256] [--prompt-lens 128] [--gen-tokens 128] \\
        [--reps 5] --rows-out rows.json

The --nano-vllm directory holds a ``git archive`` of a nano-vLLM commit and a COMMIT file naming it (the rows
record it); its code is not part of this repository. nano-vLLM
imports flash-attn, which has no wheel for our GPU box: ``minivllm/peers/standins/flash_attn`` stands in for it
on minivllm's Triton attention, so the two engines differ in everything except the attention kernel. Everything
else is nano-vLLM as published, with its defaults (CUDA graphs, 256-token KV blocks, max_num_seqs 512,
max_num_batched_tokens 16384, a KV cache of gpu_memory_utilization 0.9 of the GPU). The checkpoint must be bf16
or fp16: in fp32 nano-vLLM's RMSNorm normalises its input in place (``x.float()`` is then ``x``), residual included.

One workload per process: nano-vLLM initialises torch.distributed (NCCL on port 2333) once per process, and
max_model_len, which minivllm.bench sets per workload, fixes its CUDA graphs' block tables and with them how our
decode kernel splits the keys; a process per workload gives nano-vLLM minivllm's max_model_len exactly.

Differences from minivllm's rows, besides the engine: nano-vLLM cannot sample greedily (its SamplingParams assert
temperature > 1e-10), so latency and ttft run at NEAR_GREEDY_TEMPERATURE; its prefix cache is forgotten before
every timed run (``hash_to_block_id`` cleared, as minivllm.bench clears minivllm's), so no run hits blocks cached
by an earlier one; throughput runs nano-vLLM's own warm-up, then at least 3 timed runs (5 if any takes < 5 s).
"""
import os
import re
import sys

import torch
from transformers import AutoConfig

from minivllm.peers import STANDINS_DIR
from minivllm.peers.protocol import base_parser, check_vocab, emit, finish_args, workload_rows

PEER = "GeeeekExplorer/nano-vllm"
# Logits divided by 1e-9 leave softmax all its mass on the largest logit: argmax, except between exactly tied
# logits (which bf16 makes possible), where nano-vLLM's sampler picks one at random. Speed does not depend on it.
NEAR_GREEDY_TEMPERATURE = 1e-9
GPU_MEMORY_UTILIZATION = 0.9  # nano-vLLM's default


def parse_args(argv=None):
    parser = base_parser(__doc__.split("\n\n")[0], ["throughput", "latency", "ttft"], gen_tokens=128)
    parser.add_argument("--nano-vllm", required=True, help="directory of a nano-vLLM git archive with a COMMIT file")
    parser.add_argument("--num-seqs", type=int, default=256, help="throughput: requests")
    parser.add_argument("--gpu-memory-utilization", type=float, default=GPU_MEMORY_UTILIZATION,
                        help="nano-vLLM's share of the whole GPU for weights, activations and KV cache")
    return finish_args(parser, parser.parse_args(argv))


def max_model_len(args) -> int:
    """As minivllm.bench sizes minivllm's engine for the workload."""
    if args.workload == "throughput":
        return 4096
    if args.workload == "latency":
        return max(args.prompt_lens) + args.gen_tokens + 16
    return max(args.prompt_lens) + 8


def read_commit(nano_dir: str) -> str:
    path = os.path.join(nano_dir, "COMMIT")
    commit = open(path).read().strip() if os.path.exists(path) else ""
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise SystemExit(f"{path} must name the archived nano-vLLM commit (40 hex digits), found {commit!r}")
    return commit


def notes(args, model_len: int) -> str:
    sampling = ("temperature 0.6 as nano-vLLM's bench" if args.workload == "throughput" else
                f"temperature {NEAR_GREEDY_TEMPERATURE:g} (nano-vLLM cannot sample greedily; argmax but for exact "
                "ties)")
    return ("nano-vLLM as published but for attention: flash-attn's varlen and kvcache kernels replaced by "
            "minivllm's Triton paged attention (minivllm/peers/standins/flash_attn); its defaults (CUDA graphs, "
            f"256-token blocks, max_num_seqs 512, max_num_batched_tokens 16384), gpu_memory_utilization "
            f"{args.gpu_memory_utilization:g}, max_model_len {model_len} as minivllm.bench; {sampling}; prefix cache "
            "cleared before every timed run")


def base_row(args, commit: str, model_len: int) -> dict:
    return dict(engine="nano-vllm", fusion=None, tensor_parallel_size=1, model_name=args.model_name, peer=PEER,
                peer_commit=commit, max_model_len=model_len, notes=notes(args, model_len))


class NanoEngine:
    """nano-vLLM's LLM behind the protocol's engine interface."""

    def __init__(self, llm, sampling_params_cls):
        self.llm, self.SamplingParams = llm, sampling_params_cls

    def reset(self):
        # Blocks keep their hashes, but with no entry left here no later request can match them.
        self.llm.scheduler.block_manager.hash_to_block_id.clear()

    def generate(self, prompts, max_tokens):
        params = self.SamplingParams(temperature=NEAR_GREEDY_TEMPERATURE, max_tokens=max_tokens, ignore_eos=True)
        return [len(out["token_ids"]) for out in self.llm.generate(prompts, params, use_tqdm=False)]

    def generate_requests(self, requests):
        params = [self.SamplingParams(temperature=r.temperature, max_tokens=r.max_tokens, ignore_eos=r.ignore_eos)
                  for r in requests]
        outs = self.llm.generate([r.prompt_token_ids for r in requests], params, use_tqdm=False)
        return [len(out["token_ids"]) for out in outs]

    def warm_up(self, requests):
        self.llm.generate(["Benchmark: "], self.SamplingParams(), use_tqdm=False)  # nano-vLLM's bench.py

    def kv_cache_mb(self) -> float:
        cache = self.llm.model_runner.kv_cache
        return cache.numel() * cache.element_size() / 2**20


def engine_settings(args, model_len: int) -> dict:
    """nano-vLLM's LLM keeps only the keywords its Config has, silently: a test checks these against it."""
    return dict(enforce_eager=False, max_model_len=model_len, tensor_parallel_size=1,
                gpu_memory_utilization=args.gpu_memory_utilization)


def load_nano_vllm(nano_dir: str):
    """nano-vLLM's LLM and SamplingParams, imported with the stand-in flash_attn first on sys.path."""
    if not os.path.isdir(os.path.join(nano_dir, "nanovllm")):
        raise SystemExit(f"{nano_dir} holds no nanovllm package")
    sys.path[:0] = [STANDINS_DIR, os.path.abspath(nano_dir)]
    import flash_attn
    from nanovllm import LLM, SamplingParams
    if os.path.dirname(os.path.dirname(os.path.abspath(flash_attn.__file__))) != STANDINS_DIR:
        raise SystemExit(f"flash_attn came from {flash_attn.__file__}, not the stand-in")
    return LLM, SamplingParams


def main(argv=None):
    args = parse_args(argv)
    commit = read_commit(args.nano_vllm)
    config = AutoConfig.from_pretrained(args.model)
    if config.model_type != "qwen3":  # its runner builds a Qwen3ForCausalLM whatever the checkpoint
        raise SystemExit(f"nano-vLLM runs Qwen3 only, and {args.model} is a {config.model_type!r} checkpoint")
    check_vocab(args, config.vocab_size)
    if config.dtype not in (torch.bfloat16, torch.float16):
        # Its RMSNorm normalises x.float() in place, which for an fp32 model is x itself (the residual too).
        raise SystemExit(f"nano-vLLM computes wrong results for a {config.dtype} model: use a bf16 or fp16 checkpoint")
    if not torch.cuda.is_available():
        raise SystemExit("nano-vLLM needs a CUDA GPU")
    LLM, SamplingParams = load_nano_vllm(args.nano_vllm)
    model_len = max_model_len(args)
    llm = LLM(os.path.abspath(args.model), **engine_settings(args, model_len))
    emit(workload_rows(NanoEngine(llm, SamplingParams), args, base_row(args, commit, model_len)), args.rows_out)


if __name__ == "__main__":
    main()
