"""Checkpoint loading: formats accepted, formats refused, and clear errors."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from minivllm import LLM
from tests.helpers import greedy_tokens, random_prompts, tiny_checkpoint


def copy_ckpt(tmp_path, name="ckpt", preset="qwen3-tiny"):
    dst = tmp_path / name
    shutil.copytree(tiny_checkpoint(preset), dst)
    return dst


def edit_config(dst, **changes):
    """Sets fields of config.json; None removes one."""
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))


def test_sharded_checkpoint_loads_the_same_weights(tmp_path):
    src = tiny_checkpoint()
    dst = copy_ckpt(tmp_path)
    tensors = load_file(dst / "model.safetensors")
    os.remove(dst / "model.safetensors")
    names = sorted(tensors)
    index = {"metadata": {}, "weight_map": {}}
    for k, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        fname = f"model-0000{k + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, dst / fname)
        index["weight_map"].update({n: fname for n in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    prompts = random_prompts([5, 19])
    assert greedy_tokens(LLM(str(dst), device="cpu"), prompts) == greedy_tokens(LLM(src, device="cpu"), prompts)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        LLM(str(tmp_path / "nope"), device="cpu")


def test_no_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(str(tmp_path), device="cpu")


def test_unsupported_architecture(tmp_path):
    dst = copy_ckpt(tmp_path)
    edit_config(dst, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"unsupported architecture \['GPT2LMHeadModel'\].*LlamaForCausalLM"):
        LLM(str(dst), device="cpu")
    edit_config(dst, model_type="gemma", architectures=None)
    with pytest.raises(ValueError, match="unsupported architecture 'gemma'"):
        LLM(str(dst), device="cpu")


def test_model_type_must_match_the_architecture(tmp_path):
    dst = copy_ckpt(tmp_path)
    edit_config(dst, model_type="llama")
    with pytest.raises(ValueError, match="model_type 'llama'.*'Qwen3ForCausalLM'"):
        LLM(str(dst), device="cpu")


def test_pickle_checkpoint_is_refused_unopened(tmp_path):
    dst = copy_ckpt(tmp_path)
    os.remove(dst / "model.safetensors")
    # Not even a valid pickle: the engine must refuse by name, never try to unpickle.
    (dst / "pytorch_model.bin").write_bytes(b"\x80\x04 not a real pickle")
    with pytest.raises(ValueError, match="safetensors only"):
        LLM(str(dst), device="cpu")


def test_no_weights(tmp_path):
    dst = copy_ckpt(tmp_path)
    os.remove(dst / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(str(dst), device="cpu")


def test_missing_tensor(tmp_path):
    dst = copy_ckpt(tmp_path)
    tensors = load_file(dst / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, dst / "model.safetensors")
    with pytest.raises(ValueError, match="lacks 1 tensors"):
        LLM(str(dst), device="cpu")


def test_wrong_shape(tmp_path):
    dst = copy_ckpt(tmp_path)
    tensors = load_file(dst / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, dst / "model.safetensors")
    with pytest.raises(ValueError, match="shape"):
        LLM(str(dst), device="cpu")


def test_kv_budget_too_small_for_one_sequence():
    with pytest.raises(ValueError, match="too few for one sequence"):
        LLM(tiny_checkpoint(), device="cpu", max_model_len=256, num_kvcache_blocks=3)


@pytest.mark.parametrize("kwargs,message", [
    (dict(device="tpu"), "device"), (dict(dtype="int8"), "dtype"), (dict(kvcache_block_size=10), "multiple of 16"),
    (dict(fusion="everything"), "fusion"), (dict(enable_chunked_prefill=False, max_num_batched_tokens=64,
                                                  max_model_len=128), "max_num_batched_tokens"),
    (dict(max_model_len="4096"), "max_model_len"), (dict(max_num_seqs=True), "max_num_seqs"),
    (dict(enable_prefix_caching="no"), "enable_prefix_caching"), (dict(enforce_eager=1), "enforce_eager"),
    (dict(seed=2**64), "seed"), (dict(gpu_memory_utilization=float("nan")), "gpu_memory_utilization"),
    (dict(num_kvcache_blocks=0), "num_kvcache_blocks"), (dict(kvcache_block_size=16.0), "kvcache_block_size"),
    (dict(device=["cpu"]), "device"), (dict(cpu_kvcache_space_gb=0), "cpu_kvcache_space_gb"),
])
def test_bad_engine_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM(tiny_checkpoint(), **{"device": "cpu", **kwargs})


def test_checkpoint_without_tokenizer_takes_token_ids(tmp_path):
    dst = copy_ckpt(tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(dst / f)
    llm = LLM(str(dst), device="cpu")
    assert greedy_tokens(llm, random_prompts([4]), max_tokens=3)[0]
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("hello", use_tqdm=False)


def test_directory_names_with_glob_characters(tmp_path):
    """The path is a name, not a pattern: 'm[1]' must not read the weights of a sibling 'm1'."""
    reference = greedy_tokens(LLM(tiny_checkpoint(), device="cpu"), random_prompts([7]))
    decoy = copy_ckpt(tmp_path, "m1")
    tensors = load_file(decoy / "model.safetensors")
    save_file({name: -t for name, t in tensors.items()}, decoy / "model.safetensors")
    for name in ("m[1]", "model[v2]", "a*b?"):
        assert greedy_tokens(LLM(str(copy_ckpt(tmp_path, name)), device="cpu"), random_prompts([7])) == reference


@pytest.mark.parametrize("changes,tensor", [
    (dict(vocab_size=1030), "(lm_head|embed_tokens)"),  # the embedding would zero-fill 6 rows
    (dict(vocab_size=1000), "(lm_head|embed_tokens)"),
    (dict(num_key_value_heads=1), "[kv]_proj"),
    (dict(intermediate_size=128), "(gate|up|down)_proj"),  # would truncate
    (dict(hidden_size=48, head_dim=16, num_attention_heads=3, num_key_value_heads=1), "model"),
])
def test_config_that_does_not_match_the_tensors(tmp_path, changes, tensor):
    dst = copy_ckpt(tmp_path)
    edit_config(dst, **changes)
    with pytest.raises(ValueError, match=rf"{tensor}.*shape"):
        LLM(str(dst), device="cpu")


@pytest.mark.parametrize("name,shape", [
    ("model.layers.0.self_attn.o_proj.weight", (64, 1)),  # copy_ would broadcast it
    ("model.layers.0.self_attn.q_proj.weight", (80, 64)),  # narrow would truncate it
    ("model.layers.1.mlp.down_proj.weight", (64, 320)),
    ("lm_head.weight", (1024, 1)),
])
def test_tensor_of_the_wrong_shape_is_named(tmp_path, name, shape):
    dst = copy_ckpt(tmp_path)
    tensors = load_file(dst / "model.safetensors")
    tensors[name] = torch.ones(shape)
    save_file(tensors, dst / "model.safetensors")
    with pytest.raises(ValueError, match=rf"{name}.*shape \({shape[0]}, {shape[1]}\)"):
        LLM(str(dst), device="cpu")


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int64])
def test_integer_tensors_are_refused_not_cast(tmp_path, dtype):
    dst = copy_ckpt(tmp_path)
    tensors = load_file(dst / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(64, dtype=dtype)
    save_file(tensors, dst / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.norm.weight.*floating-point"):
        LLM(str(dst), device="cpu")


def shard(dst, names_per_file):
    """Splits the checkpoint into files of the given tensor names; returns the weight map."""
    tensors = load_file(dst / "model.safetensors")
    os.remove(dst / "model.safetensors")
    weight_map = {}
    for fname, names in names_per_file.items():
        save_file({n: tensors[n] for n in names}, dst / fname)
        weight_map.update({n: fname for n in names})
    return tensors, weight_map


def test_the_index_decides_and_duplicates_are_refused(tmp_path):
    reference = greedy_tokens(LLM(tiny_checkpoint(), device="cpu"), random_prompts([7]))
    dst = copy_ckpt(tmp_path)
    names = sorted(load_file(dst / "model.safetensors"))
    tensors, weight_map = shard(dst, {"a.safetensors": names[:10], "b.safetensors": names[10:]})
    # A stray file holding another copy of a tensor: without an index nobody can tell which is meant.
    save_file({names[0]: torch.zeros_like(tensors[names[0]])}, dst / "stray.safetensors")
    with pytest.raises(ValueError, match=rf"{names[0]}.*both.*a.safetensors.*stray.safetensors"):
        LLM(str(dst), device="cpu")
    # With an index, the stray file is not read.
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert greedy_tokens(LLM(str(dst), device="cpu"), random_prompts([7])) == reference
    # The index's word is checked: its files exist and hold what it says.
    for wrong, error, message in [
        ({**weight_map, names[0]: "missing.safetensors"}, FileNotFoundError, "missing.safetensors"),
        ({**weight_map, names[0]: "b.safetensors"}, ValueError, rf"{names[0]}.*b.safetensors.*does not hold"),
        ({**weight_map, names[0]: "../a.safetensors"}, ValueError, "not a file of the model directory"),
    ]:
        (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wrong}))
        with pytest.raises(error, match=message):
            LLM(str(dst), device="cpu")
    (dst / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="model.safetensors.index.json is not valid JSON"):
        LLM(str(dst), device="cpu")


def test_a_file_that_is_not_safetensors(tmp_path):
    dst = copy_ckpt(tmp_path)
    (dst / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        LLM(str(dst), device="cpu")


@pytest.mark.parametrize("changes,message", [
    (dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}), "yarn"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "linear"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}), "dynamic"),
    (dict(use_sliding_window=True, sliding_window=8, max_window_layers=1, layer_types=None),
     r"sliding-window.*layers \[1\]"),
    (dict(use_sliding_window=True, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
     r"sliding-window.*layers \[0\]"),
    (dict(layer_types=["full_attention", "chunked_attention"]), "chunked_attention"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_config_features_the_engine_does_not_implement(tmp_path, changes, message):
    dst = copy_ckpt(tmp_path)
    edit_config(dst, **changes)
    with pytest.raises(ValueError, match=message):
        LLM(str(dst), device="cpu")


LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=32, rope_theta=1e4)


@pytest.mark.parametrize("preset,changes,message", [
    ("mistral-tiny", dict(sliding_window=4096),
     r"sliding_window=4096 in .*config.json: minivllm does not implement sliding-window attention"),
    ("llama-tiny", dict(mlp_bias=True), r"mlp_bias=True in .*config.json"),
    ("llama-tiny", dict(rope_parameters={**LLAMA3, "rope_type": "longrope"}), "unsupported RoPE scaling 'longrope'"),
    ("llama-tiny", dict(rope_parameters={**LLAMA3, "original_max_position_embeddings": None}),
     r"llama3 RoPE in .*config.json lacks \['original_max_position_embeddings'\]"),
    ("llama-tiny", dict(rope_parameters={**LLAMA3, "high_freq_factor": 1.0}), "high_freq_factor > low_freq_factor"),
    ("llama-tiny", dict(rope_parameters={**LLAMA3, "partial_rotary_factor": 0.5}), "partial_rotary_factor=0.5"),
    ("mistral-tiny", dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    ("mistral-tiny", dict(hidden_act="gelu"), "hidden_act 'gelu'"),
])
def test_llama_and_mistral_features_the_engine_does_not_implement(tmp_path, preset, changes, message):
    dst = copy_ckpt(tmp_path, preset=preset)
    edit_config(dst, **changes)
    with pytest.raises(ValueError, match=message):
        LLM(str(dst), device="cpu")


def test_sliding_window_settings_that_change_nothing_load(tmp_path):
    """As in transformers: a window without use_sliding_window, or on no layer, is no window."""
    reference = greedy_tokens(LLM(tiny_checkpoint(), device="cpu"), random_prompts([7]))
    for changes in (dict(use_sliding_window=False, sliding_window=8, max_window_layers=0, layer_types=None),
                    dict(use_sliding_window=True, sliding_window=8, max_window_layers=28, layer_types=None),
                    dict(use_sliding_window=False, layer_types=["sliding_attention"] * 2)):
        dst = copy_ckpt(tmp_path, f"ckpt{len(os.listdir(tmp_path))}")
        edit_config(dst, **changes)
        assert greedy_tokens(LLM(str(dst), device="cpu"), random_prompts([7])) == reference


@pytest.mark.parametrize("edit,message", [
    (lambda d: (d / "config.json").write_text('{"model_type": "qwen3",'), r"config.json is not valid JSON"),
    (lambda d: (d / "config.json").write_text("[1, 2]"), r"config.json must hold a JSON object"),
    (lambda d: edit_config(d, hidden_size=None), r"config.json lacks 'hidden_size'"),
    (lambda d: edit_config(d, vocab_size="1024"), r"vocab_size in .*config.json must be an int"),
    (lambda d: edit_config(d, num_hidden_layers=0), r"num_hidden_layers in .*config.json must be an int >= 1"),
    (lambda d: edit_config(d, tie_word_embeddings="no"), r"tie_word_embeddings"),
    (lambda d: edit_config(d, num_key_value_heads=3), r"not a multiple of num_key_value_heads=3"),
    (lambda d: edit_config(d, dtype="int8"), r"dtype 'int8' in .*config.json"),
    (lambda d: (d / "generation_config.json").write_text("{"), r"generation_config.json is not valid JSON"),
    (lambda d: (d / "generation_config.json").write_text('{"eos_token_id": 5000}'), r"EOS token ids \[5000\]"),
    (lambda d: (d / "generation_config.json").write_text('{"eos_token_id": "x"}'), r"eos_token_id in .*must be an int"),
])
def test_bad_config_files_are_named(tmp_path, edit, message):
    dst = copy_ckpt(tmp_path)
    edit(dst)
    with pytest.raises(ValueError, match=message):
        LLM(str(dst), device="cpu")


def test_checkpoint_code_never_runs(tmp_path):
    """A checkpoint may ship Python for its tokenizer or model (auto_map): it is never imported."""
    dst = copy_ckpt(tmp_path)
    marker = tmp_path / "ran"
    (dst / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    edit_config(dst, auto_map={"AutoModelForCausalLM": "evil.Model", "AutoConfig": "evil.Config"})
    llm = LLM(str(dst), device="cpu")  # trust_remote_code=False: transformers' own tokenizer class
    assert llm.generate("The KV cache", use_tqdm=False)[0].outputs[0].token_ids
    assert not marker.exists()
