from enum import Enum, auto
from itertools import count

from minivllm.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """One request: its tokens, its place in the KV cache, and how far it has been computed.

    ``num_computed_tokens`` counts the tokens whose K/V are in the cache. A step computes
    tokens ``[num_computed_tokens, num_computed_tokens + n)``; when that reaches
    ``num_tokens`` the step's logits give the next token. Prefill, a prefill chunk and a
    decode step differ only in ``n``.
    """

    _ids = count()

    def __init__(self, token_ids: list[int], sampling_params: SamplingParams, seed: int):
        self.seq_id = next(Sequence._ids)
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.sampling_params = sampling_params
        self.seed = seed
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
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
    def is_finished(self):
        return self.status == SequenceStatus.FINISHED
