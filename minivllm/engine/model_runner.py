"""Runs the model for one scheduled step: builds the step's inputs and attention metadata,
runs the forward (replaying a CUDA graph for decode on GPU), and samples."""
import torch

from minivllm.config import Config
from minivllm.context import reset_context, set_context
from minivllm.engine.sequence import Sequence
from minivllm.layers.sampler import Sampler
from minivllm.loader import load_model
from minivllm.models.qwen3 import Qwen3ForCausalLM


class ModelRunner:
    def __init__(self, config: Config):
        self.config = config
        cfg = config.hf_config
        self.device = torch.device(config.device)
        self.block_size = config.kvcache_block_size
        torch.manual_seed(config.seed)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(config.torch_dtype)
        try:
            with torch.device(self.device):
                self.model = Qwen3ForCausalLM(cfg)
        finally:
            torch.set_default_dtype(default_dtype)
        load_model(self.model, config.model)
        self.sampler = Sampler()
        self.allocate_kv_cache()

    # ---- KV cache -------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        cfg = self.config.hf_config
        attn = self.model.model.layers[0].self_attn
        return (2 * cfg.num_hidden_layers * self.block_size * attn.num_kv_heads * cfg.head_dim
                * self.config.torch_dtype.itemsize)

    def allocate_kv_cache(self):
        config = self.config
        if config.num_kvcache_blocks is None:
            if self.device.type == "cuda":
                budget = self.kv_budget_from_gpu_memory()
            else:
                budget = int(config.cpu_kvcache_space_gb * 2**30)
            config.num_kvcache_blocks = budget // self.kv_bytes_per_block()
        config.check_kvcache_fits()
        cfg = config.hf_config
        attn = self.model.model.layers[0].self_attn
        self.kv_cache = torch.empty(2, cfg.num_hidden_layers, config.num_kvcache_blocks, self.block_size,
                                    attn.num_kv_heads, cfg.head_dim, dtype=config.torch_dtype,
                                    device=self.device)
        for i, layer in enumerate(self.model.model.layers):
            layer.self_attn.attn.k_cache = self.kv_cache[0, i]
            layer.self_attn.attn.v_cache = self.kv_cache[1, i]

    def kv_budget_from_gpu_memory(self) -> int:
        raise NotImplementedError  # filled in by the GPU path

    # ---- one step -------------------------------------------------------------------
    def prepare(self, seqs: list[Sequence], num_new: list[int], is_prefill: bool):
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

        def tensor(values):
            return torch.tensor(values, dtype=torch.int64 if values is input_ids else torch.int32,
                                pin_memory=self.device.type == "cuda").to(self.device, non_blocking=True)

        set_context(is_prefill=is_prefill, cu_seqlens_q=tensor(cu_seqlens_q), seqlens_k=tensor(seqlens_k),
                    max_seqlen_q=max(num_new), max_seqlen_k=max(seqlens_k), slot_mapping=tensor(slot_mapping),
                    block_tables=tensor(block_tables))
        return tensor(input_ids), tensor(positions).long(), cu_seqlens_q

    def sampling_inputs(self, seqs: list[Sequence]):
        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)
        params = [seq.sampling_params for seq in seqs]
        return (tensor([p.temperature for p in params], torch.float32),
                tensor([p.top_k for p in params], torch.int64),
                tensor([p.top_p for p in params], torch.float32),
                tensor([seq.seed for seq in seqs], torch.int64),
                tensor([seq.num_completion_tokens for seq in seqs], torch.int64))

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], num_new: list[int], is_prefill: bool) -> list[int | None]:
        """Computes ``num_new`` tokens of each sequence; returns each one's next token, or None
        for a sequence whose prompt is not yet fully computed."""
        input_ids, positions, cu_seqlens_q = self.prepare(seqs, num_new, is_prefill)
        hidden = self.model(input_ids, positions)
        last = torch.tensor(cu_seqlens_q[1:], device=self.device) - 1
        logits = self.model.compute_logits(hidden[last]).float()
        reset_context()
        done = [seq.num_computed_tokens + n == seq.num_tokens for seq, n in zip(seqs, num_new)]
        if not any(done):
            return [None] * len(seqs)
        tokens = self.sampler(logits, *self.sampling_inputs(seqs)).tolist()
        return [t if d else None for t, d in zip(tokens, done)]
