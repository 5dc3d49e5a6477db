"""Vocab-parallel embedding and LM head: each tensor-parallel rank holds a slice of rows."""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import kernels

from minivllm.distributed import all_reduce, tp_rank, tp_size
from minivllm.loader import expect_shape


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        tp = tp_size()
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // tp)
        self.start = tp_rank() * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded):
        expect_shape(loaded, (self.vocab_size, param.shape[1]))
        part = loaded[self.start:self.start + self.rows]  # the last rank's slice may be short: its padding is zeros
        param.data.zero_()
        param.data[:part.shape[0]].copy_(part)

    def forward(self, ids):
        if tp_size() == 1:
            return kernels.embedding(ids, self.weight)  # a Triton kernel on GPU: PDL reaches the first layer
        local = ids - self.start
        mine = (local >= 0) & (local < self.rows)
        return all_reduce(F.embedding(local.clamp(0, self.rows - 1), self.weight) * mine.unsqueeze(-1))


class ParallelLMHead(VocabParallelEmbedding):
    def forward(self, hidden):
        """This rank's slice of the logits (``logits`` gathers the whole vocabulary)."""
        return F.linear(hidden, self.weight)

    def logits(self, logits):
        """The whole vocabulary's logits on rank 0, where sampling happens; None on the others."""
        if tp_size() > 1:
            parts = [torch.empty_like(logits) for _ in range(tp_size())] if tp_rank() == 0 else None
            dist.gather(logits, parts, dst=0)
            if parts is None:
                return None
            logits = torch.cat(parts, -1)
        return logits[:, :self.vocab_size]
