"""What ``LLM.generate`` returns, in vLLM's shapes (``vllm.outputs``, ``vllm.logprobs.Logprob``)."""
from dataclasses import dataclass

# One token's log-probabilities as the engine records them: token ids (the scored token first,
# then the top k), their logprobs, and the scored token's rank (1 = the likeliest).
TokenLogprobs = tuple[list[int], list[float], int]


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None  # None unless logprobs were asked
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None  # "stop" or "length"
    stop_reason: int | str | None = None  # the stop token id or string; None for EOS or a length limit


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None  # None for the first prompt token
    outputs: list[CompletionOutput]
    finished: bool = True
    num_cached_tokens: int = 0
