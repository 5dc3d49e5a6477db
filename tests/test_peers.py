"""The peer engines' harness: the flash_attn stand-in against plain causal attention, nano-vLLM's own Qwen3
model running on it against HF transformers, and the nano-vLLM runner's rows without a GPU.

CPU: the stand-in's tests run on the kernels' torch reference in this process and, in a fresh process, on the
Triton kernels under the interpreter (fp32 and fp16: the interpreter's bf16 tl.dot is wrong). nano-vLLM's model
needs its own Triton store kernel, so it runs under the interpreter only. nano-vLLM's code is not in this
repository: its tests read it from NANO_VLLM_DIR or ``.peers/nano-vllm`` and are skipped without it.
GPU: the same tests on CUDA tensors (bf16 too), and the runner through ``run_peer``, as the benchmark calls it.
"""
import os
import sys

import pytest
import torch

from tests.kernel_testing import DEVICE, kernel_test_setup, select_interpreter

select_interpreter()

from minivllm.peers import REPO_ROOT, STANDINS_DIR  # noqa: E402
from tests.helpers import PEER_ROW_FIELDS  # noqa: E402

sys.path.insert(0, STANDINS_DIR)
import flash_attn  # noqa: E402  (the stand-in)

on_triton, runs_kernels, test_cpu_kernels_in_fresh_process = kernel_test_setup(__file__)

NANO_VLLM_DIR = os.environ.get("NANO_VLLM_DIR", os.path.join(REPO_ROOT, ".peers", "nano-vllm"))
needs_nano_vllm = pytest.mark.skipif(not os.path.isdir(os.path.join(NANO_VLLM_DIR, "nanovllm")),
                                     reason=f"nano-vLLM's code is not at {NANO_VLLM_DIR} (set NANO_VLLM_DIR)")
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=3e-3, rtol=3e-3),
             torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + [torch.bfloat16] * (DEVICE == "cuda"),
                                 ids=str)
# (num_q_heads, num_kv_heads, head_dim): GQA groups of 2 and 4, plain multi-head attention, and on the GPU
# Qwen3-0.6B's heads.
HEADS = pytest.mark.parametrize("heads", [(4, 2, 16), (8, 2, 32), (2, 2, 16)] + [(16, 8, 128)] * (DEVICE == "cuda"),
                                ids=str)


