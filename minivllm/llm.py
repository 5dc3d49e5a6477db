"""The offline API: ``LLM(model_dir).generate(prompts, SamplingParams(...))``, as in vLLM."""
import os
import random
from dataclasses import dataclass, fields

from tqdm.auto import tqdm

from minivllm.config import Config
from minivllm.engine.model_runner import ModelRunner
from minivllm.engine.scheduler import Scheduler
from minivllm.engine.sequence import Sequence
from minivllm.sampling_params import SamplingParams


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0


def load_tokenizer(model_dir: str):
    """The checkpoint's tokenizer, or None when it ships none (token-id prompts still work)."""
    if not any(os.path.exists(os.path.join(model_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)


class LLM:
    def __init__(self, model: str, **kwargs):
        names = {f.name for f in fields(Config) if f.init}
        unknown = set(kwargs) - names
        if unknown:
            raise TypeError(f"unknown LLM arguments: {sorted(unknown)}")
        self.config = Config(model, **kwargs)
        self.tokenizer = load_tokenizer(model)
        self.model_runner = ModelRunner(self.config)
        eos = set(self.config.hf_config.eos_token_ids)
        if not eos and self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos = {self.tokenizer.eos_token_id}
        self.scheduler = Scheduler(self.config, eos)
        self._seed_rng = random.Random(self.config.seed)

    # ---- requests -------------------------------------------------------------------
    def _prompt_token_ids(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer: pass prompts as token ids")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" not in prompt:
                raise ValueError(f"a dict prompt needs 'prompt_token_ids', got keys {sorted(prompt)}")
            prompt = prompt["prompt_token_ids"]
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) for t in prompt):
            raise ValueError(f"a prompt is a string, a list of token ids or {{'prompt_token_ids': [...]}}, "
                             f"got {type(prompt).__name__}")
        return None, list(prompt)

    def _make_sequence(self, prompt, params: SamplingParams) -> tuple[str | None, Sequence]:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        text, ids = self._prompt_token_ids(prompt)
        if not ids:
            raise ValueError("empty prompt: a prompt needs at least one token")
        if len(ids) > self.config.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens is longer than max_model_len={self.config.max_model_len}")
        vocab = self.config.hf_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(63)
        return text, Sequence(ids, params, seed)

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        sampling_params = sampling_params or SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(sampling_params)} sampling params for {len(prompts)} prompts")
        # Check every request before adding any, so a bad one leaves the engine untouched.
        requests = [self._make_sequence(p, sp) for p, sp in zip(prompts, sampling_params)]
        for _, seq in requests:
            self.scheduler.add(seq)
        total = sum(seq.sampling_params.max_tokens for _, seq in requests)
        with tqdm(total=total, desc="generate", unit="tok", disable=not use_tqdm) as bar:
            while not self.scheduler.is_finished():
                before = sum(seq.num_completion_tokens for _, seq in requests)
                self.step()
                bar.update(sum(seq.num_completion_tokens for _, seq in requests) - before)
        return [self._output(text, seq) for text, seq in requests]

    def step(self):
        seqs, num_new, is_prefill = self.scheduler.schedule()
        try:
            tokens = self.model_runner.run(seqs, num_new, is_prefill)
        except BaseException:
            self.abort_all()
            raise
        return self.scheduler.postprocess(seqs, num_new, tokens)

    def abort_all(self):
        """Drop every unfinished request, returning their KV blocks (keeps the engine usable)."""
        for seq in list(self.scheduler.running):
            self.scheduler.block_manager.free(seq)
        self.scheduler.running.clear()
        self.scheduler.waiting.clear()

    def _output(self, text, seq: Sequence) -> RequestOutput:
        ids = seq.completion_token_ids
        out_text = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""
        return RequestOutput(seq.seq_id, text, seq.token_ids[:seq.num_prompt_tokens],
                             [CompletionOutput(0, out_text, ids, seq.finish_reason)], seq.num_cached_tokens)
