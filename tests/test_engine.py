"""Engine features against the engine with the feature off, and bad input."""
import gc
import math
import weakref

import pytest
import torch

from minivllm import LLM, SamplingParams
from tests.helpers import greedy_tokens, random_prompts, run_in_threads, tiny_checkpoint

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
    ([[True, 5]], None, "a prompt is"),  # bool is an int in Python, not a token id
    ([[5, 6], [7]], [SamplingParams()], "2 prompts"),
    ([[5, 6], [7]], [], "0 sampling params for 2 prompts"),  # not the defaults
    ([[5, 6]], ["greedy"], "sampling_params must be SamplingParams"),
    ([[5, 6]], SamplingParams(stop_token_ids=[1024]), "stop_token_ids"),
    ([[5, 6]], SamplingParams(logprobs=1025), "logprobs"),
    ([[5, 6]], SamplingParams(prompt_logprobs=1025), "prompt_logprobs"),
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
    (dict(temperature=-0.1), "temperature"), (dict(temperature=math.inf), "temperature"),
    (dict(temperature=1e39), "temperature"),
    (dict(temperature=math.nan), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_p=math.nan), "top_p"), (dict(top_k=-2), "top_k"), (dict(top_k=1.5), "top_k"),
    (dict(top_k=True), "top_k"), (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=True), "max_tokens"),
    (dict(seed=1.5), "seed"), (dict(seed=2**64), "seed"), (dict(seed=-2**63 - 1), "seed"), (dict(seed=True), "seed"),
    (dict(n=0), "n"), (dict(n=True), "n"), (dict(logprobs=-1), "logprobs"),
    (dict(prompt_logprobs=-1), "prompt_logprobs"),
    (dict(min_tokens=-1), "min_tokens"), (dict(min_tokens=11, max_tokens=10), "min_tokens"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(repetition_penalty=math.inf), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(frequency_penalty=math.nan), "frequency_penalty"), (dict(stop=""), "empty string"),
    (dict(stop=["a", ""]), "empty string"), (dict(stop=[3]), "stop"), (dict(stop=5), "stop"),
    (dict(stop_token_ids="abc"), "stop_token_ids"), (dict(stop_token_ids=5), "stop_token_ids"),
    (dict(stop_token_ids=[True]), r"stop_token_ids\[0\]"), (dict(stop_token_ids=[4, -1]), r"stop_token_ids\[1\]"),
    (dict(ignore_eos="no"), "ignore_eos"), (dict(include_stop_str_in_output=1), "include_stop_str_in_output"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_take_vllm_spellings():
    import numpy as np
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []
    assert SamplingParams(stop="###").stop == ["###"] and SamplingParams(stop=None).stop == []
    sp = SamplingParams(seed=np.int64(7), top_k=np.int32(5), temperature=np.float32(0.5))
    assert (sp.seed, sp.top_k, sp.temperature) == (7, 5, 0.5) and type(sp.seed) is int


def sampled_tokens(llm, prompt, **kwargs):
    sp = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, **kwargs)
    return llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids


def test_seeds_and_top_k_at_the_limits_of_64_bits(llm):
    prompt = random_prompts([8], seed=61)[0]
    # Every bit of the seed counts; seeds are taken modulo 2^64 (as torch.manual_seed does).
    assert sampled_tokens(llm, prompt, seed=5) != sampled_tokens(llm, prompt, seed=5 + 2**32)
    assert sampled_tokens(llm, prompt, seed=2**63) == sampled_tokens(llm, prompt, seed=-2**63)
    assert sampled_tokens(llm, prompt, seed=2**64 - 1) == sampled_tokens(llm, prompt, seed=-1)
    # A top_k above the vocabulary keeps all of it.
    assert sampled_tokens(llm, prompt, seed=9, top_k=2**63) == sampled_tokens(llm, prompt, seed=9)
    assert llm.scheduler.is_finished()


def test_a_rejected_batch_draws_no_seeds(ckpt):
    """Unseeded requests draw from the engine's seed: a call refused before it ran must not
    have drawn, or later sampling would differ from a fresh engine's."""
    fresh, used = (LLM(ckpt, device="cpu", max_model_len=256, seed=11) for _ in range(2))
    prompt = random_prompts([10], seed=62)[0]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        used.generate([prompt, prompt, [5, 5000]], SamplingParams(n=2), use_tqdm=False)
    assert sampled_tokens(used, prompt) == sampled_tokens(fresh, prompt)


