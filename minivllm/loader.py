"""Loads HF-format safetensors checkpoints (single file or sharded). Never unpickles."""
import glob
import os

import torch
from safetensors import safe_open
from torch import nn


def checkpoint_files(model_dir: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if files:
        return files
    pickles = [f for f in os.listdir(model_dir) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickles:
        raise ValueError(f"{model_dir!r} holds only pickle checkpoints ({', '.join(sorted(pickles))}); "
                         "minivllm loads safetensors only and never unpickles: convert the weights to "
                         ".safetensors first")
    raise FileNotFoundError(f"no *.safetensors weights in {model_dir!r}")


def load_model(model: nn.Module, model_dir: str):
    params = dict(model.named_parameters(remove_duplicate=False))
    packed = getattr(model, "packed_modules", {})
    loaded = set()
    for path in checkpoint_files(model_dir):
        with safe_open(path, "pt", device="cpu") as f:
            for name in f.keys():
                target, shard = name, None
                for ckpt_part, (our_part, shard_id) in packed.items():
                    if f".{ckpt_part}." in name:
                        target, shard = name.replace(f".{ckpt_part}.", f".{our_part}."), shard_id
                        break
                param = params.get(target)
                if param is None:
                    if name == "lm_head.weight" or "rotary_emb" in name:
                        continue  # tied embeddings keep a copy some exporters write anyway
                    raise ValueError(f"checkpoint tensor {name!r} in {os.path.basename(path)} matches no "
                                     "parameter of the model")
                tensor = f.get_tensor(name)
                loader = getattr(param, "weight_loader", None)
                with torch.no_grad():
                    if loader is None:
                        if param.shape != tensor.shape:
                            raise ValueError(f"{name!r}: checkpoint shape {tuple(tensor.shape)} != model "
                                             f"shape {tuple(param.shape)}")
                        param.copy_(tensor)
                    elif shard is None:
                        loader(param, tensor)
                    else:
                        loader(param, tensor, shard)
                loaded.add((target, shard))
    expected = set()
    for name in dict(model.named_parameters()):
        shards = [s for p, (q, s) in packed.items() if f".{q}." in name]
        expected |= {(name, s) for s in shards} if shards else {(name, None)}
    missing = sorted(f"{n}[{s}]" if s is not None else n for n, s in expected - loaded)
    if missing:
        raise ValueError(f"checkpoint {model_dir!r} lacks {len(missing)} tensors, e.g. {missing[:5]}")
