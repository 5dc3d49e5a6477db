"""Attention over a paged KV cache.

Cache layout (shared by every backend): ``k_cache`` and ``v_cache`` are
``[num_blocks, block_size, num_kv_heads, head_dim]``. Token ``j`` of a sequence lives in
block ``block_table[j // block_size]`` at offset ``j % block_size``; its flat *slot* is
``block * block_size + offset``. A slot of ``-1`` means "do not store" (padding).

One entry point covers prefill, chunked prefill, prefix-cache hits and decode: the new
tokens' K/V are stored first, then every query attends to its sequence's cached keys.
Query ``i`` of a sequence with ``q_len`` new tokens and ``k_len`` cached tokens sits at
position ``k_len - q_len + i`` and sees keys ``0 .. k_len - q_len + i`` (causal).
"""
import torch


def store_kvcache_ref(k, v, k_cache, v_cache, slot_mapping):
    """Write k, v ``[T, Hkv, D]`` into the caches at ``slot_mapping`` ``[T]`` (skipping -1)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def paged_attention_ref(q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_tables, scale):
    """Causal GQA attention of varlen queries over the paged cache, in plain torch.

    q: ``[T, Hq, D]`` (T = total new tokens); cu_seqlens_q: ``[B+1]`` int; seqlens_k: ``[B]``
    int, keys per sequence including the new ones; block_tables: ``[B, max_blocks]`` int.
    Returns ``[T, Hq, D]`` in q's dtype, computed in fp32 (fp64 if q is fp64).
    """
    block_size = k_cache.shape[1]
    num_q_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    for b, k_len in enumerate(seqlens_k.tolist()):
        q_start, q_end = cu[b], cu[b + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        positions = torch.arange(k_len, device=q.device)
        slots = block_tables[b, positions // block_size].long() * block_size + positions % block_size
        k = k_cache.view(-1, num_kv_heads, k_cache.shape[-1])[slots].to(acc)
        v = v_cache.view(-1, num_kv_heads, v_cache.shape[-1])[slots].to(acc)
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        qs = q[q_start:q_end].to(acc)
        scores = torch.einsum("qhd,khd->hqk", qs, k) * scale
        q_pos = torch.arange(k_len - q_len, k_len, device=q.device)
        scores.masked_fill_(positions[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out
