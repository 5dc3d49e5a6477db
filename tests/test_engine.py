"""Engine features against the engine with the feature off, and bad input."""
import gc
import weakref

import pytest
import torch

from minivllm import LLM, SamplingParams
from tests.helpers import greedy_tokens, random_prompts, tiny_checkpoint

# Shared prefixes (block size 16) so prefix caching has something to hit.
BASE = random_prompts([40], seed=1)[0]
PROMPTS = [BASE + tail for tail in random_prompts([3, 9, 20, 1], seed=2)] + random_prompts([33, 5, 70], seed=3)


@pytest.fixture(scope="module")
def ckpt():
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def reference(ckpt):
    llm = LLM(ckpt, device="cpu", enable_prefix_caching=False, enable_chunked_prefill=False,
              max_num_batched_tokens=4096)
    return greedy_tokens(llm, PROMPTS)


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, device="cpu", max_model_len=256)


def test_prefix_caching_reuses_blocks_and_keeps_outputs(ckpt, reference):
    llm = LLM(ckpt, device="cpu", enable_prefix_caching=True, enable_chunked_prefill=False,
              max_num_batched_tokens=4096, max_num_seqs=1)  # one at a time: later prompts hit earlier ones
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(PROMPTS, sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert [o.num_cached_tokens for o in outs[:4]] == [0, 32, 32, 32]
    # A second pass hits the blocks the first pass freed (they stay cached until reused).
    again = llm.generate(PROMPTS, sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == reference
    assert all(o.num_cached_tokens == 16 * ((len(p) - 1) // 16) for o, p in zip(again, PROMPTS))


def test_chunked_prefill_keeps_outputs(ckpt, reference):
    llm = LLM(ckpt, device="cpu", enable_prefix_caching=False, max_num_batched_tokens=24)
    assert greedy_tokens(llm, PROMPTS) == reference


def test_preemption_under_tiny_kv_budget_finishes_everything(ckpt):
    # 6 blocks of 16 tokens: one sequence of max_model_len=96 fits, the batch does not.
    prompts = random_prompts([20, 30, 9, 40, 25, 14], seed=4)
    unlimited = LLM(ckpt, device="cpu", max_model_len=96, enable_prefix_caching=False)
    reference = greedy_tokens(unlimited, prompts, max_tokens=40)
    for caching in (False, True):
        llm = LLM(ckpt, device="cpu", max_model_len=96, num_kvcache_blocks=6, enable_prefix_caching=caching,
                  max_num_batched_tokens=64)
        assert greedy_tokens(llm, prompts, max_tokens=40) == reference
        assert llm.scheduler.num_preemptions >= 5
        assert llm.scheduler.block_manager.num_free_blocks == 6


def test_outputs_in_prompt_order_and_prompt_forms(llm):
    ids = random_prompts([7], seed=5)[0]
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    a, b, c = llm.generate([ids, {"prompt_token_ids": ids}, "The KV cache grows"], sp, use_tqdm=False)
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert a.prompt_token_ids == ids and c.prompt == "The KV cache grows"
    assert c.prompt_token_ids == llm.tokenizer.encode("The KV cache grows")
    assert isinstance(c.outputs[0].text, str) and c.outputs[0].finish_reason == "length"


def test_seeded_sampling_ignores_batch_composition(llm):
    prompt = random_prompts([11], seed=6)[0]
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=16, seed=1234, ignore_eos=True)
    alone = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
    others = random_prompts([5, 30, 2], seed=7)
    mixed = llm.generate(others[:2] + [prompt] + others[2:],
                         [SamplingParams(temperature=0.7, max_tokens=8)] * 2 + [sp] + [SamplingParams()],
                         use_tqdm=False)
    assert mixed[2].outputs[0].token_ids == alone
    other_seed = llm.generate([prompt], SamplingParams(temperature=1.0, max_tokens=16, seed=99, ignore_eos=True),
                              use_tqdm=False)[0].outputs[0].token_ids
    assert other_seed != alone


def test_stop_tokens_and_length_limits(llm):
    prompt = random_prompts([9], seed=8)[0]
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    stop = free.token_ids[4]
    first = free.token_ids.index(stop)
    stopped = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop]),
                           use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == free.token_ids[:first + 1] and stopped.finish_reason == "stop"
    near_limit = random_prompts([250], seed=9)[0]  # max_model_len is 256
    out = llm.generate([near_limit], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"


BAD_REQUESTS = [
    ([[]], None, "empty prompt"),
    ([list(range(3, 300))], None, "longer than max_model_len"),
    ([[5, 2000]], None, "outside the vocabulary"),
    ([[-1, 5]], None, "outside the vocabulary"),
    ([3.5], None, "a prompt is"),
    ([[5, 6], [7]], [SamplingParams()], "2 prompts"),
]


@pytest.mark.parametrize("prompts,params,message", BAD_REQUESTS)
def test_bad_requests_raise_and_leave_engine_usable(llm, prompts, params, message):
    good = random_prompts([6], seed=10)
    expected = greedy_tokens(llm, good, max_tokens=5)
    with pytest.raises(ValueError, match=message):
        llm.generate(good + prompts if params is None else prompts, params, use_tqdm=False)
    assert llm.scheduler.is_finished()
    assert greedy_tokens(llm, good, max_tokens=5) == expected


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"), (dict(seed=1.5), "seed"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_a_dropped_engine_is_freed_with_its_kv_cache():
    """The exit hook holds a one-rank engine weakly: dropping the engine frees its KV cache (the
    next engine's memory measurement counts on it), no shutdown() needed."""
    llm = LLM(tiny_checkpoint(), device="cpu")
    cache = weakref.ref(llm.model_runner.kv_cache)
    engine = weakref.ref(llm)
    del llm
    gc.collect()
    assert engine() is None and cache() is None


def test_flash_attn_backend_is_wired_like_the_triton_one(monkeypatch):
    """flash-attn is optional and not installed here: stand-ins with its signatures, computed by our
    torch reference, check what the engine passes it (cumulative key lengths, block tables, the causal
    alignment of a chunk after its cached part, the decode layout) against the engine's own backend."""
    import minivllm.layers.attention as attention
    from kernels.paged_attention import paged_attention_ref

    calls = []

    def varlen(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
               causal, block_table):
        assert causal and int(max_seqlen_k) == int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
        calls.append("varlen")
        return paged_attention_ref(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k[1:] - cu_seqlens_k[:-1],
                                   block_table, softmax_scale)

    def with_kvcache(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, causal):
        assert causal and q.dim() == 4 and q.shape[1] == 1
        calls.append("kvcache")
        cu_seqlens_q = torch.arange(q.shape[0] + 1, dtype=torch.int32)
        return paged_attention_ref(q[:, 0], k_cache, v_cache, cu_seqlens_q, cache_seqlens, block_table,
                                   softmax_scale).unsqueeze(1)

    ckpt, prompts = tiny_checkpoint(), random_prompts([40, 300, 300], seed=31)
    # 640 prompt tokens over steps of 512: the last prompt is prefilled in two chunks.
    settings = dict(device="cpu", kvcache_block_size=256, max_num_batched_tokens=512, max_model_len=1024)
    expected = greedy_tokens(LLM(ckpt, **settings), prompts)
    monkeypatch.setattr(attention, "flash_attn_varlen_func", varlen)
    monkeypatch.setattr(attention, "flash_attn_with_kvcache", with_kvcache)
    monkeypatch.setattr(attention, "use_flash_attn", lambda q, k_cache: True)
    assert greedy_tokens(LLM(ckpt, **settings), prompts) == expected
    assert {"varlen", "kvcache"} <= set(calls)