def test_concurrent_generate_calls_take_turns(llm):
    """Threads sharing one engine each get what they would get alone (the engine runs one call at
    a time), and the engine is left clean."""
    prompts = [random_prompts([5 + 9 * i, 3 + i], seed=63 + i) for i in range(4)]
    expected = [greedy_tokens(llm, p, max_tokens=8) for p in prompts]
    seeded = sampled_tokens(llm, prompts[0][0], seed=77)
    results = [[] for _ in prompts]

    def work(i):
        for _ in range(3):
            results[i].append((greedy_tokens(llm, prompts[i], max_tokens=8),
                               sampled_tokens(llm, prompts[0][0], seed=77)))

    run_in_threads(work, len(prompts))
    assert all(r == [(expected[i], seeded)] * 3 for i, r in enumerate(results))
    assert llm.scheduler.is_finished()
    assert llm.scheduler.block_manager.num_free_blocks == len(llm.scheduler.block_manager.blocks)


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("where", ["postprocess", "between steps"])
def test_an_error_after_the_model_step_leaves_the_engine_usable(llm, monkeypatch, where):
    """An exception between the model step and the scheduler's bookkeeping, or between two steps
    (e.g. Ctrl-C), must not wedge the engine nor leak its KV blocks."""
    good = random_prompts([6, 40], seed=64)
    expected = greedy_tokens(llm, good)
    if where == "postprocess":
        original = llm.scheduler.postprocess

        def postprocess(*args):
            original(*args)
            raise Interrupted("injected")
        monkeypatch.setattr(llm.scheduler, "postprocess", postprocess)
    else:
        import minivllm.llm

        class Bar(minivllm.llm.tqdm):
            def update(self, n=1):
                raise Interrupted("injected")
        monkeypatch.setattr(minivllm.llm, "tqdm", Bar)
    with pytest.raises(Interrupted):
        greedy_tokens(llm, good)
    monkeypatch.undo()
    bm = llm.scheduler.block_manager
    assert llm.scheduler.is_finished() and bm.num_free_blocks == len(bm.blocks)
    for _ in range(2):
        assert greedy_tokens(llm, good) == expected


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


def test_record_logits_gets_each_sampled_steps_logits(llm):
    prompts = random_prompts([5, 19], seed=31)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with llm.record_logits() as logits:
        outs = llm.generate(prompts, params, use_tqdm=False)
    assert [t.shape for t in logits] == [(2, 1024)] * 4
    for step, step_logits in enumerate(logits):  # greedy: each step's token is its row's argmax
        assert step_logits.argmax(-1).tolist() == [o.outputs[0].token_ids[step] for o in outs]
    llm.generate(prompts, params, use_tqdm=False)
    assert len(logits) == 4  # nothing recorded after the block


def test_add_request_then_step_runs_it_as_generate_does(llm):
    prompt = random_prompts([23], seed=32)[0]
    seqs = llm.add_request(prompt, SamplingParams(n=2, temperature=0, max_tokens=5, ignore_eos=True))
    assert len(seqs) == 2
    while not llm.scheduler.is_finished():
        llm.step()
    expected = greedy_tokens(llm, [prompt], max_tokens=5)[0]
    assert [seq.completion_token_ids for seq in seqs] == [expected, expected]
    with pytest.raises(ValueError, match="5000"):  # checked as generate checks it: an id past the vocabulary
        llm.add_request([5000], SamplingParams())
    assert llm.scheduler.is_finished()


def test_eager_turns_graph_replays_off_on_every_rank_and_back(llm):
    assert not llm.cuda_graphs  # none captured on CPU
    prompts = random_prompts([9], seed=33)
    reference = greedy_tokens(llm, prompts)
    with llm.eager():
        assert not llm.model_runner.cuda_graphs_enabled
        assert greedy_tokens(llm, prompts) == reference
    assert llm.model_runner.cuda_graphs_enabled


