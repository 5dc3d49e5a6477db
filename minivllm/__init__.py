"""minivllm: a small vLLM-style offline inference engine for Qwen3."""
from minivllm.llm import LLM
from minivllm.outputs import CompletionOutput, Logprob, RequestOutput
from minivllm.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
