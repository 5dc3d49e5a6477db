"""Attention over a paged KV cache.

Cache layout (shared by every backend): ``k_cache`` and ``v_cache`` are
``[num_blocks, block_size, num_kv_heads, head_dim]``. Token ``j`` of a sequence lives in
block ``block_table[j // block_size]`` at offset ``j % block_size``; its flat *slot* is
``block * block_size + offset``. A slot of ``-1`` means "do not store" (padding).

One entry point covers prefill, chunked prefill, prefix-cache hits and decode: the new
tokens' K/V are stored first, then every query attends to its sequence's cached keys.
Query ``i`` of a sequence with ``q_len`` new tokens and ``k_len`` cached tokens sits at
position ``k_len - q_len + i`` and sees keys ``0 .. k_len - q_len + i`` (causal).

Kernels (CUDA, or the Triton interpreter on CPU under ``TRITON_INTERPRET=1``; else the references below):
``store_kvcache`` copies one token per program. ``paged_attention`` runs one kernel for both phases: a program
takes a few new tokens of one sequence times all query heads of one kv head (GQA: each K/V tile is loaded once
for the group), walks the block table tile by tile with an online softmax in fp32, and may own only a share of
the key tiles (flash-decoding splits, merged by the last split to finish) so that short batches fill the GPU.
"""

import torch

from kernels.guard import check_tensors, pdl_launch, sm_count, tl, triton, use_triton

INDEX_DTYPES = (torch.int32, torch.int64)


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


# ---- Triton ---------------------------------------------------------------------------------------------------
# Tile sizes. A key tile never straddles two cache blocks: BLOCK_N is a power of two dividing block_size.
MAX_BLOCK_N = 64
MAX_BLOCK_M = 128  # query rows per program in prefill (8 warps); decode uses 16, tl.dot's minimum, or the GQA group
MIN_TILES_PER_SPLIT = 2  # a split smaller than this costs more in partials than it gains in parallelism
MAX_SPLITS = 32
LOG2E = 1.4426950408889634


@triton.jit
def _store_kvcache_kernel(
    K, V, KC, VC, SLOTS,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    num_kv_heads,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    # One program per token: all its heads at once.
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t).to(tl.int64)  # int64: block * stride overflows int32 on large caches
    block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HEAD_DIM)[None, :]
    mask = h < tl.where(slot >= 0, num_kv_heads, 0)  # slot -1: store no head
    k = tl.load(K + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(V + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(KC + block * stride_kcb + offset * stride_kcs + h * stride_kch + d, k.to(KC.dtype.element_ty), mask=mask)
    tl.store(VC + block * stride_vcb + offset * stride_vcs + h * stride_vch + d, v.to(VC.dtype.element_ty), mask=mask)


def store_kvcache(k, v, k_cache, v_cache, slot_mapping):
    """Write k, v ``[T, Hkv, D]`` into the caches at ``slot_mapping`` ``[T]`` (skipping -1)."""
    op = "store_kvcache"
    _check_cache(op, k_cache, v_cache)
    if k.dim() != 3 or k.shape != v.shape or k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} must both be [T, Hkv, D] "
                         f"with the caches' Hkv, D {tuple(k_cache.shape[2:])}")
    check_tensors(op, k=k, v=v)
    if slot_mapping.shape != k.shape[:1] or slot_mapping.dtype not in INDEX_DTYPES:
        raise ValueError(f"{op}: slot_mapping must be [T={k.shape[0]}] int32/int64, got "
                         f"{tuple(slot_mapping.shape)} {slot_mapping.dtype}")
    if not k.device == k_cache.device == slot_mapping.device:
        raise ValueError(f"{op}: k on {k.device}, k_cache on {k_cache.device}, slot_mapping on {slot_mapping.device}")
    if not use_triton(k):
        return store_kvcache_ref(k, v, k_cache, v_cache, slot_mapping)
    if k.shape[0] == 0:
        return
    _store_kvcache_kernel[(k.shape[0],)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        k.shape[1],
        BLOCK_SIZE=k_cache.shape[1], BLOCK_H=triton.next_power_of_2(k.shape[1]), HEAD_DIM=k.shape[2],
    )