def test_the_decode_steps_own_sampler_gives_the_samplers_tokens(llm):
    # A decode step samples inside its forward (its CUDA graph on a GPU) from packed int32 inputs: for
    # greedy and seeded temperature rows, extreme 64-bit seeds included, the same tokens as Sampler on
    # the same logits, and the packed step metadata is what prepare() builds for the same sequences.
    from minivllm.engine.model_runner import unpack_decode
    from minivllm.layers.sampler import sample_seed
    runner = llm.model_runner
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, seed=-2**63),
              SamplingParams(temperature=1.3, seed=2**63 - 1), SamplingParams(temperature=1e-6, seed=12345)]
    seqs = [s for p, prompt in zip(params, random_prompts([5, 17, 33, 2], seed=9))
            for s in llm.add_request(prompt, p)]
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in seqs):
        llm.step()
    assert all(s.plain_sampling for s in seqs) and {s.seed for s in seqs} >= {sample_seed(-2**63, 0)}
    width = max(len(s.block_table) for s in seqs) + 2  # wider than needed: the padding columns are zeros
    packed = runner.pack_decode(seqs, 6, width).copy()  # two padding rows
    ids, positions, ctx = runner.prepare(seqs, [1] * len(seqs), False)
    fields = {k: v.tolist() for k, v in unpack_decode(torch.from_numpy(packed), 6, width).items()}
    assert fields["input_ids"] == ids + [0, 0] and fields["positions"] == positions + [0, 0]
    assert fields["slot_mapping"] == ctx["slot_mapping"] + [-1, -1]
    assert fields["seqlens_k"] == ctx["seqlens_k"] + [1, 1]
    assert [row[:len(t)] for row, t in zip(fields["block_tables"], ctx["block_tables"])] == ctx["block_tables"]
    logits, tokens = runner.decode(packed, len(seqs), width, replay=False)
    expected = runner.sampler(logits.clone(), *runner.sampling_inputs(seqs))
    assert tokens.tolist() == expected.tolist()
    llm.abort_all()


