"""Per-step attention metadata, set once by the model runner and read by every attention
layer (nano-vLLM's design: no metadata threaded through the model's forward)."""
from dataclasses import dataclass

import torch


@dataclass
class Context:
    is_prefill: bool = False
    cu_seqlens_q: torch.Tensor | None = None  # [B+1] new tokens per sequence, cumulative
    seqlens_k: torch.Tensor | None = None  # [B] cached + new tokens per sequence
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    slot_mapping: torch.Tensor | None = None  # [T] where each new token's K/V goes
    block_tables: torch.Tensor | None = None  # [B, max_blocks]


_CONTEXT = Context()


def get_context() -> Context:
    return _CONTEXT


def set_context(**kwargs):
    global _CONTEXT
    _CONTEXT = Context(**kwargs)


def reset_context():
    global _CONTEXT
    _CONTEXT = Context()