@triton.jit
def _find_seq(CU_Q, num_seqs, pid, BLOCK_Q: tl.constexpr):
    # Sequence b owns the q-block ids from cu_seqlens_q[b] // BLOCK_Q + b on: at least its cdiv(q_len, BLOCK_Q)
    # blocks, found without a prefix sum over the batch (no host sync) for at most B idle programs.
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(CU_Q + mid) // BLOCK_Q + mid <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit(do_not_specialize=["num_seqs", "num_splits", "table_width"])
def _paged_attention_kernel(
    Q, KC, VC, OUT, M_PART, L_PART, ACC_PART, TICKETS,
    CU_Q, SEQLENS_K, BLOCK_TABLES,
    num_seqs, num_splits, table_width, scale_log2e,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DECODE: tl.constexpr, SPLITS_POW2: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # A program owns BLOCK_M query rows: BLOCK_Q consecutive new tokens of one sequence times the GROUP query heads
    # of kv head program_id(1), so each K/V tile it loads serves the whole GQA group. It streams its share of the
    # key tiles the rows can see (every num_splits-th tile from tile program_id(2)) with an online softmax in fp32.
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # The index tensors are read before gdc_wait: they are the step's inputs, which no PDL kernel writes. Tiles
    # are dealt round-robin, so this split's first cache block is fetched beside k_len, not after it.
    if DECODE:  # one token per sequence: row b of q is sequence b
        seq = tl.program_id(0)
        q_start = seq
        q_len = 1
        q_block = 0
    else:
        seq = _find_seq(CU_Q, num_seqs, tl.program_id(0), BLOCK_Q)
        q_start = tl.load(CU_Q + seq)
        q_len = tl.load(CU_Q + seq + 1) - q_start
        q_block = tl.program_id(0) - (q_start // BLOCK_Q + seq)
    k_len = tl.load(SEQLENS_K + seq)
    table_row = BLOCK_TABLES + seq * stride_bt
    first_col = split * BLOCK_N // BLOCK_SIZE
    first_block = tl.load(table_row + first_col, mask=first_col < table_width, other=0)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    if not DECODE:
        if q_block * BLOCK_Q >= q_len:
            return

    rows = tl.arange(0, BLOCK_M)
    tok = q_block * BLOCK_Q + rows // GROUP  # index among the sequence's new tokens
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (tok < q_len)
    q_pos = k_len - q_len + tok
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)

    # The block's last token sees the most keys. Never more splits than tiles: a short context's tiles go one
    # to a split, and only those splits are merged.
    kv_end = k_len - q_len + tl.minimum((q_block + 1) * BLOCK_Q, q_len)
    num_tiles = tl.cdiv(kv_end, BLOCK_N)
    splits = tl.maximum(tl.minimum(num_splits, num_tiles), 1)

    # The running max starts finite so that a row with no visible key yet gets p = 0, not exp(-inf + inf) = NaN.
    m_i = tl.full([BLOCK_M], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n = tl.arange(0, BLOCK_N)
    for tile in range(split, num_tiles, splits):
        key = tile * BLOCK_N + n
        # The first tile's block came with k_len; the later ones load here, where the pipeliner prefetches them.
        block = tl.load(table_row + tile * BLOCK_N // BLOCK_SIZE, mask=tile != split, other=first_block)
        block = block.to(tl.int64)
        slot = tile * BLOCK_N % BLOCK_SIZE + n
        # Slots past the sequence's end hold stale data, maybe NaN, which 0 * NaN in p @ v would spread.
        key_ok = key < kv_end
        k = tl.load(KC + block * stride_kcb + slot[None, :] * stride_kcs + kv_head * stride_kch + d[:, None],
                    mask=key_ok[None, :], other=0.0)
        v = tl.load(VC + block * stride_vcb + slot[:, None] * stride_vcs + kv_head * stride_vch + d[None, :],
                    mask=key_ok[:, None], other=0.0)
        s = tl.dot(q, k, input_precision="ieee") * scale_log2e
        s = tl.where(key[None, :] <= q_pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    out_ok = row_ok
    if SPLITS_POW2 > 1:
        l_i, acc, out_ok = _merge_splits(
            m_i, l_i, acc, row_ok, (q_start + tok) * (GROUP * tl.num_programs(1)) + head, split, splits, num_splits,
            M_PART, L_PART, ACC_PART, TICKETS + tl.program_id(0) * tl.num_programs(1) + kv_head,
            HEAD_DIM, SPLITS_POW2)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # a sequence with no keys (CUDA-graph padding) gives 0, not NaN
    out = acc / l_i[:, None]
    tl.store(OUT + (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(OUT.dtype.element_ty), mask=out_ok[:, None])


@triton.jit
def _merge_splits(m_i, l_i, acc, row_ok, part_row, split, splits, num_splits, M_PART, L_PART, ACC_PART, TICKET,
                  HEAD_DIM: tl.constexpr, SPLITS_POW2: tl.constexpr):
    """Flash-decoding's reduce without a second kernel: each of the ``splits`` splits that had keys publishes its
    (max, sum, acc) rows, and every one of the launch's ``num_splits`` takes a ticket; the last to arrive merges
    the partials, in split order whoever it is (so the result does not depend on the arrival order), and re-arms
    the ticket for the next launch. Returns the merged (sum, acc) and the mask of rows to store (none but the last
    arriver's)."""
    part = part_row * num_splits
    d = tl.arange(0, HEAD_DIM)
    mine = tl.where(split < splits, row_ok, False)  # not row_ok & scalar: int32, not a mask, when interpreted
    tl.store(M_PART + part + split, m_i, mask=mine)
    tl.store(L_PART + part + split, l_i, mask=mine)
    tl.store(ACC_PART + (part + split)[:, None] * HEAD_DIM + d[None, :], acc, mask=mine[:, None])
    # All threads' stores before the ticket: bar.sync, then the atomic's release (GPU scope).
    tl.debug_barrier()
    ticket = tl.atomic_add(TICKET, 1, sem="acq_rel")
    tl.debug_barrier()  # the acquire (one thread) before any thread's loads
    is_last = ticket == num_splits - 1
    merge = tl.where(is_last, row_ok, False)
    # .cg: the other programs' partials are in L2; this SM's L1 may hold none or stale lines. Every split's max
    # and sum come in one load; each split's max is loaded again beside its acc, broadcast over the head (the
    # same word for the whole row), so that no layout conversion, which would wait for the load, sits between
    # the splits' loads: they all issue together.
    s_all = tl.arange(0, SPLITS_POW2)[:, None]
    ok_all = merge[None, :] & (s_all < splits)
    m_all = tl.load(M_PART + part[None, :] + s_all, mask=ok_all, other=-1e30, cache_modifier=".cg")
    l_all = tl.load(L_PART + part[None, :] + s_all, mask=ok_all, other=0.0, cache_modifier=".cg")
    m_max = tl.max(m_all, 0)
    l_i = tl.sum(tl.exp2(m_all - m_max[None, :]) * l_all, 0)
    m_max = m_max[:, None]
    acc = tl.zeros_like(acc)
    for s in tl.static_range(SPLITS_POW2):
        ok = tl.where(splits > s, merge, False)[:, None]
        at = (part + s)[:, None]
        m_s = tl.load(M_PART + at + 0 * d[None, :], mask=ok, other=-1e30, cache_modifier=".cg")
        acc_s = tl.load(ACC_PART + at * HEAD_DIM + d[None, :], mask=ok, other=0.0, cache_modifier=".cg")
        acc += acc_s * tl.exp2(m_s - m_max)
    tl.store(TICKET, 0, mask=is_last)  # every program of this launch has taken its ticket
    return l_i, acc, merge


def num_splits_for(programs: int, max_tiles: int, sms: int) -> int:
    """Key splits per (sequence block, kv head) program: only while the grid is short of two programs per SM,
    and every split a few tiles long."""
    want = -(-2 * sms // programs)
    return max(1, min(want, max_tiles // MIN_TILES_PER_SPLIT, MAX_SPLITS))


def _default_num_splits(programs: int, max_tiles: int, device: torch.device) -> int:
    return num_splits_for(programs, max_tiles, sm_count(device, 1))


def paged_attention(q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_tables, scale,
                    max_seqlen_q=None, max_seqlen_k=None, decode=None, num_splits=None):
    """``paged_attention_ref``'s result: Triton kernels for CUDA tensors (and CPU ones under the interpreter),
    the reference otherwise. q and the caches share one dtype (fp16, bf16 or fp32; fp32 dots stay IEEE, not TF32);
    head_dim is a power of two in [16, 256]; block_size a multiple of 16. Accumulates in fp32.

    decode: True when every sequence has exactly one new token, row b of q being sequence b (T = B); picks the
        decode tiling. None: decided from max_seqlen_q == 1, which is computed from cu_seqlens_q (a host sync)
        if not given. The varlen path (decode=False) is correct for any batch, decode ones included.
    max_seqlen_k: an upper bound of seqlens_k, used only to choose the number of key splits; None means the
        block table's capacity, ``block_tables.shape[1] * block_size``.
    num_splits: key splits per sequence (flash-decoding); None chooses from the grid size and max_seqlen_k.
        Any value gives the same result: each program splits its own sequence's keys on the device.

    With decode=True nothing reads device tensors on the host, and the launch grid depends only on shapes and
    the split count, so the call can be captured in a CUDA graph and replayed with new tensor contents.
    """
    op = "paged_attention"
    _check_cache(op, k_cache, v_cache)
    if q.dim() != 3 or q.shape[2] != k_cache.shape[3] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"{op}: q {tuple(q.shape)} must be [T, Hq, D] with the caches' D and Hq a multiple of "
                         f"their Hkv (k_cache {tuple(k_cache.shape)})")
    check_tensors(op, q=q, k_cache=k_cache, v_cache=v_cache)
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs = seqlens_k.shape[0] if seqlens_k.dim() == 1 else -1
    for name, t, shape in (("cu_seqlens_q", cu_seqlens_q, (num_seqs + 1,)), ("seqlens_k", seqlens_k, (num_seqs,)),
                           ("block_tables", block_tables, (num_seqs, block_tables.shape[-1]))):
        if t.shape != shape or t.dtype not in INDEX_DTYPES or t.device != q.device or t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must be {list(shape)} int32/int64 on {q.device}, contiguous in its "
                             f"last dim (B = seqlens_k.shape[0]), got {tuple(t.shape)} {t.dtype} on {t.device}")
    if decode and num_tokens != num_seqs:
        raise ValueError(f"{op}: decode takes one new token per sequence, got T={num_tokens} for B={num_seqs}")
    if not use_triton(q):
        return paged_attention_ref(q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_tables, scale)

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    if decode is None:
        if max_seqlen_q is None:
            max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        decode = max_seqlen_q == 1 and num_tokens == num_seqs
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    block_n = min(MAX_BLOCK_N, block_size & -block_size)
    tokens_per_program = 1 if decode else max_seqlen_q or MAX_BLOCK_M
    block_m = max(16, triton.next_power_of_2(group),
                  min(MAX_BLOCK_M, triton.next_power_of_2(tokens_per_program * group)))
    # Every sequence's q-blocks fit in this many programs; see _find_seq.
    programs = num_seqs if decode else num_tokens // (block_m // group) + num_seqs
    if num_splits is None:
        max_tiles = triton.cdiv(max_seqlen_k or block_tables.shape[1] * block_size, block_n)
        num_splits = _default_num_splits(programs * num_kv_heads, max_tiles, q.device)
    if num_splits > 1:
        m_part = torch.empty((num_tokens, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty((*m_part.shape, head_dim), dtype=torch.float32, device=q.device)
        tickets = _tickets(q.device, programs * num_kv_heads)
    else:
        m_part = l_part = acc_part = tickets = out  # unused
    _paged_attention_kernel[(programs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out, m_part, l_part, acc_part, tickets,
        cu_seqlens_q, seqlens_k, block_tables,
        num_seqs, num_splits, block_tables.shape[1], scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        DECODE=decode, SPLITS_POW2=triton.next_power_of_2(num_splits), num_warps=8 if block_m >= 128 else 4,
        **pdl_launch(q),
    )
    return out


_TICKETS = {}  # device -> the split tickets' buffers, newest last


def _tickets(device: torch.device, count: int) -> torch.Tensor:
    """``count`` int32 split tickets, zeroed once and re-armed by the kernel. Launches on one stream share them
    (each launch's last split leaves them at 0). A buffer is never freed, since CUDA graphs captured with it
    replay with it; a larger one is allocated beside it when a call needs more, which a capture cannot do."""
    buffers = _TICKETS.setdefault(device, [])
    if not buffers or buffers[-1].numel() < count:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"paged_attention: {count} split tickets needed inside a CUDA-graph capture; make "
                               "the same call once before capturing")
        buffers.append(torch.zeros(max(count, 1024), dtype=torch.int32, device=device))
    return buffers[-1]


def _check_cache(op, k_cache, v_cache):
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"{op}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must both be "
                         "[num_blocks, block_size, Hkv, D]")
    block_size, head_dim = k_cache.shape[1], k_cache.shape[3]
    if block_size % 16:
        raise ValueError(f"{op}: block_size must be a multiple of 16, got {block_size}")
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"{op}: head_dim must be a power of two in [16, 256], got {head_dim}")
    check_tensors(op, k_cache=k_cache, v_cache=v_cache)
