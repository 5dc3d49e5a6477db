"""The fused engine paths (every rung of the ladder) against the unfused one."""
import pytest
import torch

from minivllm import LLM, SamplingParams
from minivllm.config import FUSION_MODES
from tests.helpers import greedy_tokens, random_prompts, tiny_checkpoint


@pytest.mark.parametrize("tied", [False, True])
def test_norm_linear_fusion_keeps_greedy_tokens(tied):
    ckpt = tiny_checkpoint(tie_word_embeddings=tied)
    prompts = random_prompts([1, 15, 17, 40], seed=11)
    off = LLM(ckpt, device="cpu", fusion="off")
    fused = LLM(ckpt, device="cpu", fusion="norm_linear")
    assert greedy_tokens(fused, prompts, max_tokens=16) == greedy_tokens(off, prompts, max_tokens=16)
    if tied:  # folding gamma must not touch the embedding that the lm_head shared
        torch.testing.assert_close(fused.model_runner.model.model.embed_tokens.weight,
                                   off.model_runner.model.model.embed_tokens.weight)


def test_full_fusion_keeps_greedy_tokens_through_caching_chunking_and_preemption():
    # CPU: the fused ops run their torch references, which must store K/V exactly where the
    # unfused attention layer did, for prefix-cache hits, prefill chunks and recomputation.
    ckpt = tiny_checkpoint()
    base = random_prompts([40], seed=12)[0]
    prompts = [base + tail for tail in random_prompts([3, 20], seed=13)] + random_prompts([1, 15, 33], seed=14)
    settings = dict(max_model_len=96, max_num_batched_tokens=24)  # chunked prefill
    reference = greedy_tokens(LLM(ckpt, device="cpu", fusion="off", **settings), prompts, max_tokens=30)
    full = LLM(ckpt, device="cpu", fusion="full", **settings)
    assert greedy_tokens(full, prompts, max_tokens=30) == reference
    again = full.generate(prompts, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == reference
    assert all(o.num_cached_tokens > 0 for o in again[:2])  # the second pass hit the prefix cache
    # 6 blocks of 16 tokens: one sequence fits, the batch does not, so sequences get preempted.
    tight = LLM(ckpt, device="cpu", fusion="full", num_kvcache_blocks=6, **settings)
    assert greedy_tokens(tight, prompts, max_tokens=30) == reference
    assert tight.scheduler.num_preemptions > 0


FAMILIES = {"qwen3": ("qwen3-tiny", {}), "llama2-tied": ("llama-tiny", dict(tie_word_embeddings=True)),
            "llama3-rope": ("llama-tiny", dict(rope_theta=10000.0, rope_scaling=dict(
                rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=32))),
            "mistral": ("mistral-tiny", {})}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_rung_of_the_ladder_keeps_offs_greedy_tokens(family):
    # On CPU each rung runs its ops' torch references: the wiring (which op gets which weights,
    # residuals, positions and cache slots) is what must agree, rung by rung. Llama and Mistral's
    # qkv_epilogue runs the qkv op without QK-norm.
    preset, overrides = FAMILIES[family]
    ckpt = tiny_checkpoint(preset, **overrides)
    prompts = random_prompts([1, 17, 40], seed=21)
    reference = greedy_tokens(LLM(ckpt, device="cpu", fusion="off"), prompts, max_tokens=12)
    for mode in FUSION_MODES:
        if mode != "off":
            assert greedy_tokens(LLM(ckpt, device="cpu", fusion=mode), prompts, max_tokens=12) == reference, mode


def test_fusion_is_chosen_once_per_model():
    model = LLM(tiny_checkpoint(), device="cpu", fusion="norm_linear").model_runner.model
    with pytest.raises(RuntimeError, match="once"):
        model.set_fusion("full")  # the norms are folded already: folding again would scale twice


def test_unknown_fusion_is_rejected():
    with pytest.raises(ValueError, match="fusion"):
        LLM(tiny_checkpoint(), device="cpu", fusion="everything")


def test_fusing_the_norms_refuses_attention_biases():
    for mode in ("norm_linear", "full"):
        with pytest.raises(ValueError, match=f"fusion='{mode}'.*attention_bias=True"):
            LLM(tiny_checkpoint("llama-tiny", attention_bias=True), device="cpu", fusion=mode)
