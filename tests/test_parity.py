"""The engine against transformers' Qwen3ForCausalLM on the same checkpoint, in fp32."""
import pytest
import torch
from transformers import Qwen3ForCausalLM

from minivllm import LLM, SamplingParams
from minivllm.layers.sampler import Sampler
from tests.helpers import random_prompts, tiny_checkpoint

CONFIGS = [
    dict(),  # GQA 4 query heads over 2 KV heads, untied
    dict(num_key_value_heads=1, tie_word_embeddings=True),  # MQA, tied embeddings
    dict(num_key_value_heads=4),  # MHA
]


class RecordingSampler(Sampler):
    def __init__(self):
        super().__init__()
        self.logits = []

    def forward(self, logits, *args):
        self.logits.append(logits.clone())
        return super().forward(logits, *args)


@pytest.mark.parametrize("overrides", CONFIGS, ids=["gqa-untied", "mqa-tied", "mha"])
def test_logits_and_greedy_tokens_match_transformers(overrides):
    ckpt = tiny_checkpoint(**overrides)
    llm = LLM(ckpt, device="cpu", kvcache_block_size=16)
    recorder = llm.model_runner.sampler = RecordingSampler()
    # Lengths cross block boundaries (16) and mix in one batch.
    prompts = random_prompts([1, 15, 16, 17, 40])
    steps = 10
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True), use_tqdm=False)
    hf = Qwen3ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    # All prompts prefill in one step and decode in lockstep, so row i of every step is prompt i.
    assert len(recorder.logits) == steps
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        tokens = out.outputs[0].token_ids
        full = torch.tensor([prompt + tokens])
        with torch.no_grad():
            ref_logits = hf(full).logits[0]
            ref_tokens = hf.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert tokens == ref_tokens
        for t in range(steps):
            ours, ref = recorder.logits[t][i], ref_logits[len(prompt) - 1 + t]
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
