"""Runs the model for one scheduled step: builds the step's inputs and attention metadata,
runs the forward (replaying a CUDA graph for decode on GPU), and samples. What a request asks
beyond plain sampling (penalties, min_tokens, logprobs) runs after the forward, on its rows only.

With tensor parallelism every rank has a ModelRunner over its shard of the model and KV
cache. Rank 0 sends each call (method name and args) to the others before running it
itself (``call``); they run the calls in ``loop`` until ``exit``.
"""
import functools
import gc
import signal
import threading
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

import kernels
from kernels.guard import pdl

from minivllm import distributed
from minivllm.config import Config
from minivllm.context import reset_context, set_context
from minivllm.engine.sequence import Sequence
from minivllm.heartbeat import beat_until_orphaned
from minivllm.layers.logits_processors import apply_penalties, ban_tokens
from minivllm.layers.logprobs import token_logprobs
from kernels.sampling import MASK32
from minivllm.layers.sampler import Sampler, noise_keys
from minivllm.loader import load_model
from minivllm.models import ARCHITECTURES
from minivllm.sampling_params import SamplingParams


def cuda_graph_batch_sizes(max_num_seqs: int) -> list[int]:
    return [bs for bs in (1, 2, 4, 8) if bs < max_num_seqs] + list(range(16, max_num_seqs + 16, 16))


# A decode step's inputs, packed into one int32 array of DECODE_FIELDS rows of ``bs`` values, then the
# [bs, width] block table: one host-to-device copy per step. The temperature's float32 bits and the
# 32-bit noise key travel as int32 too.
DECODE_FIELDS = ("input_ids", "positions", "slot_mapping", "seqlens_k", "temperature_bits", "noise_key",
                 "from_previous")


# Rows past the batch's sequences: no KV store (slot -1), one key to read, greedy.
DECODE_PADDING = np.array([0, 0, -1, 1, 0, 0, 0], np.int32)


def decode_size(bs: int, width: int) -> int:
    return bs * (len(DECODE_FIELDS) + width)


# Prefill steps of at most PREFILL_GRAPH_TOKENS[-1] tokens and PREFILL_GRAPH_SEQS sequences run padded to the
# next of these token counts (Config.prefill_graphs): one graph each, so that a short prompt's first token
# waits on the GPU, not on launching some 200 kernels from Python. Longer steps are bound by the GPU's work.
PREFILL_GRAPH_TOKENS = (16, 32, 64, 128, 256, 512)
PREFILL_GRAPH_SEQS = 8
# A padded prefill step's int32 inputs: T token rows, then S + 1 cu_seqlens, S keys-per-sequence and S
# last-token rows, then the [S, width] block table. Padding tokens belong to no sequence and store no KV
# (slot -1); padding sequences have no new tokens and one key.
PREFILL_TOKEN_FIELDS = ("input_ids", "positions", "slot_mapping")


def prefill_size(tokens: int, seqs: int, width: int) -> int:
    return len(PREFILL_TOKEN_FIELDS) * tokens + 3 * seqs + 1 + seqs * width


def unpack_prefill(packed: torch.Tensor, tokens: int, seqs: int, width: int) -> dict:
    """Views of the fields of ``packed`` (laid out by ``ModelRunner.pack_prefill``)."""
    fields = {name: packed[i * tokens:(i + 1) * tokens] for i, name in enumerate(PREFILL_TOKEN_FIELDS)}
    at = len(PREFILL_TOKEN_FIELDS) * tokens
    for name, size in (("cu_seqlens_q", seqs + 1), ("seqlens_k", seqs), ("last_rows", seqs)):
        fields[name], at = packed[at:at + size], at + size
    fields["block_tables"] = packed[at:at + seqs * width].reshape(seqs, width)
    return fields


@dataclass
class PendingDecode:
    """A decode step launched and not yet waited for: its sequences and where its tokens arrive."""
    seqs: list[Sequence]
    tokens: torch.Tensor  # [len(seqs)] int64, in pinned host memory on a GPU
    done: "torch.cuda.Event | None"  # recorded after the copy of the tokens; None on CPU


