"""A stand-in for flash-attn's two functions that nano-vLLM calls, built on minivllm's Triton paged attention
(``kernels.paged_attention.paged_attention``), so that nano-vLLM runs where flash-attn has no wheel and so that
nano-vLLM and minivllm run the same attention kernel: the two engines then differ in everything except attention.

nano-vLLM's calls (nanovllm/layers/attention.py), all causal:

- ``flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=,
  causal=True, block_table=)`` in prefill. With a block table (a prefix-cache hit or a later chunk of a chunked
  prefill), k and v are the paged caches ``[num_blocks, block_size, Hkv, D]`` (block size 256) and sequence b's
  keys are tokens ``0 .. seqlen_k_b - 1`` of its block table. Without one, k and v are this step's new tokens
  ``[T, Hkv, D]``, one sequence after another as cu_seqlens_k says, and every sequence has as many keys as queries.
- ``flash_attn_with_kvcache(q [B, 1, Hq, D], k_cache, v_cache, cache_seqlens=, block_table=, softmax_scale=,
  causal=True)`` in decode (also inside nano-vLLM's CUDA graphs), returning ``[B, 1, Hq, D]``.

When keys outnumber queries, flash-attn aligns the causal mask to the end of the keys, as our kernel does.

The contiguous case still runs our kernel, without copying K/V: the kernel addresses key j of sequence b as
``block_table[b, j // S] * stride(0) + (j % S) * stride(1)`` with the cache's own strides, so a view of
``[T, Hkv, D]`` with ``stride(0) == stride(1) ==`` the token stride is a "cache" whose block p is tokens
p .. p + S - 1 (blocks overlap), and sequence b's block table is ``cu_seqlens_k[b] + S * i``. S is one key tile
(64 tokens), since the kernel never lets a tile straddle two blocks. The kernel reads each key where nano-vLLM left
it, as flash-attn does. Its costs against real flash-attn: per prefill step, three small kernels (seqlens from
cu_seqlens_k and the view's block table, computed once per step, not per layer) and one block-table load per key
tile; a batch of fewer than 64 tokens is copied into a padded buffer, since a view may not reach past its storage.
Beyond that, the difference is the kernels themselves: ours is a generic Triton kernel (online softmax in fp32,
128x64 tiles in prefill, flash-decoding splits merged by a second small kernel in decode), not flash-attn's
hand-tuned CUDA.

On CPU tensors the kernel runs its torch reference (or Triton's interpreter under TRITON_INTERPRET=1). The
reference gathers keys from a flat view of the cache, which overlapping blocks do not have: there the view is
copied into real blocks, which costs nothing that matters on CPU.
"""
import functools

import torch
import torch.nn.functional as F

from kernels.paged_attention import MAX_BLOCK_N, paged_attention
from kernels.guard import use_triton

VIEW_BLOCK = MAX_BLOCK_N  # tokens per block of the view of contiguous K/V: one key tile

# The last prefill step's key metadata: every layer of a step passes the same cu_seqlens_k tensor.
_last_step = None


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                           softmax_scale=None, causal=False, block_table=None):
    """Causal varlen attention of q ``[T, Hq, D]``: over contiguous k, v ``[T_k, Hkv, D]`` (no block table), or
    over the paged caches k, v ``[num_blocks, block_size, Hkv, D]`` with ``block_table [B, max_blocks]``."""
    if not causal:
        raise NotImplementedError("flash_attn stand-in: only causal attention (what nano-vLLM calls)")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    seqlens_k, view_table = _step_keys(cu_seqlens_k, max_seqlen_k, contiguous=block_table is None)
    if block_table is None:
        flat = not use_triton(q)
        k, v = _contiguous_as_paged(k, flat), _contiguous_as_paged(v, flat)
        block_table = view_table
    return paged_attention(q, k, v, cu_seqlens_q, seqlens_k, block_table, scale,
                           max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, decode=False)


def flash_attn_with_kvcache(q, k_cache, v_cache, *, cache_seqlens, block_table, softmax_scale=None, causal=False):
    """Decode: q ``[B, 1, Hq, D]``, one new token per sequence whose K/V are already in the paged caches;
    cache_seqlens ``[B]`` keys per sequence (0 for CUDA-graph padding rows, which get zeros). Returns
    ``[B, 1, Hq, D]``. With one query per sequence, causal or not is the same attention."""
    if q.dim() != 4 or q.shape[1] != 1:
        raise NotImplementedError(f"flash_attn stand-in: one query token per sequence, got q {tuple(q.shape)}")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    batch = q.shape[0]
    # decode=True reads nothing on the host and launches a grid fixed by the shapes: CUDA-graph capturable.
    out = paged_attention(q.squeeze(1), k_cache, v_cache, _decode_cu_seqlens(batch, q.device), cache_seqlens,
                          block_table, scale, decode=True)
    return out.unsqueeze(1)


@functools.cache
def _decode_cu_seqlens(batch: int, device: torch.device) -> torch.Tensor:
    # One query per sequence. The decode kernel never reads it (only the CPU reference does), so one constant
    # tensor per batch size spares a kernel per layer in every decode step.
    return torch.arange(batch + 1, dtype=torch.int32, device=device)


def _step_keys(cu_seqlens_k, max_seqlen_k, contiguous):
    """seqlens_k ``[B]`` and, for contiguous K/V, the view's block table, once per step: a hit needs the very
    tensor of the last call (held here, so its id is not reused), unmodified since (its version counter)."""
    global _last_step
    version = None if cu_seqlens_k.is_inference() else cu_seqlens_k._version  # inference tensors have none
    key = (max_seqlen_k, contiguous, version)
    if _last_step is not None and version is not None and _last_step[0] is cu_seqlens_k and _last_step[1] == key:
        return _last_step[2]
    seqlens_k = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    view_table = None
    if contiguous:
        starts = torch.arange(0, max_seqlen_k, VIEW_BLOCK, dtype=cu_seqlens_k.dtype, device=cu_seqlens_k.device)
        view_table = cu_seqlens_k[:-1, None] + starts
    _last_step = (cu_seqlens_k, key, (seqlens_k, view_table))
    return seqlens_k, view_table


def _contiguous_as_paged(x, flat):
    """``x [T, H, D]`` (any token stride) as a paged cache whose block p holds tokens p .. p + VIEW_BLOCK - 1."""
    if flat or x.shape[0] < VIEW_BLOCK:
        # Padding lets a block start at every token (flat) or fit at all (T < VIEW_BLOCK).
        x = F.pad(x, (0, 0, 0, 0, 0, VIEW_BLOCK - 1))
    token, head, dim = x.stride()
    view = x.as_strided((x.shape[0] - VIEW_BLOCK + 1, VIEW_BLOCK, *x.shape[1:]), (token, token, head, dim))
    return view.contiguous() if flat else view
