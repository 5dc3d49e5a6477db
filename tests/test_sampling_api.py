"""vLLM's sampling and output API (n, logprobs, prompt_logprobs, stop strings, min_tokens,
penalties) against transformers on CPU in fp32, and against the engine with the feature off."""
import json
import shutil

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, Qwen3ForCausalLM

import minivllm.engine.model_runner as model_runner
from minivllm import LLM, SamplingParams
from tests.helpers import random_prompts, tiny_checkpoint

GREEDY = dict(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def hf():
    return Qwen3ForCausalLM.from_pretrained(tiny_checkpoint(), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm():
    # Steps of 16 tokens: longer prompts are prefilled (and their prompt logprobs scored) in chunks.
    return LLM(tiny_checkpoint(), device="cpu", max_model_len=256, max_num_batched_tokens=16)


def hf_generate(hf, prompt, max_new_tokens=12, **kwargs):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                          **{"eos_token_id": None, **kwargs})
    return out[0, len(prompt):].tolist()


def hf_log_softmax(hf, tokens):
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].double().log_softmax(-1)


def assert_entry_matches(entry, token, k, ref_row):
    """One token's logprobs dict against the reference distribution: the token, the top k, their
    logprobs and ranks."""
    assert set(entry) == set(ref_row.topk(k).indices.tolist()) | {token}
    for tid, lp in entry.items():
        assert abs(lp.logprob - ref_row[tid].item()) < 1e-4
        assert lp.rank == 1 + int((ref_row > ref_row[tid]).sum())
        assert isinstance(lp.decoded_token, str)


def test_logprobs_and_prompt_logprobs_are_transformers_log_softmax(llm, hf):
    """Raw logprobs (before temperature, top-k and the repetition penalty that change the draw),
    for every generated token and every prompt token, also across prefill chunks."""
    prompts = random_prompts([7, 40], seed=41)
    sp = SamplingParams(temperature=0.8, top_k=20, repetition_penalty=1.3, seed=3, max_tokens=6, ignore_eos=True,
                        logprobs=3, prompt_logprobs=2)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        c = out.outputs[0]
        ref = hf_log_softmax(hf, prompt + c.token_ids)
        assert len(c.logprobs) == len(c.token_ids) == 6
        for t, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
            assert_entry_matches(entry, token, 3, ref[len(prompt) - 1 + t])
        assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs)))
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        for j in range(1, len(prompt)):
            assert_entry_matches(out.prompt_logprobs[j], prompt[j], 2, ref[j - 1])
    # The prompt is cached now, but prompt logprobs need its logits: the cache is passed over.
    again = llm.generate(prompts[1:], sp, use_tqdm=False)[0]
    assert again.num_cached_tokens == 0
    ref = hf_log_softmax(hf, prompts[1])
    for j in range(1, len(prompts[1])):
        assert_entry_matches(again.prompt_logprobs[j], prompts[1][j], 2, ref[j - 1])


def test_logprobs_zero_is_the_sampled_token_and_greedy_ranks_first(llm):
    out = llm.generate(random_prompts([9], seed=42), SamplingParams(logprobs=0, **GREEDY), use_tqdm=False)[0]
    c = out.outputs[0]
    assert [list(e) for e in c.logprobs] == [[t] for t in c.token_ids]
    assert all(e[t].rank == 1 for t, e in zip(c.token_ids, c.logprobs))
    plain = llm.generate(random_prompts([9], seed=42), SamplingParams(**GREEDY), use_tqdm=False)[0].outputs[0]
    assert plain.token_ids == c.token_ids and plain.logprobs is None and plain.cumulative_logprob is None
    assert out.prompt_logprobs is None


def test_greedy_repetition_penalty_matches_transformers(llm, hf):
    # Each request its own penalty in one batch; 1.0 is plain greedy.
    prompts = random_prompts([5, 18, 30, 9], seed=43)
    penalties = [1.3, 0.7, 2.0, 1.0]
    outs = llm.generate(prompts, [SamplingParams(repetition_penalty=p, **GREEDY) for p in penalties], use_tqdm=False)
    for prompt, penalty, out in zip(prompts, penalties, outs):
        assert out.outputs[0].token_ids == hf_generate(hf, prompt, repetition_penalty=penalty)


class OpenAIPenalties(LogitsProcessor):
    """The reference: presence and frequency penalties over the generated tokens, one row."""

    def __init__(self, prompt_len, presence, frequency):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        for token in set(input_ids[0, self.prompt_len:].tolist()):
            count = int((input_ids[0, self.prompt_len:] == token).sum())
            scores[0, token] -= self.presence + self.frequency * count
        return scores