def unpack_decode(packed: torch.Tensor, bs: int, width: int) -> dict:
    """Views of the fields of ``packed`` (laid out by ``ModelRunner.pack_decode``)."""
    fields = {name: packed[i * bs:(i + 1) * bs] for i, name in enumerate(DECODE_FIELDS)}
    fields["block_tables"] = packed[len(DECODE_FIELDS) * bs:decode_size(bs, width)].reshape(bs, width)
    return fields


def with_pdl_setting(method):
    """Runs a ModelRunner method with the engine's ``Config.pdl`` in force for the kernels it launches
    (CUDA graphs keep the launch attributes they were captured with)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with pdl(self.config.pdl):
            return method(self, *args, **kwargs)
    return run


class ModelRunner:
    def __init__(self, config: Config):
        self.config = config
        cfg = config.hf_config
        self.rank = distributed.tp_rank()
        self.device = torch.device(config.device)
        self.block_size = config.kvcache_block_size
        torch.manual_seed(config.seed)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(config.torch_dtype)
        try:
            with torch.device(self.device):
                self.model = ARCHITECTURES[cfg.architecture].model_class(cfg)
        finally:
            torch.set_default_dtype(default_dtype)
        load_model(self.model, config.model)
        self.model.set_fusion(config.fusion)
        self.sampler = Sampler()
        self.kv_cache = None
        self.graphs = {}
        self.decode_inputs = None  # the device buffer the decode graphs read their packed inputs from
        self.activation_peak_bytes = None  # measured by kv_budget's warm-up step on a GPU
        self.graph_width = -(-config.max_model_len // self.block_size)  # block-table columns of a decode step
        rows = cuda_graph_batch_sizes(config.max_num_seqs)[-1]
        # Two of each host buffer: a step is packed (and its tokens land) while the one before may still
        # be copying from (to) the other.
        pin = self.device.type == "cuda"
        self.host_decode_pinned = torch.empty(2, decode_size(rows, self.graph_width), dtype=torch.int32, pin_memory=pin)
        self.host_decode = self.host_decode_pinned.numpy()
        self.host_tokens = torch.empty(2, rows, dtype=torch.int64, pin_memory=pin)
        self.tokens_copied = [torch.cuda.Event(), torch.cuda.Event()] if pin else None  # one per host buffer
        self.host_side = 0  # which of the two the newest step uses
        self.decode_cu_seqlens = torch.arange(rows + 1, dtype=torch.int32, device=self.device)
        self.prefill_graphs, self.prefill_outputs = {}, {}
        self.prefill_inputs = torch.zeros(prefill_size(PREFILL_GRAPH_TOKENS[-1], PREFILL_GRAPH_SEQS, self.graph_width),
                                          dtype=torch.int32, device=self.device)
        self.host_prefill = torch.empty(self.prefill_inputs.numel(), dtype=torch.int32, pin_memory=pin)
        self.last_tokens = torch.zeros(rows, dtype=torch.int32, device=self.device)  # the newest decode step's
        self.cuda_graphs_enabled = True  # LLM.eager() turns replays off for a while
        self.logits_log = None  # a list while LLM.record_logits() records: each step's logits to sample
        if config.num_kvcache_blocks is None:
            # Every rank holds the same block ids: the smallest budget decides.
            config.num_kvcache_blocks = distributed.min_over_ranks(self.kv_budget() // self.kv_bytes_per_block(),
                                                                   self.device)
        config.check_kvcache_fits()
        self.allocate_kv_cache(config.num_kvcache_blocks)
        if self.device.type == "cuda" and not config.enforce_eager:
            self.capture_cudagraphs()

    # ---- memory ---------------------------------------------------------------------
    def weight_bytes(self) -> int:
        """This rank's weights (its shard), buffers included (RoPE tables)."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    # ---- KV cache -------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        layers, kv_heads, head_dim = self.model.kv_cache_layout()
        return 2 * layers * self.block_size * kv_heads * head_dim * self.config.torch_dtype.itemsize

    def allocate_kv_cache(self, num_blocks: int):
        layers, kv_heads, head_dim = self.model.kv_cache_layout()
        self.kv_cache = None  # free the old cache before allocating the new one
        self.kv_cache = torch.empty(2, layers, num_blocks, self.block_size, kv_heads, head_dim,
                                    dtype=self.config.torch_dtype, device=self.device)
        self.model.bind_kv_cache(self.kv_cache[0], self.kv_cache[1])

    def kv_budget(self) -> int:
        """Bytes for this rank's KV cache: cpu_kvcache_space_gb on CPU; on GPU what
        gpu_memory_utilization leaves after the weights and the peak of a warm-up step of the
        largest size."""
        config = self.config
        if self.device.type == "cpu":
            return int(config.cpu_kvcache_space_gb * 2**30)
        torch.cuda.synchronize()
        gc.collect()  # engines dropped without shutdown(): their caches sit in reference cycles until now
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        seqs = self.warmup_sequences()
        self.allocate_kv_cache(sum(len(s.block_table) for s in seqs))
        self.compute_logits(*self.prepare(seqs, [len(s) for s in seqs], True))
        if self.rank == 0:  # the sampler's [batch, vocab] temporaries peak in the largest decode step
            vocab, rows = self.config.hf_config.vocab_size, config.max_num_seqs
            self.sampler(torch.randn(rows, vocab, device=self.device), torch.ones(rows, device=self.device),
                         torch.full((rows,), 50, device=self.device), torch.full((rows,), 0.9, device=self.device),
                         torch.arange(rows, device=self.device),
                         torch.zeros(rows, dtype=torch.long, device=self.device))
        torch.cuda.synchronize()
        peak_without_cache = torch.cuda.max_memory_allocated() - self.kv_cache.numel() * self.kv_cache.element_size()
        self.activation_peak_bytes = peak_without_cache - self.weight_bytes()
        self.kv_cache = None
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        outside_torch = total - free - torch.cuda.memory_reserved()
        budget = int(total * config.gpu_memory_utilization) - outside_torch - peak_without_cache
        if budget <= 0:
            raise ValueError(f"no GPU memory left for the KV cache: the weights and a warm-up step need "
                             f"{peak_without_cache / 2**30:.1f} GiB of {total / 2**30:.1f} GiB at "
                             f"gpu_memory_utilization={config.gpu_memory_utilization}")
        return budget

    def warmup_sequences(self) -> list[Sequence]:
        """Sequences filling one prefill step: max_num_batched_tokens tokens of max_model_len each."""
        config, seqs, next_block = self.config, [], 0
        tokens = min(config.max_num_batched_tokens, config.max_num_seqs * config.max_model_len)
        while tokens > 0:
            n = min(tokens, config.max_model_len)
            seq = Sequence([0] * n, SamplingParams(max_tokens=1), seed=0)
            blocks = -(-n // self.block_size)
            seq.block_table = list(range(next_block, next_block + blocks))
            next_block += blocks
            seqs.append(seq)
            tokens -= n
        return seqs

    # ---- rank 0's calls ----------------------------------------------------------------
    def call(self, name: str, *args):
        """Runs ``self.<name>(*args)`` on every rank; only rank 0 calls this."""
        if distributed.tp_size() > 1:
            distributed.broadcast_call((name, args))
        return getattr(self, name)(*args)

    def loop(self):
        """The life of a rank other than 0: run rank 0's calls until ``exit``."""
        while True:
            name, args = distributed.broadcast_call()
            getattr(self, name)(*args)
            if name == "exit":
                return

    def exit(self):
        """Every rank's last call: free the CUDA graphs and the KV cache before the group goes."""
        self.graphs = {}
        self.graph_outputs = {}
        self.prefill_graphs, self.prefill_outputs = {}, {}
        self.decode_inputs = None
        self.kv_cache = None
        layers = self.model.kv_cache_layout()[0]
        self.model.bind_kv_cache([None] * layers, [None] * layers)  # their views would keep the cache alive
        if self.device.type == "cuda":  # no kernel may still use the communicators when the group goes
            torch.cuda.synchronize()

    # ---- one step -------------------------------------------------------------------
    def prepare(self, seqs: list[Sequence], num_new: list[int], is_prefill: bool):
        """The step's token ids, positions and attention metadata as plain lists: all that any
        rank needs to run it, and cheap to send."""
        input_ids, positions, slot_mapping, cu_seqlens_q, seqlens_k = [], [], [], [0], []
        bs = self.block_size
        for seq, n in zip(seqs, num_new):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            for pos in range(start, end):
                slot_mapping.append(seq.block_table[pos // bs] * bs + pos % bs)
            cu_seqlens_q.append(cu_seqlens_q[-1] + n)
            seqlens_k.append(end)
        width = max(len(seq.block_table) for seq in seqs)
        block_tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq in seqs]
        ctx = dict(is_prefill=is_prefill, cu_seqlens_q=cu_seqlens_q, seqlens_k=seqlens_k, max_seqlen_q=max(num_new),
                   max_seqlen_k=max(seqlens_k), slot_mapping=slot_mapping, block_tables=block_tables)
        return input_ids, positions, ctx

    def sampling_inputs(self, seqs: list[Sequence]):
        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)
        params = [seq.sampling_params for seq in seqs]
        if all(p.temperature == 0 for p in params):
            return (None,) * 5  # greedy: the sampler needs none of them
        vocab = self.config.hf_config.vocab_size
        return (tensor([p.temperature for p in params], torch.float32),
                tensor([p.top_k if p.top_k < vocab else vocab for p in params], torch.int64),
                tensor([p.top_p for p in params], torch.float32),
                tensor([seq.seed for seq in seqs], torch.int64),
                tensor([seq.num_completion_tokens for seq in seqs], torch.int64))

    def forward(self, input_ids, positions, ctx: dict, logit_rows=None):
        """Logits of each sequence's last new token, or of the token rows ``logit_rows`` (rank 0;
        None elsewhere), run eagerly (prefill steps, and the warm-up)."""
        set_context(**ctx)
        try:
            hidden, residual = self.model(input_ids, positions)
        finally:
            reset_context()
        rows = ctx["cu_seqlens_q"][1:].long() - 1 if logit_rows is None else logit_rows
        return self.model.compute_logits(hidden[rows], residual[rows])

    @torch.inference_mode()
    @with_pdl_setting
    def compute_logits(self, input_ids: list[int], positions: list[int], ctx: dict, logit_rows=None):
        """Runs a prepared step on this rank: on rank 0 the logits of each sequence's last token
        (or of the token rows ``logit_rows``), None on the others."""
        pin = self.device.type == "cuda"

        def tensor(values, dtype=torch.int32):
            return torch.tensor(values, dtype=dtype, pin_memory=pin).to(self.device, non_blocking=True)

        ctx = {k: tensor(v) if isinstance(v, list) else v for k, v in ctx.items()}
        rows = None if logit_rows is None else tensor(logit_rows, torch.int64)
        logits = self.forward(tensor(input_ids, torch.int64), tensor(positions, torch.int64), ctx, rows)
        return None if logits is None else logits.float()

    @torch.inference_mode()
    @with_pdl_setting
    def run(self, seqs: list[Sequence], num_new: list[int], is_prefill: bool):
        """Computes ``num_new`` tokens of each sequence. Returns each one's next token (None for a
        sequence whose prompt is not yet fully computed); the new token's logprobs for each
        sequence (None where not asked; the whole list None when no sequence asks); and the
        logprobs of the prompt tokens each sequence scored in this step (likewise). Sampling
        happens here, on rank 0."""
        if not is_prefill:
            return self.run_decode(seqs)
        spans = self.prompt_positions(seqs, num_new)
        input_ids, positions, ctx = self.prepare(seqs, num_new, is_prefill)
        starts = ctx["cu_seqlens_q"]
        prompt_rows = [starts[i] + p - seq.num_computed_tokens
                       for i, (seq, span) in enumerate(zip(seqs, spans)) for p in span] if spans else []
        logit_rows = prompt_rows + [end - 1 for end in starts[1:]] if spans else None
        tokens = self.padded_prefill_tokens(len(input_ids), len(seqs)) if not spans else None
        if tokens:
            logits = self.prefill_padded(self.pack_prefill(input_ids, positions, ctx, tokens), tokens)[:len(seqs)]
        else:
            logits = self.call("compute_logits", input_ids, positions, ctx, logit_rows)
        prompt_logprobs = self.score_prompts(seqs, spans, logits[:len(prompt_rows)]) if spans else None
        done = [seq.num_computed_tokens + n == seq.num_tokens for seq, n in zip(seqs, num_new)]
        if not any(done):
            return [None] * len(seqs), None, prompt_logprobs
        tokens, logprobs = self.sample(seqs, logits[len(prompt_rows):])
        return [t if d else None for t, d in zip(tokens, done)], logprobs, prompt_logprobs

    def run_decode(self, seqs: list[Sequence]):
        """A decode step: one copy of the packed inputs, the forward and the sampler (one graph replay
        where a graph is captured), one copy of the tokens back. Only a step with a sequence that asks
        more of its logits than plain sampling samples them again, here."""
        if self.logits_log is None and all(seq.plain_sampling for seq in seqs):
            return self.finish_decode(self.launch_decode(seqs)), None, None
        logits, _ = self.call("decode", *self.decode_inputs_for(seqs, continuing=False))
        return *self.sample(seqs, logits), None

    def launch_decode(self, seqs: list[Sequence], continuing: bool = False) -> PendingDecode:
        """Launches a decode step of plain-sampling sequences without waiting for it. ``continuing``: the
        same sequences, in the same order, as the step before, whose tokens the host does not know yet:
        each row's input token is taken on the device from that step's output."""
        logits, tokens = self.call("decode", *self.decode_inputs_for(seqs, continuing))
        if self.device.type != "cuda":
            return PendingDecode(seqs, tokens, None)
        host = self.host_tokens[self.host_side, :len(seqs)]
        host.copy_(tokens, non_blocking=True)
        done = self.tokens_copied[self.host_side]
        done.record()
        return PendingDecode(seqs, host, done)

    def finish_decode(self, pending: PendingDecode) -> list[int]:
        """Waits for a launched decode step: its tokens (the step's one synchronisation)."""
        if pending.done is not None:
            pending.done.synchronize()
        return pending.tokens.tolist()

    def decode_inputs_for(self, seqs: list[Sequence], continuing: bool):
        """``decode``'s arguments for ``seqs``: packed inputs, rows, block-table width, whether to replay."""
        graph_bs = self.graph_size(len(seqs))
        width = self.graph_width if graph_bs else max(len(seq.block_table) for seq in seqs)
        return self.pack_decode(seqs, graph_bs or len(seqs), width, continuing), len(seqs), width, graph_bs is not None

    def sample(self, seqs: list[Sequence], logits):
        """Each sequence's next token from its row of ``logits`` (fp32), after the penalties and bans
        it asks for; and its logprobs (None for all when none asks)."""
        rows = [i for i, seq in enumerate(seqs) if seq.inspects_logits]
        asks = [i for i in rows if seqs[i].logprobs is not None]
        raw = logits[asks] if asks else None  # a copy: logprobs come from the unprocessed logits
        if rows:
            self.process_logits(logits, rows, seqs)
        if self.logits_log is not None:
            self.logits_log.append(logits.clone())
        tokens = self.sampler(logits, *self.sampling_inputs(seqs)).tolist()
        if not asks:
            return tokens, None
        entries = dict(zip(asks, token_logprobs(raw, [tokens[i] for i in asks],
                                                [seqs[i].sampling_params.logprobs for i in asks])))
        return tokens, [entries.get(i) for i in range(len(seqs))]

    def padded_prefill_tokens(self, num_tokens: int, num_seqs: int) -> int | None:
        """The padded token count a prefill step of this size runs at (Config.prefill_graphs, one rank), or
        None to run it as it is."""
        if (not self.config.prefill_graphs or self.config.tensor_parallel_size > 1 or num_seqs > PREFILL_GRAPH_SEQS
                or not self.cuda_graphs_enabled):
            return None
        return next((t for t in PREFILL_GRAPH_TOKENS if t >= num_tokens), None)

    def pack_prefill(self, input_ids: list[int], positions: list[int], ctx: dict, tokens: int) -> torch.Tensor:
        """``prepare``'s step padded to ``tokens`` token rows and PREFILL_GRAPH_SEQS sequences, in the pinned
        staging buffer (``unpack_prefill`` reads it)."""
        seqs, n, width = PREFILL_GRAPH_SEQS, len(ctx["seqlens_k"]), self.graph_width
        packed = self.host_prefill[:prefill_size(tokens, seqs, width)]
        f = {name: t.numpy() for name, t in unpack_prefill(packed, tokens, seqs, width).items()}
        used = len(input_ids)
        for name, values, pad in (("input_ids", input_ids, 0), ("positions", positions, 0),
                                  ("slot_mapping", ctx["slot_mapping"], -1)):
            f[name][:used], f[name][used:] = values, pad
        cu = ctx["cu_seqlens_q"]
        f["cu_seqlens_q"][:n + 1], f["cu_seqlens_q"][n + 1:] = cu, cu[-1]
        f["seqlens_k"][:n], f["seqlens_k"][n:] = ctx["seqlens_k"], 1
        f["last_rows"][:n], f["last_rows"][n:] = np.array(cu[1:]) - 1, 0
        f["block_tables"][:] = 0
        if n:
            tables = np.array(ctx["block_tables"], np.int32)
            f["block_tables"][:n, :tables.shape[1]] = tables
        return packed

    @torch.inference_mode()
    @with_pdl_setting
    def prefill_padded(self, packed: torch.Tensor, tokens: int):
        """A padded prefill step (``pack_prefill``): its graph's replay where one is captured, else the same
        computation run eagerly. The fp32 logits of each sequence's last new token, padding sequences'
        rows included (PREFILL_GRAPH_SEQS rows)."""
        inputs = self.prefill_inputs[:packed.numel()]
        inputs.copy_(packed, non_blocking=True)
        if tokens in self.prefill_graphs:
            self.prefill_graphs[tokens].replay()
            logits = self.prefill_outputs[tokens]
        else:
            logits = self.prefill_forward(inputs, tokens)
        return logits

    def prefill_forward(self, packed: torch.Tensor, tokens: int):
        """What a prefill graph captures: the forward over the padded step and the fp32 logits of each
        sequence's last token (padding sequences: token row 0's)."""
        f = unpack_prefill(packed, tokens, PREFILL_GRAPH_SEQS, self.graph_width)
        set_context(is_prefill=True, cu_seqlens_q=f["cu_seqlens_q"], seqlens_k=f["seqlens_k"], max_seqlen_q=tokens,
                    max_seqlen_k=self.config.max_model_len, slot_mapping=f["slot_mapping"],
                    block_tables=f["block_tables"])
        try:
            hidden, residual = self.model(f["input_ids"], f["positions"])
        finally:
            reset_context()
        rows = f["last_rows"].long()
        return self.model.compute_logits(hidden[rows], residual[rows]).float()

    def graph_size(self, batch: int) -> int | None:
        """The smallest captured decode graph that holds ``batch`` rows; None to run eagerly."""
        if not self.cuda_graphs_enabled:
            return None
        return next((bs for bs in self.graphs if bs >= batch), None)

    def pack_decode(self, seqs: list[Sequence], bs: int, width: int, continuing: bool = False) -> np.ndarray:
        """The decode step's inputs (``DECODE_FIELDS`` and the block table) for ``bs`` rows, the rows past
        the sequences padded to write no KV and read one key, in the next of this rank's two pinned staging
        buffers: a few whole-array operations, not one per sequence and field. ``continuing``: each
        sequence also has the token the step in flight samples for it (see ``launch_decode``)."""
        n, block, ahead = len(seqs), self.block_size, int(continuing)
        self.host_side ^= 1
        packed = self.host_decode[self.host_side, :decode_size(bs, width)]
        head = packed[:len(DECODE_FIELDS) * bs].reshape(len(DECODE_FIELDS), bs)
        tables = packed[len(DECODE_FIELDS) * bs:].reshape(bs, width)
        head[:, n:] = DECODE_PADDING[:, None]
        tables[:] = 0
        if not n:
            return packed
        counts = np.array([len(seq.block_table) for seq in seqs])
        rows = np.repeat(np.arange(n), counts)
        tables[rows, np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)] = list(
            chain.from_iterable(seq.block_table for seq in seqs))
        lengths = [len(seq.token_ids) + ahead for seq in seqs]
        slots = [seq.block_table[(m - 1) // block] * block + (m - 1) % block for seq, m in zip(seqs, lengths)]
        keys = noise_keys(np.array([seq.seed for seq in seqs], np.int64),
                          np.array([seq.num_completion_tokens + ahead for seq in seqs], np.int64))
        head[:, :n] = [[0] * n if continuing else [seq.token_ids[-1] for seq in seqs], [m - 1 for m in lengths], slots,
                       lengths, np.array([seq.sampling_params.temperature for seq in seqs], np.float32).view(np.int32),
                       keys.astype(np.int32), [ahead] * n]  # the key wraps to int32: the device masks it back
        return packed

    @torch.inference_mode()
    @with_pdl_setting
    def decode(self, packed: np.ndarray, n: int, width: int, replay: bool):
        """Every rank's decode step on ``pack_decode``'s inputs (its rows' graph when ``replay``): rank 0
        gets the fp32 logits and the sampled tokens of the first ``n`` rows; the other ranks (None, None)."""
        bs = packed.size // (len(DECODE_FIELDS) + width)
        if not replay:
            logits, tokens = self.decode_forward(torch.from_numpy(packed).to(self.device), bs, width)
        else:
            if np.may_share_memory(packed, self.host_decode):  # rank 0's pinned buffer: an asynchronous copy
                self.decode_inputs[:packed.size].copy_(self.host_decode_pinned[self.host_side, :packed.size],
                                                       non_blocking=True)
            else:
                self.decode_inputs[:packed.size].copy_(torch.from_numpy(packed))
            self.graphs[bs].replay()
            logits, tokens = self.graph_outputs[bs]
        return (None, None) if logits is None else (logits[:n], tokens[:n])

    def decode_forward(self, packed: torch.Tensor, bs: int, width: int):
        """The decode step on the device from its packed inputs, what a decode graph captures: the
        forward, the fp32 logits and the sampled tokens (greedy rows argmax, the others Gumbel-max with
        their seeded noise: ``Sampler``'s tokens for rows without top-k, top-p or logits processing)."""
        f = unpack_decode(packed, bs, width)
        set_context(is_prefill=False, cu_seqlens_q=self.decode_cu_seqlens[:bs + 1], seqlens_k=f["seqlens_k"],
                    max_seqlen_q=1, max_seqlen_k=self.config.max_model_len, slot_mapping=f["slot_mapping"],
                    block_tables=f["block_tables"])
        # The torch ops first: between the Triton kernels they would break the chain of dependent launches.
        input_ids = torch.where(f["from_previous"] != 0, self.last_tokens[:bs], f["input_ids"])
        keys = f["noise_key"].long() & MASK32
        try:
            hidden, residual = self.model(input_ids, f["positions"])
        finally:
            reset_context()
        logits = self.model.compute_logits(hidden, residual)
        if logits is None:
            return None, None
        logits = logits.float()
        tokens = kernels.gumbel_argmax(logits, f["temperature_bits"].view(torch.float32), keys)
        self.last_tokens[:bs].copy_(tokens)
        return logits, tokens

    def process_logits(self, logits, rows: list[int], seqs: list[Sequence]):
        """Applies the logits processors, penalties and min_tokens bans that the sequences of ``rows`` ask
        for, in place."""
        for i in rows:
            for f in seqs[i].sampling_params.logits_processors:
                row = f(seqs[i].completion_token_ids, logits[i])
                if not isinstance(row, torch.Tensor) or row.shape != logits[i].shape:
                    raise ValueError(f"logits processor {f!r} returned {getattr(row, 'shape', type(row))}, not a "
                                     f"[{logits.shape[1]}] tensor")
                logits[i] = row
        penalized = [i for i in rows if seqs[i].sampling_params.penalized]
        if penalized:
            params = [seqs[i].sampling_params for i in penalized]
            logits[penalized] = apply_penalties(
                logits[penalized], [seqs[i].token_ids[:seqs[i].num_prompt_tokens] for i in penalized],
                [seqs[i].completion_token_ids for i in penalized], [p.repetition_penalty for p in params],
                [p.presence_penalty for p in params], [p.frequency_penalty for p in params])
        early = [i for i in rows if seqs[i].num_completion_tokens < seqs[i].sampling_params.min_tokens]
        if early:
            eos = self.config.hf_config.eos_token_ids
            params = [seqs[i].sampling_params for i in early]
            ban_tokens(logits, early, [p.stop_token_ids + ([] if p.ignore_eos else eos) for p in params])

    def prompt_positions(self, seqs: list[Sequence], num_new: list[int]) -> list[range] | None:
        """Per sequence, the positions of this step whose logits score the prompt token after
        them (prompt_logprobs); None when no sequence asks."""
        if not any(seq.num_unscored_prompt_tokens for seq in seqs):
            return None
        return [range(max(seq.num_computed_tokens, len(seq.prompt_logprobs)),
                      min(seq.num_computed_tokens + n, seq.num_prompt_tokens - 1))
                if seq.num_unscored_prompt_tokens else range(0) for seq, n in zip(seqs, num_new)]

    def score_prompts(self, seqs: list[Sequence], spans: list[range], logits) -> list[list | None]:
        """The prompt logprobs of ``spans`` (from ``prompt_positions``), per sequence."""
        targets = [seq.token_ids[p + 1] for seq, span in zip(seqs, spans) for p in span]
        if not targets:
            return [None] * len(seqs)
        entries = iter(token_logprobs(logits, targets, [seq.sampling_params.prompt_logprobs
                                                        for seq, span in zip(seqs, spans) for _ in span]))
        return [[next(entries) for _ in span] if span else None for span in spans]

    # ---- CUDA graphs ----------------------------------------------------------------
    def set_cuda_graphs(self, enabled: bool):
        """Every rank's call: decode (and padded prefill) steps replay the captured graphs (True) or run
        eagerly as they are."""
        self.cuda_graphs_enabled = enabled

    @torch.inference_mode()
    @with_pdl_setting
    def capture_cudagraphs(self):
        """One graph per decode batch size: a replay runs the whole step, forward and sampler, at once. With
        Config.prefill_graphs (one rank) also one per padded prefill size: forward and logits."""
        sizes = cuda_graph_batch_sizes(self.config.max_num_seqs)
        self.decode_inputs = torch.zeros(decode_size(sizes[-1], self.graph_width), dtype=torch.int32,
                                         device=self.device)
        self.graph_outputs, pool = {}, None
        for bs in reversed(sizes):
            padding = self.pack_decode([], bs, self.graph_width)
            self.decode_inputs[:padding.size].copy_(torch.from_numpy(padding))
            self.decode_forward(self.decode_inputs, bs, self.graph_width)  # autotune first
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self.graph_outputs[bs] = self.decode_forward(self.decode_inputs, bs, self.graph_width)
            pool = pool or graph.pool()
            self.graphs[bs] = graph
            torch.cuda.synchronize()
        self.graphs = dict(sorted(self.graphs.items()))
        if not self.config.prefill_graphs or self.config.tensor_parallel_size > 1:
            return
        empty = dict(cu_seqlens_q=[0], seqlens_k=[], slot_mapping=[], block_tables=[])
        for tokens in reversed([t for t in PREFILL_GRAPH_TOKENS if t <= self.config.max_num_batched_tokens]):
            padding = self.pack_prefill([], [], empty, tokens)
            inputs = self.prefill_inputs[:padding.numel()]
            inputs.copy_(padding)
            self.prefill_forward(inputs, tokens)  # autotune first
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self.prefill_outputs[tokens] = self.prefill_forward(inputs, tokens)
            self.prefill_graphs[tokens] = graph
            torch.cuda.synchronize()


def run_worker(config: Config, rank: int, init_method: str, parent_pid: int, num_threads: int, started, beats):
    """A spawned rank: joins the group, builds its shard of the model and runs rank 0's calls."""
    threading.Thread(target=beat_until_orphaned, args=(beats, rank - 1, parent_pid), daemon=True).start()
    started.send(True)
    started.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: rank 0 handles it
    torch.set_num_threads(num_threads)
    distributed.init(rank, config.tensor_parallel_size, config.device, init_method)
    try:
        ModelRunner(config).loop()
    finally:
        distributed.destroy()
