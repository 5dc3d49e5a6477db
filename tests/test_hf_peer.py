"""The HF transformers peer on CPU (fp32, the tiny checkpoint): its greedy tokens are minivllm's, eager and
compiled, so both peers generate the same thing; and its rows come back through run_peer as the benchmark
calls it."""
import json

import pytest
import torch

from minivllm import LLM
from minivllm.peers import PeerError, run_peer
from minivllm.peers import hf as hf_peer
from tests.helpers import PEER_ROW_FIELDS, greedy_tokens, random_prompts, tiny_checkpoint



@pytest.fixture(scope="module")
def minivllm_greedy():
    prompts = random_prompts([24] * 3, seed=5)  # one length: HF's batch needs no padding
    with LLM(tiny_checkpoint(), device="cpu") as llm:
        tokens = greedy_tokens(llm, prompts, max_tokens=16)
        eos = llm.tokenizer.eos_token_id
    # HF ignores EOS by masking its logit (min_new_tokens), minivllm by not stopping: the same tokens only while
    # greedy decoding never picks EOS.
    assert all(eos not in t for t in tokens)
    return prompts, tokens


def hf_greedy(mode, prompts, max_tokens):
    model = hf_peer.load_model(tiny_checkpoint(), torch.device("cpu"))
    return hf_peer.HFEngine(model, mode).tokens(prompts, max_tokens), model


def test_hf_eager_greedy_tokens_are_minivllms(minivllm_greedy):
    prompts, expected = minivllm_greedy
    tokens, _ = hf_greedy("eager", prompts, 16)
    assert tokens == expected


@pytest.mark.slow
def test_hf_compiled_greedy_tokens_are_minivllms(minivllm_greedy):
    # About a minute on 2 cores with a cold inductor cache.
    prompts, expected = minivllm_greedy
    tokens, model = hf_greedy("compiled", prompts, 16)
    assert tokens == expected
    assert model._compiled_call is not None  # generate did compile its forward


def test_hf_throughput_left_pads_and_credits_each_request_its_own_tokens():
    # Prompts of three lengths in one padded call: at a vanishing temperature each request's tokens are its
    # greedy tokens alone (minivllm's), so the padding changes nothing; each keeps its own max_tokens.
    from minivllm.workloads import Request
    prompts = random_prompts([20, 9, 14], seed=7)
    lengths = [6, 3, 5]
    with LLM(tiny_checkpoint(), device="cpu") as llm:
        expected = [greedy_tokens(llm, [p], max_tokens=n)[0] for p, n in zip(prompts, lengths)]
    model = hf_peer.load_model(tiny_checkpoint(), torch.device("cpu"))
    engine = hf_peer.HFEngine(model, "eager")
    requests = [Request(p, n, temperature=1e-6) for p, n in zip(prompts, lengths)]
    assert engine.request_tokens(requests) == expected
    assert engine.generate_requests(requests) == lengths
    with pytest.raises(ValueError, match="one temperature"):
        engine.generate_requests([Request(prompts[0], 2, 0.6), Request(prompts[1], 2, 1.0)])


def test_hf_runner_rows_through_run_peer():
    ckpt = tiny_checkpoint(vocab_size=10240)  # the workloads' random ids are below 10,001
    rows = run_peer("hf", ["--model", ckpt, "--workload", "latency", "--mode", "eager", "--batches", "1,2",
                           "--prompt-lens", "8", "--gen-tokens", "3"], timeout_s=300)
    assert [(r["workload"], r["batch_size"], r["seq_len"]) for r in rows] == [("decode_latency", 1, 8),
                                                                             ("decode_latency", 2, 8)]
    for r in rows:
        assert PEER_ROW_FIELDS <= set(r) and (r["engine"], r["fusion"], r["gen_tokens"]) == ("hf_transformers", None, 3)
        assert r["peer"] == "huggingface/transformers" and r["peer_commit"].startswith("v5.")
        assert len(r["samples_ms"]) == 5 and r["latency_ms"] == sorted(r["samples_ms"])[2]
        assert r["throughput_tokens_per_sec"] == pytest.approx(r["batch_size"] * 1e3 / r["latency_ms"])
        assert r["dtype"] == "float32" and "min_new_tokens" in r["notes"]


def test_hf_runner_compiled_defaults_and_ttft_rows(tmp_path, capsys):
    args = hf_peer.parse_args(["--model", "m", "--workload", "latency", "--mode", "compiled", "--rows-out", "r"])
    assert args.batches == [1, 8] and args.gen_tokens == 16 and args.reps == 5
    assert hf_peer.parse_args(["--model", "m", "--workload", "ttft", "--mode", "eager", "--rows-out", "r"]).batches == \
        [1, 8, 32, 128, 256]
    rows_out = tmp_path / "rows.json"
    hf_peer.main(["--model", tiny_checkpoint(vocab_size=10240), "--workload", "ttft", "--mode", "eager",
                  "--prompt-lens", "16,40", "--reps", "3", "--rows-out", str(rows_out)])
    rows = json.loads(rows_out.read_text())
    assert [(r["workload"], r["batch_size"], r["seq_len"], len(r["samples_ms"])) for r in rows] == [
        ("ttft", 1, 16, 3), ("ttft", 1, 40, 3)]
    assert all(r["throughput_tokens_per_sec"] == pytest.approx(r["seq_len"] * 1e3 / r["latency_ms"]) for r in rows)
    assert capsys.readouterr().out.count('"workload": "ttft"') == 2  # each row printed as it comes


def test_run_peer_reports_a_failure_with_its_output():
    with pytest.raises(PeerError, match=r"exited with status 1(.|\n)*does-not-exist"):
        run_peer("hf", ["--model", "/does-not-exist", "--workload", "ttft", "--mode", "eager"], timeout_s=300)


def test_a_stopped_benchmark_takes_its_peer_process_with_it(tmp_path):
    # A stage limit stops the benchmark with SIGTERM while a peer runs: the peer (its own session, so that its
    # group can be killed) must not live on holding the GPU's memory.
    import os
    import signal
    import subprocess
    import sys
    import time
    pid_file = tmp_path / "peer.pid"
    parent = subprocess.Popen([sys.executable, "-c", f"""
import os, signal, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # as minivllm.bench does
from minivllm.peers import run_logged
child = "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
run_logged([sys.executable, "-c", child], dict(os.environ), 600, "sleeper")
"""], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 143
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
