import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import tiny_checkpoint


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "minivllm", *args], capture_output=True, text=True, timeout=300)


def test_generate_prints_completions():
    res = run_cli("generate", "--model", tiny_checkpoint(), "--device", "cpu", "--prompt", "The KV cache",
                  "--prompt", "Paged attention", "--max-tokens", "5", "--ignore-eos", "--json")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["The KV cache", "Paged attention"]
    assert all(len(r["token_ids"]) == 5 and r["finish_reason"] == "length" for r in rows)


def test_bad_input_is_a_clear_error(tmp_path):
    res = run_cli("generate", "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert res.returncode == 2 and "not found" in res.stderr


def test_n_stop_and_logprobs_options():
    res = run_cli("generate", "--model", tiny_checkpoint(), "--device", "cpu", "--prompt", "The KV cache",
                  "--max-tokens", "6", "--n", "2", "--temperature", "1.0", "--seed", "3", "--logprobs", "2",
                  "--stop", "zzz-never-zzz", "--repetition-penalty", "1.2", "--json")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["index"] for r in rows] == [0, 1]
    for r in rows:
        assert len(r["logprobs"]) == len(r["token_ids"]) and r["finish_reason"] in ("stop", "length")
        assert r["cumulative_logprob"] == pytest.approx(sum(lp[str(t)] for t, lp in zip(r["token_ids"], r["logprobs"])))


@pytest.mark.parametrize("problem", ["prompt file", "config.json"])
def test_bad_files_are_errors_not_tracebacks(tmp_path, problem):
    model = tiny_checkpoint()
    args = ["--prompt", "x"]
    if problem == "prompt file":
        args = ["--prompt-file", str(tmp_path / "missing.txt")]
    else:
        model = str(tmp_path / "model")
        shutil.copytree(tiny_checkpoint(), model)
        with open(os.path.join(model, "config.json"), "w") as f:
            f.write('{"model_type": "qwen3"')
    res = run_cli("generate", "--model", model, "--device", "cpu", *args)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert ("missing.txt" if problem == "prompt file" else "config.json is not valid JSON") in res.stderr
