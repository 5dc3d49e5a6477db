"""Loads HF-format safetensors checkpoints (single file or sharded). Never unpickles.

With ``model.safetensors.index.json`` the index says which file holds each tensor and other files
are not read; without one every ``*.safetensors`` file is, and a tensor in two of them is refused.
Every tensor must have its parameter's full (unsharded) shape and a floating-point dtype.
"""
import os

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from minivllm.config import read_json_object

INDEX = "model.safetensors.index.json"


def expect_shape(tensor: torch.Tensor, shape):
    """The check every weight loader makes before copying (``copy_`` would broadcast, ``narrow`` truncate)."""
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"checkpoint shape {tuple(tensor.shape)} != expected {tuple(shape)}")


def open_checkpoint_file(path: str):
    try:
        return safe_open(path, "pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None


def checkpoint_tensors(model_dir: str) -> dict[str, list[str]]:
    """File name -> the tensor names to load from it."""
    index_path = os.path.join(model_dir, INDEX)
    if os.path.isfile(index_path):
        weight_map = read_json_object(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{index_path} has no 'weight_map' of tensor names to file names")
        files = {}
        for name, fname in weight_map.items():
            if os.path.basename(fname) != fname:
                raise ValueError(f"{index_path} maps {name!r} to {fname!r}, not a file of the model directory")
            files.setdefault(fname, []).append(name)
        missing = sorted(f for f in files if not os.path.isfile(os.path.join(model_dir, f)))
        if missing:
            raise FileNotFoundError(f"{index_path} names files that are not in {model_dir!r}: {missing}")
        return files
    fnames = sorted(f for f in os.listdir(model_dir)
                    if f.endswith(".safetensors") and os.path.isfile(os.path.join(model_dir, f)))
    if not fnames:
        pickles = [f for f in os.listdir(model_dir) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        if pickles:
            raise ValueError(f"{model_dir!r} holds only pickle checkpoints ({', '.join(sorted(pickles))}); "
                             "minivllm loads safetensors only and never unpickles: convert the weights to "
                             ".safetensors first")
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir!r}")
    files, seen = {}, {}
    for fname in fnames:
        with open_checkpoint_file(os.path.join(model_dir, fname)) as f:
            files[fname] = list(f.keys())
        for name in files[fname]:
            if name in seen:
                raise ValueError(f"checkpoint tensor {name!r} is in both {seen[name]} and {fname} (and there is no "
                                 f"{INDEX} to say which is meant)")
            seen[name] = fname
    return files


def load_model(model: nn.Module, model_dir: str):
    params = dict(model.named_parameters())
    tied = set(dict(model.named_parameters(remove_duplicate=False))) - set(params)  # e.g. a tied lm_head
    packed = getattr(model, "packed_modules", {})
    loaded = set()
    for fname, names in checkpoint_tensors(model_dir).items():
        with open_checkpoint_file(os.path.join(model_dir, fname)) as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise ValueError(f"{INDEX} puts {name!r} in {fname}, which does not hold it")
                target, shard = name, None
                for ckpt_part, (our_part, shard_id) in packed.items():
                    if f".{ckpt_part}." in name:
                        target, shard = name.replace(f".{ckpt_part}.", f".{our_part}."), shard_id
                        break
                param = params.get(target)
                if param is None:
                    if name in tied or "rotary_emb" in name:
                        continue  # tied embeddings keep a copy some exporters write anyway
                    raise ValueError(f"checkpoint tensor {name!r} in {fname} matches no parameter of the model")
                tensor = f.get_tensor(name)
                try:
                    if not tensor.dtype.is_floating_point:
                        raise ValueError(f"dtype {tensor.dtype} is not a floating-point type (no quantized "
                                         "checkpoints: their scales would be ignored)")
                    loader = getattr(param, "weight_loader", None)
                    with torch.no_grad():
                        if loader is None:
                            expect_shape(tensor, param.shape)
                            param.copy_(tensor)
                        elif shard is None:
                            loader(param, tensor)
                        else:
                            loader(param, tensor, shard)
                except ValueError as e:
                    raise ValueError(f"checkpoint tensor {name!r} in {fname}: {e}") from None
                loaded.add((target, shard))
    expected = set()
    for name in params:
        shards = [s for p, (q, s) in packed.items() if f".{q}." in name]
        expected |= {(name, s) for s in shards} if shards else {(name, None)}
    missing = sorted(f"{n}[{s}]" if s is not None else n for n, s in expected - loaded)
    if missing:
        raise ValueError(f"checkpoint {model_dir!r} lacks {len(missing)} tensors, e.g. {missing[:5]}")