def test_greedy_presence_and_frequency_penalties_match_a_reference(llm, hf):
    prompts = random_prompts([6, 25], seed=44)
    # Large penalties, so that they change the greedy path (checked against the plain run).
    settings = [dict(presence_penalty=2.0), dict(frequency_penalty=1.5, presence_penalty=-0.5, repetition_penalty=1.1)]
    outs = llm.generate(prompts * 2, [SamplingParams(**s, **GREEDY) for s in settings for _ in prompts],
                        use_tqdm=False)
    for i, out in enumerate(outs):
        prompt, s = prompts[i % 2], settings[i // 2]
        processor = OpenAIPenalties(len(prompt), s.get("presence_penalty", 0), s.get("frequency_penalty", 0))
        expected = hf_generate(hf, prompt, repetition_penalty=s.get("repetition_penalty", 1.0),
                               logits_processor=LogitsProcessorList([processor]))
        assert out.outputs[0].token_ids == expected
    assert [o.outputs[0].token_ids for o in outs[:2]] != [hf_generate(hf, p) for p in prompts]


@pytest.mark.parametrize("as_eos", [False, True], ids=["stop_token_ids", "eos"])
def test_min_tokens_keeps_stop_tokens_out_as_transformers_min_new_tokens(tmp_path, hf, as_eos):
    prompt = random_prompts([8], seed=45)[0]
    free = hf_generate(hf, prompt)
    stop = free[1]
    if as_eos:  # the checkpoint's EOS becomes a token that greedy decoding meets early
        ckpt = shutil.copytree(tiny_checkpoint(), tmp_path / "ckpt")
        (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": stop}))
        llm, extra = LLM(str(ckpt), device="cpu"), {}
    else:
        llm, extra = LLM(tiny_checkpoint(), device="cpu"), dict(stop_token_ids=[stop])
    for min_tokens in (0, 5):
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, min_tokens=min_tokens, **extra),
                           use_tqdm=False)[0].outputs[0]
        expected = hf_generate(hf, prompt, min_new_tokens=min_tokens, eos_token_id=stop)
        assert out.token_ids == expected and stop not in out.token_ids[:-1]
        assert len(out.token_ids) > min_tokens
        if min_tokens == 0:
            assert len(out.token_ids) == free.index(stop) + 1
        if stop in out.token_ids:
            assert out.finish_reason == "stop" and out.stop_reason == (None if as_eos else stop)
        else:
            assert out.finish_reason == "length" and out.stop_reason is None


def test_stop_strings_cut_the_text(llm):
    prompt = "The KV cache"
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    text, ids = free.text, free.token_ids
    tokenizer = llm.tokenizer
    stop = text[6:9]
    at = text.find(stop)
    # The token that completes the first occurrence ends the output.
    k = next(k for k in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:k], skip_special_tokens=True))
    for include in (False, True):
        sp = SamplingParams(temperature=0, max_tokens=24, stop=["never in this text \x00", stop],
                            include_stop_str_in_output=include)
        out = llm.generate(prompt, sp, use_tqdm=False)[0].outputs[0]
        assert out.text == text[:at + len(stop) if include else at]
        assert out.token_ids == ids[:k] and out.finish_reason == "stop" and out.stop_reason == stop
    # With min_tokens past that point, the early occurrence stops nothing (as in vLLM).
    late = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, stop=stop, min_tokens=k),
                        use_tqdm=False)[0].outputs[0]
    assert len(late.token_ids) > k and late.token_ids == ids[:len(late.token_ids)]
    assert text.startswith(late.text) and len(late.text) >= at + len(stop)


def test_stop_token_text_is_left_out_unless_asked(llm):
    prompt = random_prompts([10], seed=46)[0]
    free = llm.generate([prompt], SamplingParams(**GREEDY), use_tqdm=False)[0].outputs[0]
    stop = next(t for t in free.token_ids[2:] if t > 2)  # an ordinary (not special) token
    k = free.token_ids.index(stop) + 1
    for include in (False, True):
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop],
                                                    include_stop_str_in_output=include), use_tqdm=False)[0].outputs[0]
        shown = free.token_ids[:k] if include else free.token_ids[:k - 1]
        assert out.token_ids == free.token_ids[:k] and out.stop_reason == stop
        assert out.text == llm.tokenizer.decode(shown, skip_special_tokens=True)


