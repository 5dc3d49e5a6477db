from collections.abc import Callable
from dataclasses import dataclass, field

from minivllm import checks


@dataclass
class SamplingParams:
    """How to pick tokens for one request (vLLM's names and meanings).

    temperature 0 is greedy. top_k <= 0 (-1 or 0) and top_p == 1 disable those filters; a top_k
    above the vocabulary keeps it all. ``n`` samples are drawn per prompt. A request with a
    ``seed`` samples the same tokens whatever else shares its batch: its first sample uses the
    seed itself, sample i > 0 the i-th output of a SplitMix64 generator seeded with it
    (``layers.sampler.sample_seed``). Seeds are 64-bit: any int in [-2**63, 2**64), taken modulo
    2**64 as torch.manual_seed does.

    ``repetition_penalty`` (HF's and vLLM's: a logit of a token seen in the prompt or the output is
    divided by it when positive, multiplied when not), ``presence_penalty`` and
    ``frequency_penalty`` (OpenAI's: subtracted once per token seen in the output, and once per
    occurrence) change the logits before temperature and the filters, also for greedy requests.
    ``min_tokens`` keeps EOS and ``stop_token_ids`` from being generated before that many tokens.

    ``stop``: the text ends before the first of these strings that appears (after ``min_tokens``
    tokens), kept with ``include_stop_str_in_output``. ``logprobs=k`` returns for every generated
    token the log-probabilities of the top k tokens and of the sampled one, ``prompt_logprobs=k``
    the same for the prompt's tokens; both from the model's raw distribution (before
    temperature, penalties and filters: vLLM's default).

    ``logits_processors`` (vLLM's): functions ``f(output_token_ids, logits) -> logits`` called in order on
    the request's fp32 logits row ([vocab]) before each token is drawn, before the penalties; each must
    return a [vocab] tensor.
    """

    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    max_tokens: int = 16
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = field(default_factory=list)
    seed: int | None = None
    n: int = 1
    min_tokens: int = 0
    stop: str | list[str] | None = None
    include_stop_str_in_output: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logits_processors: list[Callable] | None = None

    def __post_init__(self):
        self.n = checks.integer("n", self.n, low=1)
        # Applied in float32: a larger one would be inf there, and every logit over it 0 (a tie).
        self.temperature = checks.real("temperature", self.temperature, low=0, high=checks.FLOAT32_MAX)
        self.top_k = checks.integer("top_k", self.top_k, low=-1)
        self.top_p = checks.real("top_p", self.top_p, low=0, high=1, low_open=True)
        self.max_tokens = checks.integer("max_tokens", self.max_tokens, low=1)
        self.min_tokens = checks.integer("min_tokens", self.min_tokens, low=0, high=self.max_tokens)
        self.ignore_eos = checks.flag("ignore_eos", self.ignore_eos)
        self.include_stop_str_in_output = checks.flag("include_stop_str_in_output", self.include_stop_str_in_output)
        self.repetition_penalty = checks.real("repetition_penalty", self.repetition_penalty, low=0, low_open=True)
        self.presence_penalty = checks.real("presence_penalty", self.presence_penalty, low=-2, high=2)
        self.frequency_penalty = checks.real("frequency_penalty", self.frequency_penalty, low=-2, high=2)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                setattr(self, name, checks.integer(name, getattr(self, name), low=0))
        if self.seed is not None:
            self.seed = checks.integer("seed", self.seed, *checks.SEED_RANGE)
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if "" in stop:
            raise ValueError("stop holds an empty string, which every text contains")
        self.stop = list(stop)
        ids = self.stop_token_ids
        if ids is not None and not isinstance(ids, (list, tuple, set, frozenset)):
            raise ValueError(f"stop_token_ids must be a list of token ids, got {ids!r}")
        self.stop_token_ids = [checks.integer(f"stop_token_ids[{i}]", t, low=0) for i, t in enumerate(ids or [])]
        procs = self.logits_processors
        if procs is not None and (not isinstance(procs, (list, tuple)) or not all(callable(f) for f in procs)):
            raise ValueError(f"logits_processors must be a list of callables, got {procs!r}")
        self.logits_processors = list(procs or [])

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0
