"""Tensor parallelism on CPU (gloo): two ranks give the same tokens as one, and the worker
processes never outlive the engine, whatever way it ends."""
import gc
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from minivllm import LLM, SamplingParams, heartbeat
from tests.helpers import greedy_tokens, random_prompts, run_in_threads, tiny_checkpoint
from tests.test_gpu_engine import qwen3_06b, step_logits  # noqa: F401 (a fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Shared 40-token prefix (block size 16) for prefix-cache hits, and enough output under a
# 6-block KV cache that sequences get preempted.
BASE = random_prompts([40], seed=31)[0]
PROMPTS = [BASE + tail for tail in random_prompts([3, 9, 20], seed=32)] + random_prompts([33, 5, 50], seed=33)
TIGHT_KV = dict(device="cpu", max_model_len=96, num_kvcache_blocks=6, max_num_batched_tokens=64)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # dead, not yet reaped by its new parent
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids, seconds=15.0) -> bool:
    deadline = time.monotonic() + seconds
    while not all(gone(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def generate(llm, prompts, max_tokens=40):
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return llm.generate(prompts, sp, use_tqdm=False)


# Samples, penalties, min_tokens and logprobs of the prompt and the output: what rank 0 adds after the
# forward, and the extra logit rows that every rank computes for the prompt logprobs.
EXTRAS = SamplingParams(n=2, temperature=0.8, seed=5, max_tokens=8, ignore_eos=True, repetition_penalty=1.2,
                        min_tokens=4, logprobs=2, prompt_logprobs=1)


def logprob_table(outs):
    """(token id, logprob) of every entry of the prompt and output logprobs, in order."""
    dicts = [d for o in outs for d in o.prompt_logprobs[1:] + [d for c in o.outputs for d in c.logprobs]]
    return [(t, lp.logprob) for d in dicts for t, lp in d.items()]


# Vocabulary 1027 leaves the second rank's slice of the tied embedding/lm_head one row of padding.
@pytest.mark.parametrize("overrides,fusion", [({}, "off"), (dict(tie_word_embeddings=True, vocab_size=1027),
                                                            "norm_linear")])
def test_tp2_matches_tp1_with_prefix_caching_and_preemption(overrides, fusion):
    ckpt = tiny_checkpoint(**overrides)
    with LLM(ckpt, fusion=fusion, **TIGHT_KV) as one:
        expected, preemptions = generate(one, PROMPTS), one.scheduler.num_preemptions
        expected_extras = one.generate(PROMPTS[:3], EXTRAS, use_tqdm=False)
    with LLM(ckpt, fusion=fusion, tensor_parallel_size=2, **TIGHT_KV) as two:
        pids = [w.pid for w in two.workers]
        assert len(pids) == 1 and not gone(pids[0])
        got = generate(two, PROMPTS)
        assert two.scheduler.num_preemptions == preemptions > 0
        assert two.scheduler.block_manager.num_free_blocks == 6
        got_extras = two.generate(PROMPTS[:3], EXTRAS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    assert ([[c.token_ids for c in o.outputs] for o in got_extras]
            == [[c.token_ids for c in o.outputs] for o in expected_extras])
    table, expected_table = logprob_table(got_extras), logprob_table(expected_extras)
    assert [t for t, _ in table] == [t for t, _ in expected_table]
    assert max(abs(a - b) for (_, a), (_, b) in zip(table, expected_table)) < 1e-4
    assert any(o.num_cached_tokens > 0 for o in got)
    assert wait_gone(pids, seconds=0) and not multiprocessing.active_children()


@pytest.mark.parametrize("preset,overrides", [("llama-tiny", dict(attention_bias=True)),  # o_proj's bias: rank 0 only
                                              ("mistral-tiny", dict(tie_word_embeddings=True))])
def test_tp2_matches_tp1_for_llama_and_mistral(preset, overrides):
    ckpt = tiny_checkpoint(preset, **overrides)
    with LLM(ckpt, device="cpu") as one:
        expected = greedy_tokens(one, PROMPTS[:4])
    with LLM(ckpt, device="cpu", tensor_parallel_size=2) as two:
        assert greedy_tokens(two, PROMPTS[:4]) == expected


def test_heads_that_do_not_divide_raise_before_any_rank_starts():
    ckpt = tiny_checkpoint(num_attention_heads=6, num_key_value_heads=3)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 must divide .*heads \(6\).*KV heads \(3\)"):
        LLM(ckpt, device="cpu", tensor_parallel_size=2)
    assert not multiprocessing.active_children()
    LLM(ckpt, device="cpu", tensor_parallel_size=1).shutdown()  # the config itself is fine


@pytest.fixture
def tp2():
    llm = LLM(tiny_checkpoint(), device="cpu", max_model_len=128, tensor_parallel_size=2)
    yield llm
    llm.shutdown()


def test_bad_input_leaves_the_engine_and_its_workers_usable(tp2):
    good = random_prompts([6, 17], seed=34)
    expected = [o.outputs[0].token_ids for o in generate(tp2, good, max_tokens=5)]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(tp2, good + [[5, 5000]])
    assert tp2.scheduler.is_finished() and not gone(tp2.workers[0].pid)
    assert [o.outputs[0].token_ids for o in generate(tp2, good, max_tokens=5)] == expected


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failed_step_stops_the_workers(tp2, error):
    pid = tp2.workers[0].pid

    def fail(*args):  # the worker is then waiting for rank 0 to send its logits
        raise error("injected")

    tp2.model_runner.model.lm_head.forward = fail
    with pytest.raises(error, match="injected"):
        generate(tp2, random_prompts([9], seed=35))
    assert wait_gone([pid], seconds=0) and not tp2.workers
    with pytest.raises(RuntimeError, match="shut down"):
        generate(tp2, random_prompts([9], seed=35))
    # The process group is gone with the engine: a new one starts cleanly.
    LLM(tiny_checkpoint(), device="cpu", max_model_len=128, tensor_parallel_size=2).shutdown()


def test_a_dead_worker_makes_generate_raise_not_hang(tp2):
    os.kill(tp2.workers[0].pid, signal.SIGKILL)
    tp2.workers[0].join()
    with pytest.raises(RuntimeError, match="minivllm-tp-rank1 .* exited"):
        generate(tp2, random_prompts([9], seed=36))
    assert not tp2.workers


@pytest.mark.parametrize("when", ["in a step", "while idle"])
def test_a_stopped_worker_is_found_within_seconds(tp2, when):
    """A worker that stops (SIGSTOP) would keep rank 0 in a collective until its 10-minute
    timeout: its heartbeat stops, and the watchdog ends the wait within seconds."""
    pid = tp2.workers[0].pid
    os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    try:
        if when == "while idle":  # the watchdog fires with no step running; the next call says why
            while tp2.watchdog.failure is None and time.monotonic() - start < 30:
                time.sleep(0.1)
        with pytest.raises(RuntimeError, match=r"minivllm-tp-rank1 .* no heartbeat .*stopped or frozen"):
            generate(tp2, random_prompts([9], seed=36))
        assert time.monotonic() - start < heartbeat.TIMEOUT_SECONDS + 10
    finally:
        if not gone(pid):
            os.kill(pid, signal.SIGCONT)
    assert wait_gone([pid], seconds=5) and not tp2.workers
    with pytest.raises(RuntimeError, match="shut down .*no heartbeat"):
        generate(tp2, random_prompts([9], seed=36))


def test_concurrent_calls_on_a_tensor_parallel_engine_take_turns(tp2):
    prompts = [random_prompts([4 + 11 * i], seed=40 + i) for i in range(3)]
    expected = [[o.outputs[0].token_ids for o in generate(tp2, p, max_tokens=6)] for p in prompts]
    results = [None] * 3

    def work(i):
        results[i] = [[o.outputs[0].token_ids for o in generate(tp2, prompts[i], max_tokens=6)] for _ in range(2)]

    run_in_threads(work, len(prompts))
    assert results == [[e, e] for e in expected]
    assert not gone(tp2.workers[0].pid) and tp2.scheduler.is_finished()


SCRIPT = """
import sys
from minivllm import LLM, SamplingParams

if __name__ == "__main__":
    llm = LLM(sys.argv[2], device="cpu", max_model_len=64, tensor_parallel_size=2)
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
    print(llm.workers[0].pid, flush=True)
    if sys.argv[1] == "sigkill":
        sys.stdin.read()  # until the test kills us
"""


@pytest.mark.parametrize("ending", ["exit", "sigkill"])
def test_workers_end_with_the_parent_process(ending):
    """At a normal exit the engine stops its workers (atexit); a parent killed outright gives
    them no word, so they notice it is gone."""
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, ending, tiny_checkpoint()], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": REPO})
    try:
        worker = int(proc.stdout.readline())
        if ending == "sigkill":
            proc.kill()
        assert proc.wait(timeout=60) == (0 if ending == "exit" else -signal.SIGKILL)
        assert wait_gone([worker])
    finally:
        proc.kill()


TORCHRUN_SCRIPT = """
import json, sys
from minivllm import LLM
from tests.helpers import greedy_tokens, random_prompts

llm = LLM(sys.argv[1], device="cpu", tensor_parallel_size=2)
print(json.dumps(greedy_tokens(llm, random_prompts([5, 20, 40], seed=37))))  # only rank 0 gets here
"""


def test_torchrun_launch_uses_its_ranks_instead_of_spawning(tmp_path):
    ckpt = tiny_checkpoint()
    script = tmp_path / "generate.py"
    script.write_text(TORCHRUN_SCRIPT)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script), ckpt],
                         cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    with LLM(ckpt, device="cpu") as one:
        assert json.loads(lines[0]) == greedy_tokens(one, random_prompts([5, 20, 40], seed=37))


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@pytest.mark.gpu
@two_gpus
def test_tp2_on_gpus_matches_tp1_with_graphs_and_fusion():
    """fp32: NCCL all-reduces inside CUDA graphs, and gamma folded into each rank's shard."""
    ckpt = tiny_checkpoint()
    prompts = random_prompts([1, 15, 17, 40, 300], seed=38)
    kwargs = dict(device="cuda", dtype="float32", kvcache_block_size=16, max_num_seqs=8, max_model_len=512)
    with LLM(ckpt, **kwargs) as one:
        expected = greedy_tokens(one, prompts, max_tokens=24)
    for eager in (True, False):
        for fusion in ("off", "norm_linear"):
            with LLM(ckpt, enforce_eager=eager, fusion=fusion, tensor_parallel_size=2, **kwargs) as two:
                assert greedy_tokens(two, prompts, max_tokens=24) == expected, (eager, fusion)


@pytest.mark.gpu
@two_gpus
def test_tp2_on_gpus_matches_tp1_bf16(qwen3_06b):  # noqa: F811
    prompts = random_prompts([7, 100, 513], vocab=151936, seed=39)
    kwargs = dict(max_model_len=1024, max_num_seqs=16, gpu_memory_utilization=0.5)
    with LLM(qwen3_06b, **kwargs) as one:
        ref, ref_tokens = step_logits(one, prompts), greedy_tokens(one, prompts, max_tokens=8)
    gc.collect()  # the weights, before the next engine measures free memory
    with LLM(qwen3_06b, tensor_parallel_size=2, **kwargs) as two:
        got, tokens = step_logits(two, prompts), greedy_tokens(two, prompts, max_tokens=8)
    rel = (got - ref).norm() / ref.norm()
    assert torch.isfinite(got).all() and rel < 2e-2, rel
    # bf16 sums in another order: greedy paths may part after a near tie, so only the first tokens must agree.
    assert [t[0] for t in tokens] == [t[0] for t in ref_tokens]
