"""The peer engines' harness: the flash_attn stand-in against plain causal attention, nano-vLLM's own Qwen3
model running on it against HF transformers, and the nano-vLLM runner's rows without a GPU.

CPU: the stand-in's tests run on the kernels' torch reference in this process and, in a fresh process, on the
Triton kernels under the interpreter (fp32 and fp16: the interpreter's bf16 tl.dot is wrong). nano-vLLM's model
needs its own Triton store kernel, so it runs under the interpreter only. nano-vLLM's code is not in this
repository: its tests read it from NANO_VLLM_DIR or ``.peers/nano-vllm`` and are skipped without it.
GPU: the runner on the tiny checkpoint, through ``run_peer``, as the benchmark calls it.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.kernel_testing import kernel_test_setup, select_interpreter

select_interpreter()

from minivllm.peers import REPO_ROOT, STANDINS_DIR  # noqa: E402

sys.path.insert(0, STANDINS_DIR)
import flash_attn  # noqa: E402  (the stand-in)

on_triton, runs_kernels, test_cpu_kernels_in_fresh_process = kernel_test_setup(__file__)

NANO_VLLM_DIR = os.environ.get("NANO_VLLM_DIR", os.path.join(REPO_ROOT, ".peers", "nano-vllm"))
needs_nano_vllm = pytest.mark.skipif(not os.path.isdir(os.path.join(NANO_VLLM_DIR, "nanovllm")),
                                     reason=f"nano-vLLM's code is not at {NANO_VLLM_DIR} (set NANO_VLLM_DIR)")
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=3e-3, rtol=3e-3)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
# (num_q_heads, num_kv_heads, head_dim): GQA groups of 2 and 4, and plain multi-head attention.
HEADS = pytest.mark.parametrize("heads", [(4, 2, 16), (8, 2, 32), (2, 2, 16)], ids=str)


def causal_attention(q, k, v, scale):
    """One sequence, in fp64: q ``[Lq, Hq, D]`` are the last Lq of the Lk positions of k, v ``[Lk, Hkv, D]``."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(group, dim=1) for x in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    q_pos = torch.arange(k.shape[0] - q.shape[0], k.shape[0])
    scores.masked_fill_(torch.arange(k.shape[0])[None, None, :] > q_pos[None, :, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def cumulative(lengths):
    return torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)


def qkv_views(tokens, heads, dtype, gen):
    """q, k, v ``[tokens, H, D]`` as views into one fused projection output, as nano-vLLM splits them."""
    num_q, num_kv, head_dim = heads
    qkv = torch.randn(tokens, num_q + 2 * num_kv, head_dim, generator=gen).to(dtype)
    return qkv[:, :num_q], qkv[:, num_q:num_q + num_kv], qkv[:, num_q + num_kv:]


def paged(seqs_k, seqs_v, block_size, gen):
    """NaN-filled caches holding each sequence's K/V in shuffled blocks, and block tables padded with -1."""
    blocks = [-(-k.shape[0] // block_size) for k in seqs_k]
    num_blocks = sum(blocks) + 2
    order = torch.randperm(num_blocks, generator=gen).tolist()
    shape = (num_blocks, block_size, *seqs_k[0].shape[1:])
    k_cache = torch.full(shape, float("nan"), dtype=seqs_k[0].dtype)
    v_cache = k_cache.clone()
    table = torch.full((len(seqs_k), max(blocks)), -1, dtype=torch.int32)
    for b, (k, v) in enumerate(zip(seqs_k, seqs_v)):
        table[b, :blocks[b]] = torch.tensor(order[:blocks[b]])
        order = order[blocks[b]:]
        pos = torch.arange(k.shape[0])
        slots = table[b, pos // block_size].long() * block_size + pos % block_size
        k_cache.view(-1, *shape[2:])[slots] = k
        v_cache.view(-1, *shape[2:])[slots] = v
    return k_cache, v_cache, table


@DTYPES
@HEADS
@pytest.mark.parametrize("q_lens", [[1, 70, 5, 130], [3, 20]], ids=["one-block-view-or-more", "shorter-than-a-view-block"])
def test_varlen_contiguous_kv(q_lens, heads, dtype):
    # No block table (a prefill without cached prefix, and nano-vLLM's warm-up before its cache exists):
    # k and v are this step's tokens, here strided views of a fused projection as in nano-vLLM.
    gen = torch.Generator().manual_seed(len(q_lens))
    q, k, v = qkv_views(sum(q_lens), heads, dtype, gen)
    cu = cumulative(q_lens)
    out = flash_attn.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(q_lens),
                                            max_seqlen_k=max(q_lens), softmax_scale=0.3, causal=True)
    assert out.shape == q.shape and out.dtype == dtype
    for b in range(len(q_lens)):
        s = slice(cu[b], cu[b + 1])
        torch.testing.assert_close(out[s].double(), causal_attention(q[s], k[s], v[s], 0.3), **TOLERANCE[dtype])


@DTYPES
@HEADS
@pytest.mark.parametrize("block_size", [256, 16])
def test_varlen_over_paged_cache_with_cached_prefix(block_size, heads, dtype):
    # A prefix-cache hit or a later prefill chunk: more keys than queries, the new queries at the end.
    gen = torch.Generator().manual_seed(block_size)
    specs = [(4, 260), (1, 1), (33, 33), (17, 300)]  # (q_len, k_len)
    qs, ks, vs = zip(*(qkv_views(k_len, heads, dtype, gen) for _, k_len in specs))
    qs = [q[k_len - q_len:] for q, (q_len, k_len) in zip(qs, specs)]
    k_cache, v_cache, table = paged(ks, vs, block_size, gen)
    q_lens, k_lens = zip(*specs)
    out = flash_attn.flash_attn_varlen_func(torch.cat(qs), k_cache, v_cache, cumulative(q_lens), cumulative(k_lens),
                                            max(q_lens), max(k_lens), causal=True, block_table=table)
    cu = cumulative(q_lens)
    scale = heads[2] ** -0.5  # flash-attn's default softmax_scale
    for b in range(len(specs)):
        expected = causal_attention(qs[b], ks[b], vs[b], scale)
        torch.testing.assert_close(out[cu[b]:cu[b + 1]].double(), expected, **TOLERANCE[dtype])


@DTYPES
@HEADS
@pytest.mark.parametrize("block_size", [256, 16])
def test_decode_with_block_table(block_size, heads, dtype):
    gen = torch.Generator().manual_seed(block_size + 1)
    k_lens = [1, 17, 256, 300, 0]  # the last row is CUDA-graph padding: no keys, zeros out
    seqs = [qkv_views(max(n, 1), heads, dtype, gen) for n in k_lens]
    k_cache, v_cache, table = paged([k for _, k, _ in seqs], [v for _, _, v in seqs], block_size, gen)
    q = torch.stack([q[-1] for q, _, _ in seqs]).unsqueeze(1)
    out = flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor(k_lens, dtype=torch.int32),
                                             block_table=table, softmax_scale=0.2, causal=True)
    assert out.shape == q.shape and out.dtype == dtype
    for b, (n, (_, k, v)) in enumerate(zip(k_lens, seqs)):
        expected = causal_attention(q[b], k[:n], v[:n], 0.2) if n else torch.zeros(q[b].shape, dtype=torch.float64)
        torch.testing.assert_close(out[b].double(), expected, **TOLERANCE[dtype])


def test_key_metadata_follows_a_rewritten_cu_seqlens_k():
    # seqlens and the view's block table are kept for the next layer of the same step; a new step written into
    # the same tensor in place must not reuse them.
    gen = torch.Generator().manual_seed(3)
    q, k, v = qkv_views(40, (4, 2, 16), torch.float32, gen)
    cu_k = cumulative([10, 30])
    flash_attn.flash_attn_varlen_func(q, k, v, cumulative([10, 30]), cu_k, 30, 30, causal=True)
    cu_k.copy_(cumulative([30, 10]))
    out = flash_attn.flash_attn_varlen_func(q, k, v, cumulative([30, 10]), cu_k, 30, 30, causal=True)
    for s in (slice(0, 30), slice(30, 40)):
        torch.testing.assert_close(out[s].double(), causal_attention(q[s], k[s], v[s], 0.25), **TOLERANCE[torch.float32])


def test_rejects_what_it_does_not_implement():
    q = torch.zeros(4, 2, 16)
    cu = cumulative([4])
    with pytest.raises(NotImplementedError, match="causal"):
        flash_attn.flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, causal=False)
    with pytest.raises(NotImplementedError, match="one query token"):
        flash_attn.flash_attn_with_kvcache(q.view(2, 2, 2, 16), torch.zeros(1, 16, 2, 16), torch.zeros(1, 16, 2, 16),
                                           cache_seqlens=torch.tensor([2, 2]), block_table=torch.zeros(2, 1))


# ---- nano-vLLM's Qwen3 on the stand-in (CPU, interpreter) ---------------------------------------------------------
NANO_BLOCK = 256  # nano-vLLM's KV block size (its Config asserts a multiple of 256)


@pytest.fixture(scope="module")
def nano_qwen3(tmp_path_factory):
    """nano-vLLM's model on the tiny checkpoint with its KV cache laid out as its model runner does, its
    torch.compile'd pieces run eagerly, in a one-process gloo group (its layers ask for the TP world).

    In fp16, as nano-vLLM's model runner sets the default dtype: in fp32 its RMSNorm is wrong (``x.float()`` is
    then ``x`` itself, which it normalises in place, residual included), and the interpreter's bf16 dot is."""
    import torch.distributed as dist
    from transformers import AutoConfig

    from tests.helpers import tiny_checkpoint

    sys.path.insert(0, NANO_VLLM_DIR)
    from nanovllm.models.qwen3 import Qwen3ForCausalLM
    from nanovllm.utils.loader import load_model

    torch._dynamo.config.disable = True
    dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg')}/store", rank=0, world_size=1)
    try:
        ckpt = tiny_checkpoint()
        config = AutoConfig.from_pretrained(ckpt)
        torch.set_default_dtype(torch.float16)
        try:
            model = Qwen3ForCausalLM(config)
        finally:
            torch.set_default_dtype(torch.float32)
        load_model(model, ckpt)
        shape = (2, config.num_hidden_layers, 8, NANO_BLOCK, config.num_key_value_heads, config.head_dim)
        kv_cache = torch.full(shape, float("nan"), dtype=torch.float16)
        layers = [m for m in model.modules() if hasattr(m, "k_cache")]
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = kv_cache[0, i], kv_cache[1, i]
        yield ckpt, model
    finally:
        dist.destroy_process_group()
        torch._dynamo.config.disable = False
        sys.path.remove(NANO_VLLM_DIR)


def ints(values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype)


def slot(table, position):
    return table[position // NANO_BLOCK] * NANO_BLOCK + position % NANO_BLOCK


def padded_tables(tables):
    width = max(len(t) for t in tables)
    return ints([t + [-1] * (width - len(t)) for t in tables])


def nano_prefill(model, seqs):
    """One prefill step over ``(tokens, num_cached, block_table)`` per sequence, with the context nano-vLLM's
    prepare_prefill builds: a block table only when some sequence has cached tokens. Last-token logits."""
    from nanovllm.utils.context import reset_context, set_context
    ids, positions, slots, cu_q, cu_k = [], [], [], [0], [0]
    for tokens, cached, table in seqs:
        ids += tokens[cached:]
        positions += range(cached, len(tokens))
        slots += [slot(table, j) for j in range(cached, len(tokens))]
        cu_q.append(cu_q[-1] + len(tokens) - cached)
        cu_k.append(cu_k[-1] + len(tokens))
    tables = padded_tables([t for _, _, t in seqs]) if cu_k[-1] > cu_q[-1] else None
    set_context(True, ints(cu_q), ints(cu_k), max(b - a for a, b in zip(cu_q, cu_q[1:])),
                max(len(t) for t, _, _ in seqs), ints(slots), None, tables)
    try:
        return model.compute_logits(model(ints(ids, torch.int64), ints(positions, torch.int64)))
    finally:
        reset_context()


def nano_decode(model, seqs):
    """One decode step over ``(tokens, block_table)`` per sequence, the last token being the new one."""
    from nanovllm.utils.context import reset_context, set_context
    set_context(False, slot_mapping=ints([slot(t, len(s) - 1) for s, t in seqs]),
                context_lens=ints([len(s) for s, _ in seqs]), block_tables=padded_tables([t for _, t in seqs]))
    try:
        return model.compute_logits(model(ints([s[-1] for s, _ in seqs], torch.int64),
                                          ints([len(s) - 1 for s, _ in seqs], torch.int64)))
    finally:
        reset_context()


@runs_kernels
@needs_nano_vllm
def test_nano_vllm_qwen3_on_the_standin_matches_hf(nano_qwen3):
    # Every attention path nano-vLLM takes: a fresh prefill (contiguous K/V, one sequence spanning two blocks),
    # decode steps, and a prefill that hits a cached block (a block table, more keys than queries). Fed HF's greedy
    # tokens (an fp16 near-tie must not fork the sequences), every step's logits must match HF transformers' in
    # fp32 on the whole sequences.
    from transformers import Qwen3ForCausalLM

    from tests.helpers import random_prompts
    ckpt, model = nano_qwen3
    hf = Qwen3ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    short, long, tail = random_prompts([5, 300, 30], seed=7)
    prompts = {"short": short, "long": long, "shared": long[:NANO_BLOCK] + tail}  # shared: long's first block
    steps = {"short": 4, "long": 4, "shared": 3}
    with torch.inference_mode():
        expected, seqs = {}, {}
        for name, prompt in prompts.items():
            seqs[name] = hf.generate(ints([prompt], torch.int64), max_new_tokens=steps[name] - 1, do_sample=False,
                                     min_new_tokens=steps[name] - 1)[0].tolist()
            expected[name] = hf(ints([seqs[name]], torch.int64)).logits[0, len(prompt) - 1:]
        tables = {"short": [5], "long": [2, 6], "shared": [2, 7]}
        got = {name: [] for name in prompts}

        def until(name, step):  # the sequence as nano-vLLM holds it at a step
            return seqs[name][:len(prompts[name]) + step]

        for name, rows in zip(["short", "long"], nano_prefill(model, [(until("short", 0), 0, tables["short"]),
                                                                      (until("long", 0), 0, tables["long"])])):
            got[name].append(rows)
        for step in range(1, 4):
            for name, rows in zip(["short", "long"], nano_decode(model, [(until(n, step), tables[n])
                                                                         for n in ("short", "long")])):
                got[name].append(rows)
        got["shared"].append(nano_prefill(model, [(until("shared", 0), NANO_BLOCK, tables["shared"])])[0])
        for step in range(1, 3):
            got["shared"].append(nano_decode(model, [(until("shared", step), tables["shared"])])[0])
    for name in prompts:
        torch.testing.assert_close(torch.stack(got[name]).float(), expected[name], atol=2e-2, rtol=2e-2)