def causal_attention(q, k, v, scale):
    """One sequence, in fp64 on CPU: q ``[Lq, Hq, D]`` are the last Lq of the Lk positions of k, v ``[Lk, Hkv, D]``."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.cpu().double().repeat_interleave(group, dim=1) for x in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q.cpu().double(), k) * scale
    q_pos = torch.arange(k.shape[0] - q.shape[0], k.shape[0])
    scores.masked_fill_(torch.arange(k.shape[0])[None, None, :] > q_pos[None, :, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def assert_attention_close(out, expected, dtype):
    torch.testing.assert_close(out.cpu().double(), expected, **TOLERANCE[dtype])


def cumulative(lengths):
    return torch.tensor([0, *lengths]).cumsum(0).to(device=DEVICE, dtype=torch.int32)


def qkv_views(tokens, heads, dtype, gen):
    """q, k, v ``[tokens, H, D]`` as views into one fused projection output, as nano-vLLM splits them."""
    num_q, num_kv, head_dim = heads
    qkv = torch.randn(tokens, num_q + 2 * num_kv, head_dim, generator=gen).to(device=DEVICE, dtype=dtype)
    return qkv[:, :num_q], qkv[:, num_q:num_q + num_kv], qkv[:, num_q + num_kv:]


def paged(seqs_k, seqs_v, block_size, gen):
    """NaN-filled caches holding each sequence's K/V in shuffled blocks, and block tables padded with -1."""
    blocks = [-(-k.shape[0] // block_size) for k in seqs_k]
    num_blocks = sum(blocks) + 2
    order = torch.randperm(num_blocks, generator=gen).tolist()
    shape = (num_blocks, block_size, *seqs_k[0].shape[1:])
    k_cache = torch.full(shape, float("nan"), dtype=seqs_k[0].dtype, device=DEVICE)
    v_cache = k_cache.clone()
    table = torch.full((len(seqs_k), max(blocks)), -1, dtype=torch.int32, device=DEVICE)
    for b, (k, v) in enumerate(zip(seqs_k, seqs_v)):
        table[b, :blocks[b]] = torch.tensor(order[:blocks[b]])
        order = order[blocks[b]:]
        pos = torch.arange(k.shape[0], device=DEVICE)
        slots = table[b, pos // block_size].long() * block_size + pos % block_size
        k_cache.view(-1, *shape[2:])[slots] = k
        v_cache.view(-1, *shape[2:])[slots] = v
    return k_cache, v_cache, table


@DTYPES
@HEADS
@pytest.mark.parametrize("q_lens", [[1, 70, 5, 130], [3, 20]], ids=["view-blocks", "shorter-than-a-view-block"])
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
        assert_attention_close(out[s], causal_attention(q[s], k[s], v[s], 0.3), dtype)


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
        assert_attention_close(out[cu[b]:cu[b + 1]], expected, dtype)


@DTYPES
@HEADS
@pytest.mark.parametrize("block_size", [256, 16])
def test_decode_with_block_table(block_size, heads, dtype):
    gen = torch.Generator().manual_seed(block_size + 1)
    k_lens = [1, 17, 256, 300, 0]  # the last row is CUDA-graph padding: no keys, zeros out
    seqs = [qkv_views(max(n, 1), heads, dtype, gen) for n in k_lens]
    k_cache, v_cache, table = paged([k for _, k, _ in seqs], [v for _, _, v in seqs], block_size, gen)
    q = torch.stack([q[-1] for q, _, _ in seqs]).unsqueeze(1)
    cache_seqlens = torch.tensor(k_lens, dtype=torch.int32, device=DEVICE)
    out = flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens, block_table=table,
                                             softmax_scale=0.2, causal=True)
    assert out.shape == q.shape and out.dtype == dtype
    for b, (n, (_, k, v)) in enumerate(zip(k_lens, seqs)):
        expected = causal_attention(q[b], k[:n], v[:n], 0.2) if n else torch.zeros(q[b].shape, dtype=torch.float64)
        assert_attention_close(out[b], expected, dtype)


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
        assert_attention_close(out[s], causal_attention(q[s], k[s], v[s], 0.25), torch.float32)


def test_rejects_what_it_does_not_implement():
    q = torch.zeros(4, 2, 16, device=DEVICE)
    cu = cumulative([4])
    with pytest.raises(NotImplementedError, match="causal"):
        flash_attn.flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, causal=False)
    with pytest.raises(NotImplementedError, match="one query token"):
        flash_attn.flash_attn_with_kvcache(q.view(2, 2, 2, 16), q, q, cache_seqlens=cu, block_table=cu)


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
        model.to(DEVICE)
        shape = (2, config.num_hidden_layers, 8, NANO_BLOCK, config.num_key_value_heads, config.head_dim)
        kv_cache = torch.full(shape, float("nan"), dtype=torch.float16, device=DEVICE)
        layers = [m for m in model.modules() if hasattr(m, "k_cache")]
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = kv_cache[0, i], kv_cache[1, i]
        yield ckpt, model
    finally:
        dist.destroy_process_group()
        torch._dynamo.config.disable = False
        sys.path.remove(NANO_VLLM_DIR)


def ints(values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


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
            seqs[name] = hf.generate(torch.tensor([prompt]), max_new_tokens=steps[name] - 1, do_sample=False,
                                     min_new_tokens=steps[name] - 1)[0].tolist()
            expected[name] = hf(torch.tensor([seqs[name]])).logits[0, len(prompt) - 1:]
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
        torch.testing.assert_close(torch.stack(got[name]).cpu().float(), expected[name], atol=2e-2, rtol=2e-2)


# ---- the nano-vLLM runner without a GPU ---------------------------------------------------------------------------
COMMIT = "bb823b3e06983d71485a8e1f23715ebd87d98ef8"


class FakeEngine:
    """An engine on a fake clock: each generate costs ``call_s`` plus ``token_s`` per token asked of it."""

    def __init__(self, token_s, call_s=0.25):
        self.token_s, self.call_s, self.now, self.calls = token_s, call_s, 0.0, []

    def clock(self):
        return self.now

    def reset(self):
        self.calls.append("reset")

    def generate(self, prompts, max_tokens):
        self.calls.append(("generate", prompts, max_tokens))
        self.now += self.call_s + self.token_s * max_tokens
        return [max_tokens] * len(prompts)

    def generate_requests(self, requests):
        self.calls.append(("requests", len(requests)))
        self.now += self.call_s + self.token_s * sum(r.max_tokens for r in requests)
        return [r.max_tokens for r in requests]

    def warm_up(self, requests):
        self.calls.append("warm_up")

    def kv_cache_mb(self):
        return 64.0


def nano_args(workload, *extra):
    from minivllm.peers import nano_vllm
    return nano_vllm.parse_args(["--nano-vllm", "nv", "--model", "ckpt/qwen3-0.6b", "--workload", workload,
                                 "--rows-out", "rows.json", *extra])


def nano_rows(engine, args):
    from minivllm.peers import nano_vllm
    base = nano_vllm.base_row(args, COMMIT, nano_vllm.max_model_len(args))
    return list(nano_vllm.workload_rows(engine, args, base, clock=engine.clock))


def assert_reset_before_every_run(engine):
    runs = [i for i, c in enumerate(engine.calls) if c not in ("reset", "warm_up")]
    assert runs and all(engine.calls[i - 1] == "reset" for i in runs)


def test_nano_runner_arguments_and_engine_sizes():
    from minivllm.peers.nano_vllm import max_model_len
    args = nano_args("latency", "--batches", "1,8", "--prompt-lens", "32,512", "--gen-tokens", "64")
    assert (args.batches, args.prompt_lens, args.gen_tokens, args.reps) == ([1, 8], [32, 512], 64, 5)
    assert args.model_name == "qwen3-0.6b" and args.gpu_memory_utilization == 0.9
    # minivllm.bench's engine sizes for the same workloads
    assert max_model_len(args) == 512 + 64 + 16
    assert max_model_len(nano_args("ttft", "--prompt-lens", "128,8192")) == 8192 + 8
    assert max_model_len(nano_args("throughput")) == 4096
    with pytest.raises(SystemExit):
        nano_args("decode")
    with pytest.raises(SystemExit):
        nano_args("latency", "--reps", "0")


def test_nano_runner_reads_the_archived_commit(tmp_path):
    from minivllm.peers.nano_vllm import read_commit
    with pytest.raises(SystemExit, match="COMMIT"):
        read_commit(str(tmp_path))
    (tmp_path / "COMMIT").write_text("bb823b3\n")
    with pytest.raises(SystemExit, match="40 hex digits"):
        read_commit(str(tmp_path))
    (tmp_path / "COMMIT").write_text(COMMIT + "\n")
    assert read_commit(str(tmp_path)) == COMMIT


def test_nano_latency_rows_follow_minivllm_bench():
    from minivllm.peers.nano_vllm import NEAR_GREEDY_TEMPERATURE
    from minivllm.workloads import latency_prompts
    engine = FakeEngine(token_s=0.003)
    args = nano_args("latency", "--batches", "1,4", "--prompt-lens", "16", "--gen-tokens", "8", "--reps", "5")
    rows = nano_rows(engine, args)
    assert [(r["batch_size"], r["seq_len"]) for r in rows] == [(1, 16), (4, 16)]
    for r in rows:
        assert PEER_ROW_FIELDS <= set(r)
        assert (r["workload"], r["engine"], r["fusion"], r["tensor_parallel_size"]) == ("decode_latency", "nano-vllm",
                                                                                         None, 1)
        assert (r["peer"], r["peer_commit"], r["model_name"]) == ("GeeeekExplorer/nano-vllm", COMMIT, "qwen3-0.6b")
        # (time of 1 + N tokens - time of 1 token) / N: the fake engine's 3 ms per token, in each of 5 samples
        assert r["samples_ms"] == pytest.approx([3.0] * 5) and r["latency_ms"] == pytest.approx(3.0)
        assert r["throughput_tokens_per_sec"] == pytest.approx(r["batch_size"] * 1e3 / 3.0)
        assert r["prefill_ms"] == pytest.approx(1e3 * (0.25 + 0.003)) and r["max_model_len"] == 16 + 8 + 16
        assert "flash_attn" in r["notes"] and f"{NEAR_GREEDY_TEMPERATURE:g}" in r["notes"]
    generated = [c for c in engine.calls if c[0] == "generate"]
    # the workload's own prompts; per configuration a warm-up pair, then 5 timed pairs of 1 and 1 + N tokens
    assert [c[1] for c in generated] == [latency_prompts(1, 16)] * 12 + [latency_prompts(4, 16)] * 12
    assert [c[2] for c in generated[:12]] == [9, 1] + [1, 9] * 5
    assert_reset_before_every_run(engine)


def test_nano_ttft_rows():
    from minivllm.workloads import ttft_prompt
    engine = FakeEngine(token_s=0.001, call_s=0.02)
    rows = nano_rows(engine, nano_args("ttft", "--prompt-lens", "128,1024"))
    assert [(r["workload"], r["batch_size"], r["seq_len"]) for r in rows] == [("ttft", 1, 128), ("ttft", 1, 1024)]
    for r in rows:
        assert PEER_ROW_FIELDS <= set(r) and r["samples_ms"] == pytest.approx([21.0] * 5)
        assert r["throughput_tokens_per_sec"] == pytest.approx(r["seq_len"] / 0.021)
    expected = [([ttft_prompt(128)], 1)] * 6 + [([ttft_prompt(1024)], 1)] * 6  # a warm-up and 5 timed runs each
    assert [c[1:] for c in engine.calls if c != "reset"] == expected
    assert_reset_before_every_run(engine)


@pytest.mark.parametrize("token_s, reps", [(1e-2, 3), (1e-4, 5)], ids=["runs-over-5s", "short-runs"])
def test_nano_throughput_rows(token_s, reps):
    from minivllm.workloads import throughput_requests
    engine = FakeEngine(token_s=token_s)
    [r] = nano_rows(engine, nano_args("throughput", "--num-seqs", "16"))
    out_tokens = sum(q.max_tokens for q in throughput_requests(16))
    assert PEER_ROW_FIELDS <= set(r) and (r["workload"], r["batch_size"], r["seq_len"]) == ("throughput", 16, None)
    assert r["output_tokens"] == out_tokens and r["kv_cache_mb"] == 64.0
    # 3 timed runs when each lasts over 5 s, else 5; nano-vLLM's warm-up first
    assert r["samples_ms"] == pytest.approx([1e3 * (0.25 + token_s * out_tokens)] * reps)
    assert r["throughput_tokens_per_sec"] == pytest.approx(out_tokens * 1e3 / r["latency_ms"])
    assert engine.calls[0] == "warm_up" and engine.calls.count(("requests", 16)) == reps
    assert "temperature 0.6" in r["notes"]
    assert_reset_before_every_run(engine)


def test_runner_refuses_prompts_beyond_the_vocabulary():
    from minivllm.peers.protocol import check_vocab
    check_vocab(nano_args("latency", "--batches", "2", "--prompt-lens", "64"), vocab_size=10001)
    for workload in ("latency", "ttft", "throughput"):
        with pytest.raises(SystemExit, match="vocabulary"):
            check_vocab(nano_args(workload, "--num-seqs", "4"), vocab_size=1024)


def test_a_failed_generate_is_not_a_sample():
    from minivllm.peers.protocol import decode_latency_samples

    class Stopping(FakeEngine):  # EOS honoured after all: fewer tokens than asked
        def generate(self, prompts, max_tokens):
            return [min(n, 3) for n in super().generate(prompts, max_tokens)]

    with pytest.raises(RuntimeError, match="got"):
        decode_latency_samples(Stopping(token_s=1e-3), [[1, 2]], gen_tokens=8, reps=5)


# ---- GPU: the runner, as the benchmark calls it -------------------------------------------------------------------
@pytest.mark.gpu
@needs_nano_vllm
def test_nano_vllm_runs_through_run_peer(tmp_path):
    from minivllm.make_checkpoint import make_checkpoint
    from minivllm.peers import run_peer
    from minivllm.peers.nano_vllm import read_commit
    torch.cuda.empty_cache()  # nano-vLLM sizes its KV cache from the GPU memory left free
    # bf16 (nano-vLLM is wrong in fp32), with a vocabulary that holds the workloads' random ids
    ckpt = make_checkpoint("qwen3-tiny", str(tmp_path / "tiny"), vocab_size=10240, torch_dtype="bfloat16")
    common = ["--nano-vllm", NANO_VLLM_DIR, "--model", ckpt, "--gpu-memory-utilization", "0.5"]
    latency = run_peer("nano_vllm", [*common, "--workload", "latency", "--batches", "1,3", "--prompt-lens", "40,300",
                                     "--gen-tokens", "8"], timeout_s=600)
    throughput = run_peer("nano_vllm", [*common, "--workload", "throughput", "--num-seqs", "4"], timeout_s=600)
    assert [(r["batch_size"], r["seq_len"]) for r in latency] == [(1, 40), (1, 300), (3, 40), (3, 300)]
    for r in latency + throughput:
        assert r["engine"] == "nano-vllm" and r["peer_commit"] == read_commit(NANO_VLLM_DIR)
        assert len(r["samples_ms"]) >= 3 and r["latency_ms"] > 0 and r["peak_memory_mb"] > 0
    assert throughput[0]["output_tokens"] > 0 and throughput[0]["kv_cache_mb"] > 0


@needs_nano_vllm
def test_nano_engine_reset_forgets_nano_vllms_prefix_cache(monkeypatch):
    # What keeps one timed run from hitting blocks an earlier run cached, in nano-vLLM's own block manager.
    import types
    monkeypatch.syspath_prepend(NANO_VLLM_DIR)
    from nanovllm.engine.block_manager import BlockManager
    from nanovllm.engine.sequence import Sequence

    from minivllm.peers.nano_vllm import NanoEngine
    manager = BlockManager(num_blocks=6, block_size=NANO_BLOCK)
    prompt = list(range(600))  # two full blocks and a partial one
    first = Sequence(prompt)
    manager.allocate(first, manager.can_allocate(first))
    first.num_scheduled_tokens = len(prompt)
    manager.hash_blocks(first)
    manager.deallocate(first)
    assert manager.can_allocate(Sequence(prompt)) == 2  # a run after it would reuse both full blocks
    NanoEngine(types.SimpleNamespace(scheduler=types.SimpleNamespace(block_manager=manager)), None).reset()
    again = Sequence(prompt)
    assert manager.can_allocate(again) == 0
    manager.allocate(again, 0)
    assert len(again.block_table) == 3 and again.num_cached_tokens == 0


@needs_nano_vllm
def test_nano_vllm_takes_the_runners_settings_and_our_checkpoint(monkeypatch, tmp_path):
    from dataclasses import fields

    from minivllm.make_checkpoint import make_checkpoint
    from minivllm.peers.nano_vllm import NEAR_GREEDY_TEMPERATURE, engine_settings, load_nano_vllm
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_nano_vllm puts nano-vLLM and the stand-in first
    llm_class, sampling_params_class = load_nano_vllm(NANO_VLLM_DIR)
    from nanovllm.config import Config
    assert llm_class.__module__.startswith("nanovllm") and sys.modules["flash_attn"] is flash_attn
    args = nano_args("latency")
    settings = engine_settings(args, 272)
    assert set(settings) <= {f.name for f in fields(Config)}  # else nano-vLLM would drop them silently
    config = Config(make_checkpoint("qwen3-tiny", str(tmp_path / "tiny"), torch_dtype="bfloat16"), **settings)
    assert (config.max_model_len, config.gpu_memory_utilization, config.kvcache_block_size) == (272, 0.9, NANO_BLOCK)
    assert config.hf_config.dtype == torch.bfloat16
    with pytest.raises(AssertionError, match="greedy"):
        sampling_params_class(temperature=0.0)
    sampling_params_class(temperature=NEAR_GREEDY_TEMPERATURE)  # passes its check


@needs_nano_vllm
def test_nano_runner_refuses_an_fp32_checkpoint_before_starting(tmp_path):
    from minivllm.make_checkpoint import make_checkpoint
    from minivllm.peers import nano_vllm
    ckpt = make_checkpoint("qwen3-tiny", str(tmp_path / "tiny"), vocab_size=10240)  # fp32
    with pytest.raises(SystemExit, match="bf16 or fp16"):
        nano_vllm.main(["--nano-vllm", NANO_VLLM_DIR, "--model", ckpt, "--workload", "ttft", "--rows-out", "unused"])


def test_a_stage_limit_names_the_peer_it_stopped_and_those_left(monkeypatch):
    # SIGTERM reaches the benchmark as SystemExit (its handler) while a peer runs: the saved file must say
    # which peer was stopped and which never started, instead of an empty failed_peers.
    import argparse

    from minivllm import bench, peers

    def run_peer(module, argv, timeout_s):
        if "eager" in argv:
            raise SystemExit(143)
        yield {"engine": module}

    monkeypatch.setattr(peers, "run_peer", run_peer)
    args = argparse.Namespace(model="m", model_name="m", benchmark="throughput", prompt_lens=[128], reps=3,
                              peers=["nano-vllm", "hf", "hf_compiled"], nano_vllm="nv", num_seqs=4, batches=[1],
                              gen_tokens=8, peer_timeout=10)
    rows, failed, saved = [], {}, []
    with pytest.raises(SystemExit):
        bench.peer_rows(args, rows.append, failed, lambda: saved.append(dict(failed)))
    assert rows == [{"engine": "nano_vllm"}]
    assert failed["hf"].startswith("stopped by SIGTERM") and failed["hf_compiled"].startswith("not started")
    assert "nano-vllm" not in failed and saved == [failed]
