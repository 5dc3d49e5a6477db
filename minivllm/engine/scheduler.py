"""Continuous batching: which sequences run in the next step, and how many tokens each.

Steps are either prefill steps (new prompts, and the next chunk of prompts that did not
fit the token budget; with ``mixed_steps`` also the next token of every other running
sequence, as vLLM's chunked prefill) or decode steps (one token for every running sequence),
as in nano-vLLM: pure decode steps are what CUDA graphs replay. When the KV cache runs out, the
most recently admitted sequence is preempted: its blocks are freed and it is recomputed
later (cheaply, when its prefix is still cached).
"""
from collections import deque

from minivllm.config import Config
from minivllm.engine.block_manager import BlockManager
from minivllm.engine.sequence import Sequence, SequenceStatus
from minivllm.engine.stop_checker import StopChecker
from minivllm.outputs import TokenLogprobs


class Scheduler:
    def __init__(self, config: Config, stop_checker: StopChecker):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.enable_chunked_prefill = config.enable_chunked_prefill
        self.mixed_steps = config.mixed_steps
        self.stop_checker = stop_checker
        self.block_manager = BlockManager(config.num_kvcache_blocks, config.kvcache_block_size,
                                          config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0
        self.num_generated_tokens = 0  # a running total: the progress bar reads it in O(1) per step

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def schedule(self) -> tuple[list[Sequence], list[int], bool]:
        """Returns the sequences of the next step, the tokens each computes, and is_prefill."""
        batch = self._schedule_prefill()
        if batch[0]:
            return batch
        return self._schedule_decode()

    def _schedule_prefill(self):
        """A prefill step: prompt chunks already running, then new prompts, within the token budget. With
        ``mixed_steps`` the running sequences' next decode tokens ride along first (vLLM's chunked prefill),
        so that a prefill step does not hold them back: budget is kept for them, and they take only free
        blocks (a sequence that would need a preemption decodes in the next decode step instead)."""
        chunked, decoding = [], []
        for seq in self.running:
            (chunked if seq.num_uncomputed_tokens > 1 else decoding).append(seq)
        if not chunked and not self.waiting:  # no prefill work: a decode step (one CUDA graph replay)
            return [], [], True
        budget = self.max_num_batched_tokens
        kept = min(len(decoding), budget - 1) if self.mixed_steps else 0
        seqs, num_new, budget = [], [], budget - kept
        # Prompts already running but not fully computed (chunked prefill) go first. Their
        # blocks were all reserved at admission, so a chunk never waits for memory.
        for seq in chunked:
            if budget > 0:
                n = min(seq.num_uncomputed_tokens, budget)
                seqs.append(seq), num_new.append(n)
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = self.block_manager.prefix_hits(seq)
            remaining = seq.num_tokens - len(hits) * self.block_manager.block_size
            if remaining > budget and not self.enable_chunked_prefill:
                break
            if not self.block_manager.can_admit(seq, hits, seq.num_tokens):
                break
            self.waiting.popleft()
            self.block_manager.admit(seq, hits)
            self.block_manager.allocate(seq, seq.num_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(remaining, budget)
            seqs.append(seq), num_new.append(n)
            budget -= n
        if not seqs:  # nothing admitted: a decode step
            return seqs, num_new, True
        bm = self.block_manager
        for seq in decoding[:kept]:
            if bm.blocks_needed(seq, seq.num_tokens) <= bm.num_free_blocks:
                bm.allocate(seq, seq.num_tokens)
                seqs.append(seq), num_new.append(1)
        return seqs, num_new, True

    def _schedule_decode(self):
        seqs = []
        for seq in list(self.running):
            if seq.status != SequenceStatus.RUNNING:  # preempted by an earlier sequence here
                continue
            assert seq.num_uncomputed_tokens == 1, "a prompt chunk was left out of the prefill step"
            if len(seqs) == self.max_num_seqs:
                break
            if self._reserve(seq, seq.num_tokens):
                seqs.append(seq)
        return seqs, [1] * len(seqs), False

    def continue_decode(self, seqs: list[Sequence]) -> bool:
        """Whether the decode step after one still in flight for ``seqs`` (whose new tokens are not known
        yet) can be scheduled now, as the step ``schedule`` would give: the same sequences, all running and
        nothing waiting, none ending by length at the step in flight, and the blocks for one more token
        each free without preempting; if so, reserves them. A sequence that the tokens still to come
        finish (EOS, a stop token or string) computes one token too many, which ``postprocess`` drops."""
        if self.waiting or len(self.running) != len(seqs) or any(a is not b for a, b in zip(self.running, seqs)):
            return False
        max_len = self.stop_checker.max_model_len
        if any(seq.num_completion_tokens + 1 >= seq.sampling_params.max_tokens or seq.num_tokens + 1 >= max_len
               for seq in seqs):
            return False
        bm = self.block_manager
        if sum(bm.blocks_needed(seq, seq.num_tokens + 1) for seq in seqs) > bm.num_free_blocks:
            return False
        for seq in seqs:
            bm.allocate(seq, seq.num_tokens + 1)
        return True

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Make room for ``seq`` to hold ``num_tokens`` tokens, preempting the newest others."""
        bm = self.block_manager
        while bm.blocks_needed(seq, num_tokens) > bm.num_free_blocks:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        bm.allocate(seq, num_tokens)
        return True

    def _preempt(self, seq: Sequence):
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def postprocess(self, seqs: list[Sequence], num_new: list[int], next_tokens: list[int | None],
                    logprobs: list[TokenLogprobs | None] | None = None,
                    prompt_logprobs: list[list[TokenLogprobs] | None] | None = None):
        """Account for a finished step (``ModelRunner.run``'s results); returns the sequences that
        finished in it."""
        finished = []
        for i, (seq, n, token) in enumerate(zip(seqs, num_new, next_tokens)):
            if seq.status == SequenceStatus.FINISHED:  # by the step before, while this one was in flight
                continue
            seq.num_computed_tokens += n
            self.block_manager.register_computed_blocks(seq)
            if prompt_logprobs is not None and prompt_logprobs[i] is not None:
                seq.prompt_logprobs += prompt_logprobs[i]
            if token is None:  # a prefill chunk that did not reach the end of the prompt
                continue
            seq.token_ids.append(token)
            self.num_generated_tokens += 1
            if logprobs is not None and logprobs[i] is not None:
                seq.logprobs.append(logprobs[i])
                seq.cumulative_logprob += logprobs[i][1][0]
            if not self.stop_checker.check(seq):
                continue
            seq.status = SequenceStatus.FINISHED
            self.block_manager.free(seq)
            self.running.remove(seq)
            finished.append(seq)
        return finished
