"""Qwen3 (``Qwen3ForCausalLM``): the shared decoder with per-head QK RMSNorm (``ModelConfig.qk_norm``).

Kept as a module of its own for the names the book, the tests and older code import.
"""
from minivllm.models.decoder import DecoderAttention as Qwen3Attention
from minivllm.models.decoder import DecoderForCausalLM as Qwen3ForCausalLM
from minivllm.models.decoder import DecoderLayer as Qwen3DecoderLayer
from minivllm.models.decoder import DecoderMLP as Qwen3MLP
from minivllm.models.decoder import DecoderModel as Qwen3Model
from minivllm.models.decoder import norm_linear

__all__ = ["Qwen3Attention", "Qwen3DecoderLayer", "Qwen3ForCausalLM", "Qwen3MLP", "Qwen3Model", "norm_linear"]
