"""The model registry: config.json's ``architectures`` name -> the model class that runs it and the
adapter that reads the family's own config fields (and refuses what the engine does not implement).

Adding a family whose decoder is the shared one (``minivllm.models.decoder``) is one line here, its
adapter in ``minivllm.config`` and a preset in ``minivllm.make_checkpoint``; a family that needs other
layers gets a model file of its own that provides ``DecoderForCausalLM``'s methods.
"""
from dataclasses import dataclass
from typing import Callable

from minivllm import config
from minivllm.models.decoder import DecoderForCausalLM


@dataclass(frozen=True)
class Architecture:
    model_type: str  # config.json's model_type (transformers' config class for it writes the presets)
    model_class: type
    # (raw config.json, its path, number of layers) -> the family's ModelConfig fields
    read_config: Callable[[dict, str, int], dict]


ARCHITECTURES = {
    "Qwen3ForCausalLM": Architecture("qwen3", DecoderForCausalLM, config.qwen3_fields),
    "LlamaForCausalLM": Architecture("llama", DecoderForCausalLM, config.llama_fields),
    "MistralForCausalLM": Architecture("mistral", DecoderForCausalLM, config.mistral_fields),
}
