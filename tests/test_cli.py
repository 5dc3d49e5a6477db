import json
import subprocess
import sys

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
