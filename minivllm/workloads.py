"""The benchmark workloads' requests, in one place, so that minivllm and every peer engine
run exactly the same prompts (the protocol is the book's Method appendix, book/method.md).

Requests are plain data (token-id lists and a few sampling fields) that any engine's API can take.
"""
import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Request:
    prompt_token_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    ignore_eos: bool = True


def throughput_requests(num_seqs: int = 256) -> list[Request]:
    """Workload 1, nano-vLLM's bench.py: ``random.seed(0)``; each prompt is 100-1024 random ids
    below 10,000, then each request asks for 100-1024 tokens at temperature 0.6, ignoring EOS."""
    rng = random.Random(0)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))] for _ in range(num_seqs)]
    return [Request(p, rng.randint(100, 1024), temperature=0.6) for p in prompts]


def latency_prompts(batch: int, prompt_len: int) -> list[list[int]]:
    """Workload 2: ``batch`` random prompts of ``prompt_len`` ids, the same for every engine."""
    gen = torch.Generator().manual_seed(batch * 100003 + prompt_len)
    return [torch.randint(0, 10000, (prompt_len,), generator=gen).tolist() for _ in range(batch)]


def ttft_prompt(prompt_len: int) -> list[int]:
    """Workload 3: one random prompt of ``prompt_len`` ids."""
    return torch.randint(0, 10000, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)).tolist()
