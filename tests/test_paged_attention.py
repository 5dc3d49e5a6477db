"""Paged attention and KV-cache store kernels against the torch references.

CPU: the kernels run under Triton's interpreter (tiny shapes, fp32 and fp16) against the reference in fp64,
over NaN-filled caches with shuffled blocks, and every buffer the wrappers allocate starts as NaN.
GPU: bf16 at Qwen3-0.6B shapes against the fp32 reference, and CUDA-graph capture of decode.
"""
import pytest
import torch

from tests.kernel_testing import rerun_in_interpreter, select_interpreter

select_interpreter()

from kernels.paged_attention import (  # noqa: E402
    _TICKETS,
    paged_attention,
    paged_attention_ref,
    store_kvcache,
    store_kvcache_ref,
)
from kernels.guard import use_triton  # noqa: E402

INTERPRETED = use_triton(torch.empty(0))
cpu = pytest.mark.skipif(not INTERPRETED, reason="triton was imported before TRITON_INTERPRET=1 could be set; "
                                                 "test_cpu_kernels_in_fresh_process runs this test")


def test_cpu_kernels_in_fresh_process():
    if INTERPRETED:
        pytest.skip("the CPU tests run in this process")
    rerun_in_interpreter(__file__)


@pytest.fixture(autouse=True)
def nan_buffers(monkeypatch):
    """Outputs and split partials start as NaN, so any element a kernel fails to write shows up."""
    def poisoned(factory):
        def make(*args, **kwargs):
            t = factory(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return make
    monkeypatch.setattr(torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(torch.empty_like))


def make_batch(specs, num_q_heads, num_kv_heads, head_dim, dtype, block_size=16, device="cpu", seed=0):
    """Sequences given as (q_len, k_len) over a NaN-filled cache whose blocks are handed out in random order.

    q is a strided view (as when split off a fused qkv projection); only the sequences' own slots hold data.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-k_len // block_size) for _, k_len in specs]
    num_blocks = sum(blocks) + 3  # a few blocks no sequence owns
    order = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.zeros(len(specs), max(max(blocks), 1), dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    for b, (_, k_len) in enumerate(specs):
        block_tables[b, :blocks[b]] = torch.tensor(order[:blocks[b]], dtype=torch.int32)
        order = order[blocks[b]:]
        positions = torch.arange(k_len)
        slots = block_tables[b, positions // block_size].long() * block_size + positions % block_size
        k, v = torch.randn(2, k_len, num_kv_heads, head_dim, generator=gen)
        store_kvcache_ref(k, v, k_cache, v_cache, slots)
    cu_seqlens_q = torch.tensor([0] + [q_len for q_len, _ in specs]).cumsum(0).to(torch.int32)
    wide = torch.randn(int(cu_seqlens_q[-1]), num_q_heads + 2, head_dim, generator=gen).to(dtype)
    batch = dict(q=wide[:, 1:-1], k_cache=k_cache, v_cache=v_cache, cu_seqlens_q=cu_seqlens_q,
                 seqlens_k=torch.tensor([k_len for _, k_len in specs], dtype=torch.int32), block_tables=block_tables)
    return {name: t.to(device) for name, t in batch.items()}


def reference(batch, dtype):
    """paged_attention_ref on the batch upcast to ``dtype``."""
    upcast = {name: t.to(dtype) if t.is_floating_point() else t for name, t in batch.items()}
    return paged_attention_ref(**upcast, scale=scale_of(batch))


def scale_of(batch):
    return batch["q"].shape[-1] ** -0.5


def check(batch, atol, rtol, **kwargs):
    out = paged_attention(**batch, scale=scale_of(batch), **kwargs)
    assert out.dtype == batch["q"].dtype and out.shape == batch["q"].shape
    torch.testing.assert_close(out.double(), reference(batch, torch.float64), atol=atol, rtol=rtol)


# (num_q_heads, num_kv_heads, head_dim): GQA groups of 2, 4 and 1.
HEADS = [(4, 2, 16), (4, 1, 32), (2, 2, 16)]
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=3e-3, rtol=3e-3)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
DECODE_CONTEXTS = [(1, k_len) for k_len in (1, 5, 16, 17, 40)]
# Chunked prefill and prefix hits (q_len < k_len), a whole prompt, and single-token rows, in one batch.
CHUNKED = [(5, 37), (16, 16), (1, 9), (20, 52), (1, 1), (3, 3)]


@DTYPES
@pytest.mark.parametrize("heads", HEADS, ids=str)
@cpu
def test_decode(heads, dtype):
    check(make_batch(DECODE_CONTEXTS, *heads, dtype), **TOLERANCE[dtype])  # decode detected: every q_len is 1


@pytest.mark.parametrize("num_splits", [2, 7])
@pytest.mark.parametrize("heads", HEADS, ids=str)
@cpu
def test_decode_split_along_keys(heads, num_splits):
    # 7 splits leave some empty for the short contexts: their partials must drop out of the merge.
    batch = make_batch(DECODE_CONTEXTS + [(1, 100)], *heads, torch.float32)
    check(batch, decode=True, num_splits=num_splits, **TOLERANCE[torch.float32])


@cpu
def test_split_merge_rearms_its_tickets():
    # The last split to finish merges and zeroes its ticket: a second launch on the same tickets gives the same bits.
    batch = make_batch(DECODE_CONTEXTS + [(1, 100)], 4, 2, 16, torch.float32)
    first = paged_attention(**batch, scale=scale_of(batch), decode=True, num_splits=5)
    assert all(not t.any() for t in _TICKETS[first.device])
    assert torch.equal(paged_attention(**batch, scale=scale_of(batch), decode=True, num_splits=5), first)


@DTYPES
@pytest.mark.parametrize("heads", HEADS, ids=str)
@cpu
def test_prefill_from_scratch(heads, dtype):
    batch = make_batch([(1, 1), (7, 7), (16, 16), (33, 33)], *heads, dtype)
    check(batch, **TOLERANCE[dtype])


@DTYPES
@pytest.mark.parametrize("heads", HEADS, ids=str)
@cpu
def test_chunked_prefill_with_cached_prefix(heads, dtype):
    check(make_batch(CHUNKED, *heads, dtype), max_seqlen_q=20, **TOLERANCE[dtype])


@cpu
def test_varlen_split_along_keys():
    check(make_batch(CHUNKED, 4, 2, 16, torch.float32), decode=False, num_splits=3, **TOLERANCE[torch.float32])


@cpu
def test_group_not_power_of_two():
    # 3 query heads per kv head: a program of 16 (or 64) rows holds 5 (or 21) tokens and one unused row.
    check(make_batch(CHUNKED, 6, 2, 16, torch.float32), **TOLERANCE[torch.float32])
    check(make_batch(DECODE_CONTEXTS, 6, 2, 16, torch.float32), decode=True, num_splits=3, **TOLERANCE[torch.float32])


@cpu
def test_decode_rows_through_varlen_kernel():
    # decode=False must also handle one-token sequences (the decode path is an optimisation, not a requirement).
    check(make_batch(DECODE_CONTEXTS, 4, 2, 16, torch.float16), decode=False, **TOLERANCE[torch.float16])


@cpu
def test_empty_sequences():
    # A decode row with no keys (how a CUDA-graph batch is padded) gives zeros, as the reference does;
    # a sequence with no new tokens in a varlen batch is skipped.
    decode = make_batch([(1, 0), (1, 20), (1, 0)], 4, 2, 16, torch.float32)
    check(decode, decode=True, **TOLERANCE[torch.float32])
    check(decode, decode=True, num_splits=2, **TOLERANCE[torch.float32])
    check(make_batch([(3, 10), (0, 5), (2, 2)], 4, 2, 16, torch.float32), **TOLERANCE[torch.float32])


@cpu
def test_store_kvcache():
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(5, 16, 2, 16, generator=gen).half()
    v_cache = torch.randn(5, 16, 2, 16, generator=gen).half()
    kv = torch.randn(6, 5, 16, generator=gen)  # fp32 k and v interleaved per token: strided views
    k, v = kv[:, 0:2], kv[:, 2:4]
    slot_mapping = torch.tensor([17, -1, 0, 79, -1, 40], dtype=torch.int32)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    store_kvcache_ref(k, v, expected_k, expected_v, slot_mapping)
    store_kvcache(k, v, k_cache, v_cache, slot_mapping)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


@cpu
def test_rejects_bad_arguments():
    batch = make_batch(CHUNKED, 4, 2, 16, torch.float32)
    bad = {
        "dtype": dict(q=batch["q"].half()),
        "heads": dict(q=batch["q"][:, :3]),
        "head_dim": dict(k_cache=batch["k_cache"][..., :8], v_cache=batch["v_cache"][..., :8]),
        "block_size": dict(k_cache=batch["k_cache"][:, :8], v_cache=batch["v_cache"][:, :8]),
        "last-dim stride": dict(q=torch.zeros(batch["q"].shape[0], 16, 4).transpose(1, 2)),
        "cu_seqlens_q": dict(cu_seqlens_q=batch["cu_seqlens_q"][:-1]),
        "index dtype": dict(seqlens_k=batch["seqlens_k"].float()),
        "block_tables": dict(block_tables=batch["block_tables"][:-1]),
    }
    for name, change in bad.items():
        with pytest.raises(ValueError):
            paged_attention(**{**batch, **change}, scale=0.25)
            pytest.fail(f"accepted a bad {name}")
    with pytest.raises(ValueError, match="one new token per sequence"):
        paged_attention(**batch, scale=0.25, decode=True)
    k = torch.zeros(3, 2, 16)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kvcache(k, k, batch["k_cache"], batch["v_cache"], torch.zeros(3, dtype=torch.float32))


# ---- GPU ----------------------------------------------------------------------------------------------------------
QWEN3 = dict(num_q_heads=16, num_kv_heads=8, head_dim=128, block_size=256)
BF16 = dict(atol=2e-2, rtol=2e-2)


def qwen3_batch(specs, seed=0):
    return make_batch(specs, dtype=torch.bfloat16, device="cuda", seed=seed, **QWEN3)


def gpu_check(batch, tolerance, **kwargs):
    out = paged_attention(**batch, scale=scale_of(batch), **kwargs)
    torch.testing.assert_close(out.float(), reference(batch, torch.float32), **tolerance)


@pytest.mark.gpu
@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_gpu_decode_bf16_qwen3(batch_size):
    gen = torch.Generator().manual_seed(batch_size)
    contexts = [4096, 1] + torch.randint(1, 4097, (batch_size,), generator=gen).tolist()
    gpu_check(qwen3_batch([(1, k) for k in contexts[:batch_size]]), BF16, decode=True, max_seqlen_k=4096)


@pytest.mark.gpu
def test_gpu_prefill_bf16_qwen3():
    # Whole prompts, prefix hits / later chunks (q_len < k_len) and single-token rows in one batch.
    specs = [(1000, 1000), (300, 3000), (1, 4096), (17, 17), (256, 700), (1, 1), (2048, 4096)]
    gpu_check(qwen3_batch(specs), BF16)
    gpu_check(qwen3_batch(specs[2:4]), BF16, num_splits=4)


@pytest.mark.gpu
@pytest.mark.parametrize("decode", [True, False])
def test_gpu_fp32_tiny_shapes(decode):
    # The qwen3-tiny engine on GPU runs fp32 with head_dim 16: the dots must stay true fp32 (no TF32).
    specs = DECODE_CONTEXTS if decode else CHUNKED
    batch = make_batch(specs, 4, 2, 16, torch.float32, device="cuda")
    gpu_check(batch, dict(atol=1e-4, rtol=1e-4), decode=decode)


@pytest.mark.gpu
def test_gpu_decode_cuda_graph_replay():
    # The last row is padding, as in a captured batch; both batches span 29 cache blocks.
    static = qwen3_batch([(1, 4000), (1, 1), (1, 3000), (1, 0)])
    call = dict(**static, scale=scale_of(static), decode=True, max_seqlen_k=4096)
    paged_attention(**call)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_attention(**call)
    # New contents, same tensors: other contexts, queries, block tables and cache.
    fresh = qwen3_batch([(1, 3000), (1, 4096), (1, 5), (1, 0)], seed=1)
    for name, t in static.items():
        t.copy_(fresh[name])
    graph.replay()
    eager = paged_attention(**call)
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    torch.testing.assert_close(out.float(), reference(static, torch.float32), **BF16)


@pytest.mark.gpu
def test_gpu_offsets_past_int32():
    # A Qwen3 layer's cache past 2**31 elements: block * block_stride must not wrap around in the kernels.
    block_elems = QWEN3["block_size"] * QWEN3["num_kv_heads"] * QWEN3["head_dim"]
    num_blocks = 2**31 // block_elems + 2
    shape = (num_blocks, QWEN3["block_size"], QWEN3["num_kv_heads"], QWEN3["head_dim"])
    k_cache = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.empty_like(k_cache)
    k_len = 300
    block_tables = torch.tensor([[num_blocks - 1, 3]], dtype=torch.int32, device="cuda")
    positions = torch.arange(k_len, device="cuda")
    slots = block_tables[0, positions // 256].long() * 256 + positions % 256
    k, v = torch.randn(2, k_len, 8, 128, device="cuda").bfloat16()
    store_kvcache(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(-1, 8, 128)[slots], k) and torch.equal(v_cache.view(-1, 8, 128)[slots], v)
    batch = dict(q=torch.randn(1, 16, 128, device="cuda").bfloat16(), k_cache=k_cache, v_cache=v_cache,
                 cu_seqlens_q=torch.tensor([0, 1], dtype=torch.int32, device="cuda"),
                 seqlens_k=torch.tensor([k_len], dtype=torch.int32, device="cuda"), block_tables=block_tables)
    out = paged_attention(**batch, scale=scale_of(batch), decode=True)
    small = dict(batch, k_cache=k_cache[[num_blocks - 1, 3]].float(), v_cache=v_cache[[num_blocks - 1, 3]].float(),
                 q=batch["q"].float(), block_tables=torch.tensor([[0, 1]], dtype=torch.int32, device="cuda"))
    torch.testing.assert_close(out.float(), paged_attention_ref(**small, scale=scale_of(batch)), **BF16)


@pytest.mark.gpu
def test_attention_benchmark_times_decode_against_the_kv_floor():
    # kernels.bench --attention at two small points: every row timed beside its floor, the splits recorded,
    # and the kernel matching the reference (also with more sequences than the rows it checks: run 9's
    # batch 256 failed there).
    from kernels import bench
    bench.CEILINGS.update(bench.measure_ceilings())
    rows = bench.bench_attention(rep=5, batches=(2, bench.ERR_ROWS + 2), contexts=(512,))
    assert [(r["M"], r["N"]) for r in rows] == [(2, 512), (bench.ERR_ROWS + 2, 512)]
    for r in rows:
        assert r["us_median"] > 0 and r["floor_us"] > 0 and r["config"]["num_splits"] >= 1
        assert r["rel_err_vs_fp64"] < 1e-2


@pytest.mark.gpu
def test_prefill_attention_benchmark_times_ours_beside_torch_sdpa_against_the_flop_floor():
    from kernels import bench
    bench.CEILINGS.update(bench.measure_ceilings())
    rows = bench.bench_prefill_attention(rep=5, tokens=(300, 512))
    assert [(r["M"], r["impl"]) for r in rows] == [(300, "fused"), (300, "torch_sdpa"), (512, "fused"),
                                                   (512, "torch_sdpa")]
    for r in rows:
        assert r["us_median"] > 0 and r["floor_us"] > 0 and r["tflops"] > 0
    assert all(r["rel_err_vs_fp64"] < 1e-2 for r in rows if r["impl"] == "fused")
