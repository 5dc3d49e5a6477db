"""Checkpoint loading: formats accepted, formats refused, and clear errors."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from minivllm import LLM
from tests.helpers import greedy_tokens, random_prompts, tiny_checkpoint


def copy_ckpt(tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(tiny_checkpoint(), dst)
    return dst


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
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture"):
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
