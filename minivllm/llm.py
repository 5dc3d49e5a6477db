"""The offline API: ``LLM(model_dir).generate(prompts, SamplingParams(...))``, as in vLLM.

With ``tensor_parallel_size=N`` this process is rank 0: it schedules and samples, and starts
ranks 1..N-1 as worker processes (or, under torchrun, finds them already launched).

An engine runs one call at a time: ``generate``, ``step`` and ``shutdown`` from several threads
take turns, since they share the scheduler, the KV cache and the workers.
"""
import atexit
import contextlib
import os
import random
import sys
import threading
import time
import weakref
from dataclasses import fields

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tqdm.auto import tqdm

from minivllm import distributed
from minivllm.config import Config
from minivllm.engine.model_runner import ModelRunner, run_worker
from minivllm.engine.scheduler import Scheduler
from minivllm.engine.sequence import Sequence
from minivllm.engine.stop_checker import StopChecker
from minivllm.heartbeat import Watchdog
from minivllm.layers.sampler import sample_seed
from minivllm.outputs import CompletionOutput, Logprob, RequestOutput, TokenLogprobs
from minivllm.sampling_params import SamplingParams


def load_tokenizer(model_dir: str):
    """The checkpoint's tokenizer, or None when it ships none (token-id prompts still work)."""
    if not any(os.path.exists(os.path.join(model_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as e:  # transformers raises many kinds for a broken or foreign tokenizer
        raise ValueError(f"cannot load the tokenizer in {model_dir!r}: {e}") from e


class LLM:
    def __init__(self, model: str, **kwargs):
        self._lock = threading.RLock()
        names = {f.name for f in fields(Config) if f.init}
        unknown = set(kwargs) - names
        if unknown:
            raise TypeError(f"unknown LLM arguments: {sorted(unknown)}")
        if dist.is_initialized():
            raise RuntimeError("torch.distributed is already initialized in this process: the layers would shard "
                               "over its group. Shut down the other tensor-parallel engine first (minivllm sets "
                               "up its own group, also under torchrun)")
        self.config = Config(model, **kwargs)
        self.tokenizer = load_tokenizer(self.config.model)
        self._take_tokenizer_eos()
        self.workers = []  # spawned ranks 1..N-1
        self.watchdog = None  # over the spawned ranks
        self.failure = None  # what stopped the workers, when a step failed
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
        self.stop_checker = StopChecker(set(self.config.hf_config.eos_token_ids), self.config.max_model_len,
                                        self.tokenizer)
        self.scheduler = Scheduler(self.config, self.stop_checker)
        self.pending = None  # a decode step generate() launched and has not waited for (ModelRunner.PendingDecode)
        # One rank only: the other ranks would need each step's tokens for the next step's inputs.
        self.overlap = self.config.async_scheduling and self.config.tensor_parallel_size == 1
        self._seed_rng = random.Random(self.config.seed)

    def _take_tokenizer_eos(self):
        """The tokenizer's EOS when the checkpoint's configs name none; every EOS must be a token."""
        cfg = self.config.hf_config
        if not cfg.eos_token_ids and self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            cfg.eos_token_ids = [self.tokenizer.eos_token_id]
        bad = [t for t in cfg.eos_token_ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"EOS token ids {bad} of {self.config.model!r} are outside the vocabulary "
                             f"[0, {cfg.vocab_size})")

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
        beats = spawn.Array("d", config.tensor_parallel_size - 1, lock=False)  # see minivllm.heartbeat
        for rank in range(1, config.tensor_parallel_size):
            started_reader, started_writer = spawn.Pipe(duplex=False)
            worker = spawn.Process(target=run_worker, name=f"minivllm-tp-rank{rank}", daemon=True,
                                   args=(config, rank, init_method, os.getpid(), torch.get_num_threads(),
                                         started_writer, beats))
            worker.start()
            started_writer.close()  # the worker holds the only writer now: its death ends our wait
            self.workers.append(worker)
            started.append(started_reader)
        # A worker that dies while starting would leave rank 0 waiting at the rendezvous until its timeout.
        for i, (worker, started_reader) in enumerate(zip(self.workers, started)):
            try:
                started_reader.recv()
            except EOFError:
                worker.join(timeout=5)
                raise RuntimeError(f"{worker.name} exited (code {worker.exitcode}) before joining the group; its "
                                   "error is printed above. A script that starts a tensor-parallel engine needs an "
                                   "`if __name__ == '__main__':` guard, since the workers import it") from None
            beats[i] = time.monotonic()  # it beats from now on; its start-up (imports) may take long
        self.watchdog = Watchdog(self.workers, beats)

    def shutdown(self):
        """Stops the other tensor-parallel ranks and frees the model; the engine cannot run after
        this. Safe to call twice; runs at interpreter exit and when a ``with`` block ends."""
        with self._lock:
            atexit.unregister(self._at_exit)
            failed = self.watchdog is not None and self.watchdog.failure is not None  # it killed the workers
            self._stop_watchdog()  # the workers are about to exit on purpose
            try:
                if self.model_runner is not None and not failed:
                    self.model_runner.call("exit")
            finally:
                self._stop(kill_workers=failed)

    def _stop(self, kill_workers: bool = False):
        """Ends this engine's part in tensor parallelism: waits for (or kills) the spawned ranks,
        then leaves the process group."""
        self._stop_watchdog()
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

    def _stop_watchdog(self):
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None

    def _tensor_parallel_failed(self, error: BaseException | None):
        """After a failed step, or the watchdog's alarm: the other ranks may wait in a collective
        for good, so stop them and the engine with them. Raises the workers' failure if they had one."""
        reason = self.watchdog and (self.watchdog.failure or self.watchdog.diagnose())
        self._stop(kill_workers=True)
        self.failure = reason or f"a step failed ({error!r})"
        if reason:
            raise RuntimeError(f"tensor-parallel worker failure: {reason}; the engine is shut down") from error

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
        if not isinstance(prompt, (list, tuple)) or not all(type(t) is int for t in prompt):
            raise ValueError(f"a prompt is a string, a list of token ids (ints) or {{'prompt_token_ids': [...]}}, "
                             f"got {type(prompt).__name__}")
        return None, list(prompt)

    def _check_request(self, prompt, params: SamplingParams) -> tuple[str | None, list[int]]:
        """The prompt's text and token ids, once the request is found valid for this engine."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        text, ids = self._prompt_token_ids(prompt)
        if not ids:
            raise ValueError("empty prompt: a prompt needs at least one token")
        if len(ids) > self.config.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens is longer than max_model_len={self.config.max_model_len}")
        vocab = self.config.hf_config.vocab_size
        for name, tokens in (("token ids", ids), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in tokens if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"{name} {bad[:5]} are outside the vocabulary [0, {vocab})")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > vocab:
                raise ValueError(f"{name}={k} asks for more tokens than the vocabulary's {vocab}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer and this checkpoint has none: use stop_token_ids")
        return text, ids

    def _make_samples(self, ids: list[int], params: SamplingParams) -> list[Sequence]:
        """The request's n sequences; an unseeded request draws its seed from the engine's."""
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(64)
        return [Sequence(ids, params, sample_seed(seed, i), index=i) for i in range(params.n)]

    def _check_running(self):
        if self.watchdog is not None and self.watchdog.failure:  # it stopped the workers while we idled
            self._tensor_parallel_failed(None)
        if self.model_runner is None:
            raise RuntimeError("this engine was shut down (by shutdown(), or by a failed tensor-parallel step"
                               + (f": {self.failure})" if self.failure else ")"))

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        with self._lock:
            self._check_running()
            if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and type(prompts[0]) is int):
                prompts = [prompts]
            if not isinstance(prompts, (list, tuple)):
                raise ValueError(f"prompts must be a prompt or a list of prompts, got {type(prompts).__name__}")
            if sampling_params is None:
                sampling_params = SamplingParams()
            if isinstance(sampling_params, SamplingParams):
                sampling_params = [sampling_params] * len(prompts)
            if not isinstance(sampling_params, (list, tuple)):
                raise ValueError(f"sampling_params must be SamplingParams or a list of them, "
                                 f"got {type(sampling_params).__name__}")
            if len(sampling_params) != len(prompts):
                raise ValueError(f"{len(sampling_params)} sampling params for {len(prompts)} prompts")
            # Check every request before adding any or drawing seeds, so a bad one leaves the engine untouched.
            checked = [self._check_request(p, sp) for p, sp in zip(prompts, sampling_params)]
            requests = [(text, ids, self._make_samples(ids, sp)) for (text, ids), sp in zip(checked, sampling_params)]
            seqs = [seq for *_, samples in requests for seq in samples]
            for seq in seqs:
                self.scheduler.add(seq)
            try:
                total = sum(seq.sampling_params.max_tokens for seq in seqs)
                with tqdm(total=total, desc="generate", unit="tok", disable=not use_tqdm) as bar:
                    while not self.scheduler.is_finished() or self.pending is not None:
                        before = self.scheduler.num_generated_tokens
                        self._step(overlap=self.overlap)
                        bar.update(self.scheduler.num_generated_tokens - before)
            except BaseException:
                self.abort_all()  # whatever broke the loop, the engine stays usable
                raise
            return [self._output(text, ids, samples) for text, ids, samples in requests]

    def step(self):
        """Runs one step to completion and returns the sequences that finished in it."""
        return self._step(overlap=False)

    def _step(self, overlap: bool):
        """One step. With ``overlap`` (generate's loop) a decode step of plain-sampling sequences is left
        running on the device: the next call launches the step after it when the scheduler allows
        (``Scheduler.continue_decode``), and only then waits for its tokens, so that the host's work for
        one step runs while the GPU computes the one before. The sequences a step finishes are returned
        by the call that takes its tokens."""
        with self._lock:
            self._check_running()
            runner, output = self.model_runner, None
            try:
                pending, self.pending = self.pending, None
                if pending is not None and overlap and self.scheduler.continue_decode(pending.seqs):
                    self.pending = runner.launch_decode(pending.seqs, continuing=True)
                    return self._take(pending)
                finished = self._take(pending) if pending is not None else []
                seqs, num_new, is_prefill = self.scheduler.schedule()
                if not seqs:
                    return finished
                if overlap and not is_prefill and runner.logits_log is None and all(s.plain_sampling for s in seqs):
                    self.pending = runner.launch_decode(seqs)
                    return finished
                output = runner.run(seqs, num_new, is_prefill)
                return finished + self.scheduler.postprocess(seqs, num_new, *output)
            except BaseException as error:
                self.abort_all()  # whatever failed, the engine stays usable (the step in flight is dropped)
                if output is None and self.config.tensor_parallel_size > 1:
                    self._tensor_parallel_failed(error)  # the model step itself failed
                raise

    def _take(self, pending) -> list[Sequence]:
        """Waits for a launched decode step and accounts for its tokens."""
        return self.scheduler.postprocess(pending.seqs, [1] * len(pending.seqs),
                                          self.model_runner.finish_decode(pending))

    def add_request(self, prompt, params: SamplingParams) -> list[Sequence]:
        """Checks and queues one request without running it, for callers that drive ``step``
        themselves (the profiler); returns its ``params.n`` sequences."""
        with self._lock:
            self._check_running()
            _, ids = self._check_request(prompt, params)
            seqs = self._make_samples(ids, params)
            for seq in seqs:
                self.scheduler.add(seq)
            return seqs

    @property
    def cuda_graphs(self) -> bool:
        """Whether decode steps replay CUDA graphs now (captured on a GPU unless enforce_eager; off
        inside ``eager``)."""
        return bool(self.model_runner.graphs) and self.model_runner.cuda_graphs_enabled

    @contextlib.contextmanager
    def eager(self):
        """Within the block every step runs the model eagerly, as with enforce_eager but without
        recapturing: a profiler attributes each kernel to the op that launched it."""
        with self._lock:
            self._check_running()
            self.model_runner.call("set_cuda_graphs", False)
        try:
            yield self
        finally:
            with self._lock:
                if self.model_runner is not None:
                    self.model_runner.call("set_cuda_graphs", True)

    @contextlib.contextmanager
    def record_logits(self):
        """Yields a list that gets, for each step that samples within the block, the fp32 logits
        [sampled rows, vocab] handed to the sampler (after penalties and min_tokens bans), rows in
        the step's sequence order."""
        with self._lock:
            self._check_running()
            log = self.model_runner.logits_log = []
        try:
            yield log
        finally:
            if self.model_runner is not None:
                self.model_runner.logits_log = None

    def memory_stats(self) -> dict:
        """Where rank 0's GPU memory goes, in bytes: its weights; the activation peak of the largest step
        (the warm-up step that sizes the KV cache, sampler included; None on CPU, where nothing measures
        it); the KV-cache pool allocated; and the most of that pool running sequences held at once since
        the engine started."""
        runner = self.model_runner
        bm = self.scheduler.block_manager
        per_block = runner.kv_bytes_per_block()
        return dict(weights_bytes=runner.weight_bytes(), activation_peak_bytes=runner.activation_peak_bytes,
                    kv_pool_bytes=len(bm.blocks) * per_block, kv_peak_in_use_bytes=bm.peak_blocks_in_use * per_block)

    def kv_cache_usage(self) -> dict:
        """The paged KV cache's blocks now: how many, how many are free (cached prefixes included), and each
        block's reference count (the running sequences whose block tables hold it)."""
        bm = self.scheduler.block_manager
        return dict(num_blocks=len(bm.blocks), num_free_blocks=bm.num_free_blocks,
                    ref_counts=[b.ref_count for b in bm.blocks])

    def reset_prefix_cache(self):
        """Forgets every cached prefix, so that the next requests compute their prompts in full
        (benchmarks: no hits carried from one timed run to the next)."""
        self.scheduler.block_manager.hash_to_block_id.clear()

    def abort_all(self):
        """Drop every unfinished request, returning their KV blocks (keeps the engine usable)."""
        with self._lock:
            self.pending = None  # its sequences are dropped below; its device work writes only their blocks
            for seq in list(self.scheduler.running):
                self.scheduler.block_manager.free(seq)
            self.scheduler.running.clear()
            self.scheduler.waiting.clear()

    # ---- outputs --------------------------------------------------------------------
    def _output(self, text, prompt_ids: list[int], samples: list[Sequence]) -> RequestOutput:
        first = samples[0]
        prompt_logprobs = None if first.prompt_logprobs is None else [None, *self._logprob_dicts(first.prompt_logprobs)]
        completions = [CompletionOutput(seq.index, self.stop_checker.output_text(seq), seq.completion_token_ids,
                                        None if seq.logprobs is None else seq.cumulative_logprob,
                                        None if seq.logprobs is None else self._logprob_dicts(seq.logprobs),
                                        seq.finish_reason, seq.stop_reason) for seq in samples]
        return RequestOutput(first.seq_id, text, prompt_ids, prompt_logprobs, completions,
                             num_cached_tokens=first.num_cached_tokens)

    def _logprob_dicts(self, entries: list[TokenLogprobs]) -> list[dict[int, Logprob]]:
        """vLLM's form: per token, {token id: Logprob}, the scored token first. Where it is also one
        of the top k, the top-k entry (its rank by position) is the one kept, as in vLLM."""
        ids = [t for tokens, _, _ in entries for t in tokens]
        decoded = iter([None] * len(ids) if self.tokenizer is None else self.tokenizer.batch_decode([[t] for t in ids]))
        return [{t: Logprob(lp, r, next(decoded)) for t, lp, r in zip(tokens, logprobs, [rank, *range(1, len(tokens))])}
                for tokens, logprobs, rank in entries]
