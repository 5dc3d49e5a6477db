"""Shared test fixtures' building blocks: tiny checkpoints and engine runs."""
import json
import tempfile
import threading

import torch

from minivllm.make_checkpoint import make_checkpoint

_DIR = tempfile.mkdtemp(prefix="minivllm-ckpt-")
# The fields every peer row carries, as minivllm's own rows do.
PEER_ROW_FIELDS = {"workload", "engine", "fusion", "tensor_parallel_size", "model_name", "batch_size", "seq_len",
                   "latency_ms", "samples_ms", "throughput_tokens_per_sec", "peak_memory_mb", "peer", "peer_commit",
                   "notes"}


_CHECKPOINTS = {}


def tiny_checkpoint(preset: str = "qwen3-tiny", **overrides) -> str:
    """A tiny checkpoint (fp32 random weights; qwen3-tiny, llama-tiny or mistral-tiny), made once per
    test session per config."""
    key = json.dumps([preset, overrides], sort_keys=True)  # overrides may hold dicts (rope_scaling)
    if key not in _CHECKPOINTS:
        _CHECKPOINTS[key] = make_checkpoint(preset, f"{_DIR}/{len(_CHECKPOINTS)}-{preset}", **overrides)
    return _CHECKPOINTS[key]


def random_prompts(lengths, vocab=1024, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def run_in_threads(work, n: int):
    """Calls ``work(i)`` for i < n in n threads started together; re-raises what one of them raised
    (an assertion in a thread would not reach pytest otherwise)."""
    start, errors = threading.Barrier(n), []

    def run(i):
        try:
            start.wait()
            work(i)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def greedy_tokens(llm, prompts, max_tokens=12):
    from minivllm import SamplingParams
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                        use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]