def test_n_seeded_samples_are_the_same_in_any_batch(llm):
    prompt = random_prompts([13], seed=47)[0]
    sp = SamplingParams(n=4, temperature=1.0, top_p=0.95, seed=2024, max_tokens=10, ignore_eos=True)
    alone = llm.generate([prompt], sp, use_tqdm=False)[0]
    assert [c.index for c in alone.outputs] == [0, 1, 2, 3]
    samples = [c.token_ids for c in alone.outputs]
    assert len({tuple(s) for s in samples}) > 1
    others = random_prompts([4, 30], seed=48)
    mixed = llm.generate([others[0], prompt, others[1]],
                         [SamplingParams(n=3, max_tokens=5), sp, SamplingParams(temperature=0.5, seed=7, max_tokens=7)],
                         use_tqdm=False)
    assert [c.token_ids for c in mixed[1].outputs] == samples
    assert len(mixed[0].outputs) == 3 and len(mixed[2].outputs) == 1
    # The first of n samples is the n=1 request with the same seed.
    single = SamplingParams(temperature=1.0, top_p=0.95, seed=2024, max_tokens=10, ignore_eos=True)
    assert llm.generate([prompt], single, use_tqdm=False)[0].outputs[0].token_ids == samples[0]


def test_what_is_not_asked_for_is_not_computed(llm, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("computed for a request that did not ask")

    prompts = random_prompts([5, 20], seed=49)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(**GREEDY), use_tqdm=False)]
    for name in ("token_logprobs", "apply_penalties", "ban_tokens"):
        monkeypatch.setattr(model_runner, name, must_not_run)
    outs = llm.generate(prompts, [SamplingParams(**GREEDY), SamplingParams(temperature=0.7, seed=1, max_tokens=8)],
                        use_tqdm=False)
    assert outs[0].outputs[0].token_ids == expected[0]
    with pytest.raises(AssertionError, match="did not ask"):
        llm.generate(prompts, SamplingParams(logprobs=1, **GREEDY), use_tqdm=False)
    assert llm.scheduler.is_finished()


@pytest.mark.gpu
def test_cuda_graph_decode_keeps_logprobs_and_penalties():
    """Penalties and logprobs run after the replayed graph: the same results as eager steps."""
    prompts = random_prompts([5, 40, 17], seed=50)
    sp = SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, min_tokens=4, logprobs=2, prompt_logprobs=1,
                        **GREEDY)
    results = []
    for eager in (True, False):
        with LLM(tiny_checkpoint(), device="cuda", dtype="float32", enforce_eager=eager, kvcache_block_size=16,
                 max_num_seqs=8, max_model_len=256, gpu_memory_utilization=0.3) as llm:
            outs = llm.generate(prompts, sp, use_tqdm=False)
            results.append([(o.outputs[0].token_ids, o.outputs[0].logprobs, o.prompt_logprobs) for o in outs])
    for (tokens, logprobs, prompt_logprobs), (g_tokens, g_logprobs, g_prompt) in zip(*results):
        assert tokens == g_tokens
        for a, b in zip(logprobs + prompt_logprobs[1:], g_logprobs + g_prompt[1:]):
            assert a.keys() == b.keys()
            assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)


def test_logits_processors_see_the_output_so_far_and_change_the_draw(llm):
    # vLLM's f(output_token_ids, logits): a processor that allows one token forces it, whatever the
    # temperature, and sees the tokens generated before each call; a plain request beside it keeps its tokens.
    calls = []

    def only_seven(output_ids, logits):
        calls.append(list(output_ids))
        forced = torch.full_like(logits, float("-inf"))
        forced[7] = 0.0
        return forced

    prompts = random_prompts([11, 6], seed=21)
    plain = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    alone = llm.generate([prompts[1]], plain, use_tqdm=False)[0].outputs[0].token_ids
    forced = SamplingParams(temperature=0.8, seed=1, max_tokens=5, ignore_eos=True, logits_processors=[only_seven])
    outs = llm.generate(prompts, [forced, plain], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == [7] * 5 and outs[1].outputs[0].token_ids == alone
    assert calls == [[7] * i for i in range(5)]


def test_a_bad_logits_processor_is_a_clear_error_and_the_engine_stays_usable(llm):
    with pytest.raises(ValueError, match="logits_processors"):
        SamplingParams(logits_processors=[3])
    bad = SamplingParams(max_tokens=3, logits_processors=[lambda ids, logits: logits[:10]])
    with pytest.raises(ValueError, match="logits processor"):
        llm.generate(random_prompts([5], seed=2), bad, use_tqdm=False)
    ok = llm.generate(random_prompts([5], seed=2), SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(ok[0].outputs[0].token_ids) == 3
