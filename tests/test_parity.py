"""The engine against transformers' model of each family (Qwen3, Llama, Mistral) on the same
checkpoint, in fp32."""
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from minivllm import LLM, SamplingParams
from minivllm.layers.rotary import rope_inv_freq
from minivllm.make_checkpoint import PRESETS
from tests.helpers import greedy_tokens, random_prompts, tiny_checkpoint

# Llama 3's RoPE with original_max_position_embeddings=32 below the longest prompt (40 + 10 tokens);
# at head_dim 16 and theta 1e4 the wavelengths 6.3, 19.9 and 62.8.. fall in its kept, smoothed and
# stretched bands.
LLAMA3_ROPE = dict(rope_theta=10000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                           high_freq_factor=4.0, original_max_position_embeddings=32))
CONFIGS = {
    "qwen3-gqa-untied": ("qwen3-tiny", dict()),  # 4 query heads over 2 KV heads
    "qwen3-mqa-tied": ("qwen3-tiny", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen3-mha": ("qwen3-tiny", dict(num_key_value_heads=4)),
    "llama2-gqa-untied": ("llama-tiny", dict()),
    "llama2-mha-tied": ("llama-tiny", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama2-attention-bias": ("llama-tiny", dict(attention_bias=True)),
    "llama3-rope-tied": ("llama-tiny", dict(tie_word_embeddings=True, **LLAMA3_ROPE)),
    "mistral-gqa-untied": ("mistral-tiny", dict()),
    "mistral-mqa-tied": ("mistral-tiny", dict(num_key_value_heads=1, tie_word_embeddings=True)),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_greedy_tokens_match_transformers(name):
    preset, overrides = CONFIGS[name]
    ckpt = tiny_checkpoint(preset, **overrides)
    llm = LLM(ckpt, device="cpu", kvcache_block_size=16)
    # Lengths cross block boundaries (16) and mix in one batch.
    prompts = random_prompts([1, 15, 16, 17, 40])
    steps = 10
    with llm.record_logits() as logits:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True),
                            use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    assert type(hf).__name__ == PRESETS[preset]["architecture"]
    # All prompts prefill in one step and decode in lockstep, so row i of every step is prompt i.
    assert len(logits) == steps
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        tokens = out.outputs[0].token_ids
        full = torch.tensor([prompt + tokens])
        with torch.no_grad():
            ref_logits = hf(full).logits[0]
            ref_tokens = hf.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert tokens == ref_tokens
        for t in range(steps):
            ours, ref = logits[t][i], ref_logits[len(prompt) - 1 + t]
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_llama3_inv_freq_is_transformers_for_the_published_configs():
    for preset in ("llama-3.2-1b", "llama-3.1-8b"):
        cfg = PRESETS[preset]
        hf = LlamaConfig(hidden_size=cfg["hidden_size"], num_attention_heads=cfg["num_attention_heads"],
                         head_dim=cfg["head_dim"], rope_theta=cfg["rope_theta"], rope_scaling=cfg["rope_scaling"])
        expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
        ours = rope_inv_freq(cfg["head_dim"], cfg["rope_theta"], cfg["rope_scaling"])
        assert not torch.equal(ours, rope_inv_freq(cfg["head_dim"], cfg["rope_theta"])), preset  # it does scale
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_published_rope_format_reads_as_transformers_5s(tmp_path):
    # transformers 5 writes rope_parameters (theta inside); Meta's config.json has rope_theta and
    # rope_scaling beside the other fields.
    src = tiny_checkpoint("llama-tiny", **LLAMA3_ROPE)
    dst = shutil.copytree(src, tmp_path / "published")
    cfg = json.loads((dst / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    assert rope["rope_type"] == "llama3"
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    (dst / "config.json").write_text(json.dumps(cfg))
    prompts = random_prompts([40])
    assert greedy_tokens(LLM(str(dst), device="cpu"), prompts) == greedy_tokens(LLM(src, device="cpu"), prompts)
