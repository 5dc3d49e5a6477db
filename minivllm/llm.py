"""The offline API: ``LLM(model_dir).generate(prompts, SamplingParams(...))``, as in vLLM.

With ``tensor_parallel_size=N`` this process is rank 0: it schedules and samples, and starts
ranks 1..N-1 as worker processes (or, under torchrun, finds them already launched).
"""
import atexit
import os
import random
import sys
import weakref
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tqdm.auto import tqdm

from minivllm import distributed
from minivllm.config import Config
from minivllm.engine.model_runner import ModelRunner, run_worker
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
        if dist.is_initialized():
            raise RuntimeError("torch.distributed is already initialized in this process: the layers would shard "
                               "over its group. Shut down the other tensor-parallel engine first (minivllm sets "
                               "up its own group, also under torchrun)")
        self.config = Config(model, **kwargs)
        self.tokenizer = load_tokenizer(model)
        self.workers = []  # spawned ranks 1..N-1
        self.in_group = False  # whether this engine holds the process's tensor-parallel group
        self.model_runner = None
        try:
            if self.config.tensor_parallel_size > 1:
                self._join_tensor_parallel_group()
            self.model_runner = ModelRunner(self.config)
        except BaseException:
            self._stop(kill_workers=True)
            raise
        if distributed.tp_rank() > 0:  # a rank launched by torchrun: serve rank 0, then end the process
            self.model_runner.loop()
            self._stop()
            sys.exit(0)
        # At exit, shut down what is still running. With one rank the hook holds the engine only weakly,
        # so an engine its user dropped is freed (its KV cache too, see ModelRunner.kv_budget); a
        # tensor-parallel engine is held until shutdown, since its workers wait on it.
        if self.config.tensor_parallel_size > 1:
            self._at_exit = self.shutdown
        else:
            engine = weakref.ref(self)
            self._at_exit = lambda: engine() is not None and engine().shutdown()
        atexit.register(self._at_exit)
        eos = set(self.config.hf_config.eos_token_ids)
        if not eos and self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos = {self.tokenizer.eos_token_id}
        self.scheduler = Scheduler(self.config, eos)
        self._seed_rng = random.Random(self.config.seed)

    def _join_tensor_parallel_group(self):
        """Joins the group that torchrun launched this process in, or spawns ranks 1..N-1 here."""
        config, tp = self.config, self.config.tensor_parallel_size
        rank = distributed.torchrun_rank()
        if rank is not None:
            world = int(os.environ["WORLD_SIZE"])
            if world != tp:
                raise ValueError(f"tensor_parallel_size={tp} but the launcher started WORLD_SIZE={world} processes")
            self.in_group = True
            distributed.init(rank, tp, config.device)
            return
        if config.device == "cuda" and torch.cuda.device_count() < tp:
            raise ValueError(f"tensor_parallel_size={tp} needs {tp} GPUs, found {torch.cuda.device_count()}")
        init_method = distributed.local_init_method()
        self._spawn_workers(init_method)
        self.in_group = True
        distributed.init(0, tp, config.device, init_method)

    def _spawn_workers(self, init_method: str):
        config, spawn, started = self.config, mp.get_context("spawn"), []
        for rank in range(1, config.tensor_parallel_size):
            started_reader, started_writer = spawn.Pipe(duplex=False)
            worker = spawn.Process(target=run_worker, name=f"minivllm-tp-rank{rank}", daemon=True,
                                   args=(config, rank, init_method, os.getpid(), torch.get_num_threads(),
                                         started_writer))
            worker.start()
            started_writer.close()  # the worker holds the only writer now: its death ends our wait
            self.workers.append(worker)
            started.append(started_reader)
        # A worker that dies while starting would leave rank 0 waiting at the rendezvous until its timeout.
        for worker, started_reader in zip(self.workers, started):
            try:
                started_reader.recv()
            except EOFError:
                worker.join(timeout=5)
                raise RuntimeError(f"{worker.name} exited (code {worker.exitcode}) before joining the group; its "
                                   "error is printed above. A script that starts a tensor-parallel engine needs an "
                                   "`if __name__ == '__main__':` guard, since the workers import it") from None

    def shutdown(self):
        """Stops the other tensor-parallel ranks and frees the model; the engine cannot run after
        this. Safe to call twice; runs at interpreter exit and when a ``with`` block ends."""
        atexit.unregister(self._at_exit)
        try:
            if self.model_runner is not None:
                self.model_runner.call("exit")
        finally:
            self._stop()

    def _stop(self, kill_workers: bool = False):
        """Ends this engine's part in tensor parallelism: waits for (or kills) the spawned ranks,
        then leaves the process group."""
        self.model_runner = None
        for worker in self.workers:
            worker.join(timeout=0 if kill_workers else 30)
            if worker.is_alive():
                worker.kill()
                worker.join()
        self.workers = []
        if self.in_group:
            distributed.destroy()
            self.in_group = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

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
        if self.model_runner is None:
            raise RuntimeError("this engine was shut down (by shutdown(), or by a failed tensor-parallel step)")
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
            if self.config.tensor_parallel_size > 1:
                # The other ranks may wait in one of this step's collectives for good: stop them,
                # and the engine with them.
                self._stop(kill_workers=True)
            raise
        return self.scheduler.postprocess(seqs, num_new, tokens)

    def reset_prefix_cache(self):
        """Forgets every cached prefix, so that the next requests compute their prompts in full
        (benchmarks: no hits carried from one timed run to the next)."""
        self.scheduler.block_manager.hash_to_block_id.clear()

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
