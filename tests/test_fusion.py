"""The fused RMSNorm+linear engine path against the unfused one."""
import pytest
import torch

from minivllm import LLM
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


def test_full_fusion_is_not_silently_accepted():
    with pytest.raises(NotImplementedError, match="full"):
        LLM(tiny_checkpoint(), device="cpu", fusion="full")
