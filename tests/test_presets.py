"""The checkpoint presets: each one's config reads back through the engine as its family, and the
kernel benchmarks' shapes (kernels/shapes.py) are the presets' shapes."""
import pytest

from kernels.shapes import ALL_MODELS
from minivllm.book import model_config
from minivllm.make_checkpoint import PRESETS, make_checkpoint, weight_shapes


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: m.preset)
def test_kernel_shapes_are_the_presets(model):
    cfg = model_config(model.preset)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size,
            cfg.vocab_size, cfg.qk_norm) == (model.hidden, model.num_q_heads, model.num_kv_heads, model.head_dim,
                                             model.intermediate, model.vocab, model.qk_norm)


def test_every_full_size_preset_has_kernel_shapes():
    assert {p for p in PRESETS if not p.endswith("-tiny")} == {m.preset for m in ALL_MODELS}


@pytest.mark.parametrize("preset,architecture,qk_norm,tied,llama3_factor", [
    ("llama-3.2-1b", "LlamaForCausalLM", False, True, 32.0),
    ("llama-3.1-8b", "LlamaForCausalLM", False, False, 8.0),
    ("llama-2-7b", "LlamaForCausalLM", False, False, None),
    ("mistral-7b", "MistralForCausalLM", False, False, None),
    ("qwen3-0.6b", "Qwen3ForCausalLM", True, True, None),
])
def test_presets_read_back_as_their_family(preset, architecture, qk_norm, tied, llama3_factor):
    cfg = model_config(preset)
    assert (cfg.architecture, cfg.qk_norm, cfg.tie_word_embeddings) == (architecture, qk_norm, tied)
    assert (cfg.rope_scaling or {}).get("factor") == llama3_factor


def test_llama_checkpoint_has_no_qk_norm_tensors(tmp_path):
    out = make_checkpoint("llama-tiny", str(tmp_path / "llama"), attention_bias=True)
    names = set(weight_shapes(model_config("llama-tiny", attention_bias=True)))
    assert not any("q_norm" in n or "k_norm" in n for n in names)
    assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.o_proj.bias"} <= names
    from safetensors import safe_open
    with safe_open(f"{out}/model.safetensors", "pt") as f:
        assert set(f.keys()) == names


def test_kernel_bench_refuses_unknown_models():
    from kernels import bench
    with pytest.raises(SystemExit):
        bench.main(["--models", "qwen3-0.6b,gpt-5"])


@pytest.mark.parametrize("preset,overrides", [("qwen3-tiny", {}), ("qwen3-tiny", dict(tie_word_embeddings=True)),
                                              ("llama-tiny", dict(attention_bias=True)), ("mistral-tiny", {})])
def test_cost_models_weight_bytes_are_the_engines_parameters(preset, overrides):
    from minivllm import LLM
    from minivllm.costs import weight_bytes
    from tests.helpers import tiny_checkpoint

    llm = LLM(tiny_checkpoint(preset, **overrides), device="cpu")
    params = llm.model_runner.model.parameters()  # a tied lm_head once
    assert weight_bytes(llm.config.hf_config, 4) == sum(p.numel() * p.element_size() for p in params)


# The published config.json of each preset's model (the repositories named), the fields that fix its shapes
# and numerics: (hidden, intermediate, layers, heads, kv heads, head_dim, vocab, max positions, rope_theta,
# rms_norm_eps, tied embeddings, dtype).
PUBLISHED = {  # repositories: Qwen/Qwen3-0.6B, Qwen/Qwen3-8B, meta-llama/Llama-3.2-1B, meta-llama/Llama-3.1-8B,
    # meta-llama/Llama-2-7b-hf, meta-llama/Llama-2-13b-hf, mistralai/Mistral-7B-v0.3
    "qwen3-0.6b": (1024, 3072, 28, 16, 8, 128, 151936, 40960, 1e6, 1e-6, True, "bfloat16"),
    "qwen3-8b": (4096, 12288, 36, 32, 8, 128, 151936, 40960, 1e6, 1e-6, False, "bfloat16"),
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 64, 128256, 131072, 5e5, 1e-5, True, "bfloat16"),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128, 128256, 131072, 5e5, 1e-5, False, "bfloat16"),
    "llama-2-7b": (4096, 11008, 32, 32, 32, 128, 32000, 4096, 1e4, 1e-5, False, "float16"),
    "llama-2-13b": (5120, 13824, 40, 40, 40, 128, 32000, 4096, 1e4, 1e-5, False, "float16"),
    "mistral-7b": (4096, 14336, 32, 32, 8, 128, 32768, 32768, 1e6, 1e-5, False, "bfloat16"),
}
FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "head_dim", "vocab_size", "max_position_embeddings", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
          "torch_dtype")


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_presets_are_the_published_configs(preset):
    assert tuple(PRESETS[preset][f] for f in FIELDS) == PUBLISHED[preset]


def test_every_full_size_preset_is_checked_against_its_published_config():
    assert set(PUBLISHED) == {p for p in PRESETS if not p.endswith("-tiny")}


@pytest.mark.parametrize("preset", ["qwen3-0.6b", "llama-3.1-8b"])
def test_decode_op_bytes_of_the_projections_are_the_weights(preset):
    # With no rows the projections and the lm_head move their weights alone: all of weight_bytes but the
    # norm vectors (and the embedding table, when it is not the lm_head's); attention then reads nothing.
    from minivllm.costs import decode_op_bytes, weight_bytes
    cfg = model_config(preset)
    sizes = dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                 num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                 head_dim=cfg.head_dim, vocab_size=cfg.vocab_size, layers=cfg.num_hidden_layers, itemsize=2)
    ops = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")
    weights = sum(decode_op_bytes(op, batch=0, context=512, **sizes) for op in ops)
    norms = cfg.num_hidden_layers * (2 * cfg.hidden_size + (2 * cfg.head_dim if cfg.qk_norm else 0)) + cfg.hidden_size
    embed = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    assert weights == weight_bytes(cfg, 2) - 2 * (norms + embed)
    assert decode_op_bytes("paged_attention", batch=0, context=512, **sizes) == 0
    kv = decode_op_bytes("paged_attention", batch=2, context=512, **sizes)
    # per layer and row: K and V over the context, q read and the output written, 2 bytes each
    assert kv == cfg.num_hidden_layers * 2 * 2 * 2 * (512 * cfg.num_key_value_heads * cfg.head_dim
                                                      + cfg.num_attention_heads * cfg.head_dim)
    assert decode_op_bytes("rotary_emb", batch=1, context=512, **sizes) is None