def test_decode_steps_resample_only_when_a_sequence_asks_more_of_its_logits(llm):
    # top-k or logprobs in the batch: the step's tokens come from Sampler over the logits (with the
    # logprobs); the batch's plain rows get the same tokens as when they run alone.
    prompts = random_prompts([6, 11], seed=10)
    plain = SamplingParams(temperature=0.9, seed=3, max_tokens=6, ignore_eos=True)
    alone = llm.generate([prompts[0]], plain, use_tqdm=False)[0].outputs[0].token_ids
    mixed = llm.generate(prompts, [plain, SamplingParams(temperature=0.9, top_k=3, logprobs=2, seed=4, max_tokens=6,
                                                         ignore_eos=True)], use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == alone
    assert len(mixed[1].outputs[0].logprobs) == 6


def test_memory_stats_count_the_weights_and_the_kv_blocks_in_use(ckpt):
    # Weights as the cost model counts them (plus the RoPE table buffers), the pool as allocated, and the
    # peak of blocks held at once: three prompts of 40 tokens + 8 outputs need 3 blocks of 16 each.
    from minivllm.costs import weight_bytes
    llm = LLM(ckpt, device="cpu", max_model_len=128, enable_prefix_caching=False)
    stats = llm.memory_stats()
    runner, cfg = llm.model_runner, llm.config.hf_config
    buffers = sum(b.numel() * b.element_size() for b in runner.model.buffers())
    assert stats["weights_bytes"] == weight_bytes(cfg, llm.config.torch_dtype.itemsize) + buffers
    assert stats["kv_pool_bytes"] == llm.config.num_kvcache_blocks * runner.kv_bytes_per_block()
    assert stats["kv_peak_in_use_bytes"] == 0 and stats["activation_peak_bytes"] is None  # measured on GPUs only
    llm.generate(random_prompts([40] * 3, seed=11), SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert llm.memory_stats()["kv_peak_in_use_bytes"] == 3 * 3 * runner.kv_bytes_per_block()


def outputs_of(outs):
    return [[(c.token_ids, c.finish_reason, c.stop_reason, c.text) for c in o.outputs] for o in outs]


@pytest.mark.parametrize("setting", ["plain", "eos-and-stops", "tiny-kv"])
def test_overlapped_decode_steps_give_the_synchronous_engines_outputs(ckpt, setting, monkeypatch):
    # generate() launches a decode step before taking the tokens of the one in flight: whatever ends a
    # sequence (length, EOS, a stop token or string), wherever preemption strikes, the outputs are the
    # synchronous engine's; and the overlap did happen.
    prompts = random_prompts([7, 30, 12, 45, 3], seed=12)
    kwargs = dict(device="cpu", max_model_len=128)
    if setting == "tiny-kv":
        kwargs.update(max_model_len=64, num_kvcache_blocks=4, max_num_batched_tokens=64)
    params = [SamplingParams(temperature=t, seed=s, max_tokens=m, ignore_eos=setting != "eos-and-stops")
              for t, s, m in [(0, None, 20), (0.8, 1, 9), (1.2, 2, 33), (0, None, 1), (0.5, 3, 15)]]
    sync = LLM(ckpt, async_scheduling=False, **kwargs)
    if setting == "eos-and-stops":
        # The synchronous engine's own tokens, early in each output, become EOS, stop tokens and strings.
        firsts = [o.outputs[0].token_ids for o in sync.generate(prompts, params, use_tqdm=False)]
        sync.config.hf_config.eos_token_ids.append(firsts[0][5])
        sync.stop_checker.eos_token_ids.add(firsts[0][5])
        params[1] = SamplingParams(temperature=0.8, seed=1, max_tokens=9, stop_token_ids=[firsts[1][3]])
        params[2] = SamplingParams(temperature=1.2, seed=2, max_tokens=33,
                                   stop=[sync.tokenizer.decode(firsts[2][4:6])])
    expected = outputs_of(sync.generate(prompts, params, use_tqdm=False))
    llm = LLM(ckpt, **kwargs)
    assert llm.overlap
    if setting == "eos-and-stops":
        llm.config.hf_config.eos_token_ids.append(firsts[0][5])
        llm.stop_checker.eos_token_ids.add(firsts[0][5])
    launches = []
    launch = llm.model_runner.launch_decode
    monkeypatch.setattr(llm.model_runner, "launch_decode", lambda seqs, continuing=False: (
        launches.append(continuing), launch(seqs, continuing))[1])
    assert outputs_of(llm.generate(prompts, params, use_tqdm=False)) == expected
    assert launches.count(True) > 10 and llm.pending is None
    assert llm.scheduler.block_manager.num_free_blocks == llm.config.num_kvcache_blocks
    if setting == "tiny-kv":
        assert llm.scheduler.num_preemptions > 0
    assert [c[0] for o in outputs_of(llm.generate(prompts, params, use_tqdm=False)) for c in o] == \
        [c[0] for o in expected for c in o]  # and again, on the same engine


def test_mixed_steps_keep_the_outputs_and_let_decodes_ride_along(ckpt, monkeypatch):
    # A small token budget spreads the prompts over several prefill steps while the first ones decode: with
    # mixed steps their decode tokens ride in those prefill steps, and every output is the one the
    # scheduler without mixing gives (greedy, and seeded sampling).
    prompts = random_prompts([30, 25, 40, 12, 33, 8], seed=13)
    params = [SamplingParams(temperature=t, seed=i, max_tokens=10 + i, ignore_eos=True)
              for i, t in enumerate([0, 0.7, 0, 1.1, 0, 0.4])]
    kwargs = dict(device="cpu", max_model_len=128, max_num_batched_tokens=32)
    expected = outputs_of(LLM(ckpt, mixed_steps=False, **kwargs).generate(prompts, params, use_tqdm=False))
    llm = LLM(ckpt, **kwargs)
    steps = []
    run = llm.model_runner.run
    monkeypatch.setattr(llm.model_runner, "run", lambda seqs, num_new, is_prefill: (
        steps.append((list(num_new), is_prefill)), run(seqs, num_new, is_prefill))[1])
    assert outputs_of(llm.generate(prompts, params, use_tqdm=False)) == expected
    mixed = [n for n, prefill in steps if prefill and 1 in n and max(n) > 1]
    assert mixed and all(sum(n) <= 32 for n, _ in steps)
    assert llm.scheduler.block_manager.num_free_blocks == llm.config.num_kvcache_blocks


def test_prefill_graphs_default_to_the_gpu_only(ckpt):
    # None (the default) is on where the padded steps replay graphs, off on CPU and under enforce_eager.
    assert LLM(ckpt, device="cpu").config.prefill_graphs is False
    assert LLM(ckpt, device="cpu", prefill_graphs=True).config.prefill_graphs is True
    with pytest.raises(ValueError, match="prefill_graphs"):
        LLM(ckpt, device="cpu", prefill_graphs="yes")


@pytest.mark.parametrize("fusion", ["off", "full"])
def test_padded_prefill_steps_give_the_unpadded_engines_outputs(ckpt, fusion, monkeypatch):
    # Config.prefill_graphs: small prefill steps run padded to PREFILL_GRAPH_TOKENS with PREFILL_GRAPH_SEQS
    # sequences (on a GPU the padded step is a graph replay; here the same computation runs eagerly). Padding
    # tokens store no KV and padding sequences attend to nothing: every output is the unpadded engine's,
    # with chunked prefill over a cached prefix, steps of too many sequences (run as they are) and
    # seeded sampling.
    from minivllm.engine import model_runner as mr
    shared = random_prompts([40], seed=21)[0]
    prompts = [shared + p for p in random_prompts([3, 9], seed=22)] + random_prompts([17, 1, 60, 5], seed=23)
    params = [SamplingParams(temperature=t, seed=i, max_tokens=6 + i, ignore_eos=True)
              for i, t in enumerate([0, 0.9, 0, 0, 1.3, 0])]
    kwargs = dict(device="cpu", max_model_len=160, max_num_batched_tokens=48, fusion=fusion)
    expected = [outputs_of(LLM(ckpt, **kwargs).generate(p, q, use_tqdm=False))
                for p, q in ((prompts[:1], params[:1]), (prompts, params))]
    llm = LLM(ckpt, prefill_graphs=True, **kwargs)
    padded = []
    pad = llm.model_runner.prefill_padded
    monkeypatch.setattr(llm.model_runner, "prefill_padded", lambda packed, tokens: (
        padded.append(tokens), pad(packed, tokens))[1])
    assert outputs_of(llm.generate(prompts[:1], params[:1], use_tqdm=False)) == expected[0]
    assert outputs_of(llm.generate(prompts, params, use_tqdm=False)) == expected[1]
    assert padded and set(padded) <= set(mr.PREFILL_GRAPH_TOKENS)
    assert llm.scheduler.block_manager.num_free_blocks == llm.config.num_kvcache_blocks
    monkeypatch.setattr(mr, "PREFILL_GRAPH_SEQS", 1)  # every multi-sequence step now runs unpadded
    assert llm.model_runner.padded_prefill_tokens(10, 2) is None and llm.model_runner.padded_prefill_tokens(10, 1) == 16
    assert llm.model_runner.padded_prefill_tokens(mr.PREFILL_GRAPH_TOKENS[-1] + 1, 1) is None


def test_kv_cache_usage_counts_the_blocks_the_sequences_hold(ckpt):
    # Two running requests sharing a cached first block: it is held twice, their own blocks once each.
    llm = LLM(ckpt, device="cpu", max_model_len=128)
    shared = random_prompts([16], seed=14)[0]
    first = llm.add_request(shared + [5, 6], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    llm.step()
    second = llm.add_request(shared + [7, 8, 9], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    llm.step()
    usage = llm.kv_cache_usage()
    assert first.block_table[0] == second.block_table[0] and usage["ref_counts"][first.block_table[0]] == 2
    assert [usage["ref_counts"][b] for b in first.block_table[1:] + second.block_table[1:]] == [1, 1]
    held = len(set(first.block_table + second.block_table))
    assert usage["num_blocks"] == llm.config.num_kvcache_blocks
    assert usage["num_free_blocks"] == usage["num_blocks"] - held and sum(usage["ref_counts"]) == held + 1
    llm.abort_all()


def test_bench_engines_cover_every_setting_and_rows_name_them():
    # --async-scheduling on,off and --prefill-graphs off,on (and --pdl): one engine per setting, in order, each row
    # naming its own.
    import argparse

    from minivllm import bench
    args = argparse.Namespace(model=tiny_checkpoint(), model_name="tiny", tensor_parallel_size=[1], fusion=["off"],
                              pdl=[False], async_scheduling=[True, False], prefill_graphs=[False, True],
                              enforce_eager=False)
    rows = [bench.base_row(llm, args, "decode_latency") for llm in bench.engines(args, device="cpu")]
    settings = [(r["async_scheduling"], r["prefill_graphs"], r["pdl"], r["fusion"]) for r in rows]
    assert settings == [(True, False, False, "off"), (True, True, False, "off"), (False, False, False, "off"),
                        (False, True, False, "off")]
