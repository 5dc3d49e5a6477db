"""The engine on the GPU: Triton attention, CUDA graphs and fusion against the CPU reference."""
import os

import pytest
import torch

from minivllm import LLM, SamplingParams
from minivllm.make_checkpoint import make_checkpoint
from tests.helpers import greedy_tokens, random_prompts, tiny_checkpoint

pytestmark = pytest.mark.gpu


def test_tiny_fp32_on_gpu_matches_cpu_reference():
    ckpt = tiny_checkpoint()
    prompts = random_prompts([1, 15, 17, 40, 300], seed=21)
    cpu = greedy_tokens(LLM(ckpt, device="cpu"), prompts, max_tokens=24)
    for eager in (True, False):
        for fusion in ("off", "norm_linear"):
            llm = LLM(ckpt, device="cuda", dtype="float32", enforce_eager=eager, fusion=fusion,
                      kvcache_block_size=16, max_num_seqs=8, max_model_len=512)
            assert greedy_tokens(llm, prompts, max_tokens=24) == cpu, (eager, fusion)


@pytest.fixture(scope="module")
def qwen3_06b(tmp_path_factory):
    path = os.environ.get("MINIVLLM_QWEN3_06B") or str(tmp_path_factory.mktemp("ckpt") / "qwen3-0.6b")
    if not os.path.exists(os.path.join(path, "config.json")):
        make_checkpoint("qwen3-0.6b", path, device="cuda")
    return path


def last_logits(llm, prompts):
    """Logits of the first sampled token of each prompt (prefill), through the engine's sampler."""
    seen = []
    sampler = llm.model_runner.sampler
    original = sampler.forward
    sampler.forward = lambda logits, *a: seen.append(logits.clone()) or original(logits, *a)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    sampler.forward = original
    return torch.cat(seen)


def test_qwen3_06b_bf16_fusion_and_graphs_agree(qwen3_06b):
    prompts = random_prompts([7, 100, 513], vocab=151936, seed=22)
    off = LLM(qwen3_06b, max_model_len=1024, max_num_seqs=16, gpu_memory_utilization=0.5)
    ref = last_logits(off, prompts)
    graph_tokens = greedy_tokens(off, prompts, max_tokens=32)
    del off
    eager = LLM(qwen3_06b, max_model_len=1024, max_num_seqs=16, gpu_memory_utilization=0.5, enforce_eager=True)
    assert greedy_tokens(eager, prompts, max_tokens=32) == graph_tokens
    del eager
    fused = LLM(qwen3_06b, max_model_len=1024, max_num_seqs=16, gpu_memory_utilization=0.5, fusion="norm_linear")
    got = last_logits(fused, prompts)
    # bf16 tolerance: the two paths round differently (folded weights, deferred 1/rms).
    rel = (got - ref).norm() / ref.norm()
    assert torch.isfinite(got).all() and rel < 2e-2, rel
