"""Writes an HF-format checkpoint (Qwen3, Llama or Mistral) with seeded random weights and an
offline-trained byte-level BPE tokenizer: the embedded default model of the tests, notebooks and
benchmarks.

    python -m minivllm.make_checkpoint --preset qwen3-0.6b --out checkpoints/qwen3-0.6b

Each full-size preset's architecture config is exactly that of the released model (its config.json
on the Hugging Face hub), so speed measured on it is the real model's speed; a real checkpoint
directory loads through the same loader. Only the tokenizer is not the model's (the hub is offline
here), so vocab_size keeps the real embedding shape while ids above the tokenizer's are never typed.
"""
import argparse
import json
import os
import zlib

import torch
from safetensors.torch import save_file

LLAMA3_ROPE = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
QWEN3, LLAMA, MISTRAL = "Qwen3ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM"


def preset(architecture, vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
           num_key_value_heads, head_dim, tie_word_embeddings, max_position_embeddings, rms_norm_eps, rope_theta,
           torch_dtype, **family_fields) -> dict:
    """One preset's config.json fields; ``family_fields`` are those only some families have (and
    the fields that tests may override must be named here)."""
    fields = dict(locals())
    return {**fields.pop("family_fields"), **fields}


# The released models' configs (their config.json on the Hugging Face hub), and the tests' tiny models
# (the tiny Qwen3's shapes; overrides give the Llama one Llama 3's RoPE).
PRESETS = {
    #                     architecture vocab  hidden inter  layers heads kv head tied  max_pos eps   theta  dtype
    "qwen3-tiny": preset(QWEN3, 1024, 64, 160, 2, 4, 2, 16, False, 4096, 1e-6, 1e6, "float32"),
    "llama-tiny": preset(LLAMA, 1024, 64, 160, 2, 4, 2, 16, False, 4096, 1e-5, 1e4, "float32", rope_scaling=None),
    "mistral-tiny": preset(MISTRAL, 1024, 64, 160, 2, 4, 2, 16, False, 4096, 1e-5, 1e6, "float32",
                           sliding_window=None),
    "qwen3-0.6b": preset(QWEN3, 151936, 1024, 3072, 28, 16, 8, 128, True, 40960, 1e-6, 1e6, "bfloat16"),
    "qwen3-8b": preset(QWEN3, 151936, 4096, 12288, 36, 32, 8, 128, False, 40960, 1e-6, 1e6, "bfloat16"),
    # meta-llama/Llama-3.2-1B (tied embeddings, head_dim 64) and Llama-3.1-8B: the llama3 RoPE.
    "llama-3.2-1b": preset(LLAMA, 128256, 2048, 8192, 16, 32, 8, 64, True, 131072, 1e-5, 5e5, "bfloat16",
                           rope_scaling=LLAMA3_ROPE),
    "llama-3.1-8b": preset(LLAMA, 128256, 4096, 14336, 32, 32, 8, 128, False, 131072, 1e-5, 5e5, "bfloat16",
                           rope_scaling={**LLAMA3_ROPE, "factor": 8.0}),
    # meta-llama/Llama-2-7b-hf and -13b-hf: MHA, plain RoPE, fp16 weights.
    "llama-2-7b": preset(LLAMA, 32000, 4096, 11008, 32, 32, 32, 128, False, 4096, 1e-5, 1e4, "float16",
                         rope_scaling=None),
    "llama-2-13b": preset(LLAMA, 32000, 5120, 13824, 40, 40, 40, 128, False, 4096, 1e-5, 1e4, "float16",
                          rope_scaling=None),
    # mistralai/Mistral-7B-v0.3: no sliding window (v0.1's sliding_window=4096 is refused by the engine).
    "mistral-7b": preset(MISTRAL, 32768, 4096, 14336, 32, 32, 8, 128, False, 32768, 1e-5, 1e6, "bfloat16",
                         sliding_window=None),
}
COMMON = dict(attention_bias=False, hidden_act="silu")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "corpus.txt")
SHARD_BYTES = 4 * 2**30


def train_tokenizer(out_dir: str, vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([CORPUS], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    return fast


def weight_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """The checkpoint's tensor names and shapes for a ``minivllm.config.ModelConfig``."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nq, nkv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (nq, h), p + "self_attn.k_proj.weight": (nkv, h),
            p + "self_attn.v_proj.weight": (nkv, h), p + "self_attn.o_proj.weight": (h, nq),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
        })
        if cfg.attention_bias:
            shapes.update({p + f"self_attn.{name}_proj.bias": (n,) for name, n in (("q", nq), ("k", nkv), ("v", nkv),
                                                                                  ("o", h))})
        if cfg.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def random_weight(name: str, shape, seed: int, dtype, device) -> torch.Tensor:
    """Seeded per tensor, so every shard layout gives the same weights. Matrices are
    N(0, 1/fan_in) so activations stay O(1); norm weights are 1 + N(0, 0.1^2) so that
    folding them into the next matrix is not a no-op."""
    gen = torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    w = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    w = 1 + 0.1 * w if len(shape) == 1 else w / shape[-1] ** 0.5
    return w.to(dtype).cpu()


def preset_fields(preset: str, overrides: dict) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    unknown = set(overrides) - set(PRESETS[preset]) - set(COMMON)
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}")
    return {**COMMON, **PRESETS[preset], **overrides}


def write_config(preset: str, out_dir: str, eos_token_id: int = 0, **overrides):
    """Writes the preset's config.json (through transformers' config class of its architecture)."""
    from transformers import AutoConfig

    from minivllm.models import ARCHITECTURES

    cfg = preset_fields(preset, overrides)
    dtype_name, architecture = cfg.pop("torch_dtype"), cfg.pop("architecture")
    hf = AutoConfig.for_model(ARCHITECTURES[architecture].model_type, **cfg, bos_token_id=eos_token_id,
                              eos_token_id=eos_token_id, dtype=dtype_name)
    hf.architectures = [architecture]
    hf.save_pretrained(out_dir)


def make_checkpoint(preset: str, out_dir: str, seed: int = 0, device: str = "cpu", **overrides):
    """``overrides`` change preset fields (tests use them for other head counts, tying and RoPE)."""
    from minivllm.config import ModelConfig

    cfg = preset_fields(preset, overrides)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = train_tokenizer(out_dir)
    if len(tokenizer) > cfg["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than vocab_size {cfg['vocab_size']}")
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    write_config(preset, out_dir, eos, **overrides)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": eos, "bos_token_id": eos}, f, indent=1)
    dtype = getattr(torch, cfg["torch_dtype"])
    shards, shard, size = [], {}, 0
    for name, shape in weight_shapes(ModelConfig.from_dir(out_dir)).items():
        shard[name] = random_weight(name, shape, seed, dtype, device)
        size += shard[name].numel() * shard[name].element_size()
        if size >= SHARD_BYTES:
            shards.append(shard)
            shard, size = {}, 0
    if shard:
        shards.append(shard)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return out_dir
    index = {"metadata": {"total_size": 0}, "weight_map": {}}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
        for name, t in shard.items():
            index["weight_map"][name] = fname
            index["metadata"]["total_size"] += t.numel() * t.element_size()
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=1)
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--out", required=True, help="directory to write the checkpoint into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where to draw the random weights (cuda is faster)")
    args = parser.parse_args(argv)
    print(make_checkpoint(args.preset, args.out, args.seed, args.device))


if __name__ == "__main__":
    main()
