"""minivllm: a small vLLM-style offline inference engine for Qwen3."""
from minivllm.llm import LLM, CompletionOutput, RequestOutput
from minivllm.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
