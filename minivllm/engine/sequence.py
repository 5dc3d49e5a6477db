from enum import Enum, auto
from itertools import count

from minivllm.outputs import TokenLogprobs
from minivllm.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """One sample of a request: its tokens, its place in the KV cache, how far it has been computed.

    ``num_computed_tokens`` counts the tokens whose K/V are in the cache. A step computes
    tokens ``[num_computed_tokens, num_computed_tokens + n)``; when that reaches
    ``num_tokens`` the step's logits give the next token. Prefill, a prefill chunk and a
    decode step differ only in ``n``.
    """

    _ids = count()

    def __init__(self, token_ids: list[int], sampling_params: SamplingParams, seed: int, index: int = 0):
        self.seq_id = next(Sequence._ids)
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.sampling_params = sampling_params
        self.seed = seed  # this sample's noise seed (layers.sampler.sample_seed)
        self.index = index  # which of the request's n samples
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None  # the stop token id or stop string that ended it
        self.checked_text: str | None = None  # the output text at the last stop-string check
        self.text: str | None = None  # the output text, once a stop string has cut it
        # Per generated token, when logprobs are asked.
        self.logprobs: list[TokenLogprobs] | None = [] if sampling_params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        # Whether the model runner looks at its logits row beyond sampling: logprobs, penalties, min_tokens,
        # logits processors.
        self.inspects_logits = (sampling_params.logprobs is not None or sampling_params.penalized
                                or sampling_params.min_tokens > 0 or bool(sampling_params.logits_processors))
        # Whether the decode step's own sampler (greedy or Gumbel-max, inside its CUDA graph) gives its token.
        self.plain_sampling = (not self.inspects_logits and sampling_params.top_k <= 0
                               and sampling_params.top_p == 1)
        # The same for each prompt token from the second on, filled as the prompt is computed; the
        # request's first sample scores the prompt for all of them.
        wants_prompt = sampling_params.prompt_logprobs is not None and index == 0
        self.prompt_logprobs: list[TokenLogprobs] | None = [] if wants_prompt else None
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prefix-cache hits at the last admission
        self.num_hashed_blocks = 0  # leading full blocks registered in the prefix cache
        self.block_table: list[int] = []
        self.num_preemptions = 0

    def __len__(self):
        return len(self.token_ids)

    @property
    def num_tokens(self):
        return len(self.token_ids)

    @property
    def num_completion_tokens(self):
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self):
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self):
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def num_unscored_prompt_tokens(self) -> int:
        """Prompt tokens whose logprobs are asked and not yet computed (the first has none)."""
        if self.prompt_logprobs is None:
            return 0
        return self.num_prompt_tokens - 1 - len(self.prompt_logprobs)

    @property
    def is_finished(self):
        return self.status == SequenceStatus.FINISHED
