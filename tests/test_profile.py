"""minivllm.profile on the tiny checkpoint (CPU): the JSON chapter 9 reads."""
import json
import os

import pytest

from minivllm.profile import main
from tests.helpers import tiny_checkpoint


def test_decode_profile_json(tmp_path):
    path = main(["--model", tiny_checkpoint(), "--fusion", "off,norm_linear,full", "--context", "40",
                 "--steps", "3", "--device", "cpu", "--out", str(tmp_path), "--tag=-tagged"])
    doc = json.loads(open(path).read())
    for key in ("benchmark", "hardware", "git_commit", "date", "command", "rows"):
        assert key in doc
    assert doc["benchmark"] == "decode_profile-tagged" and doc["profiled_eager"] is True
    assert os.path.basename(path).startswith("decode_profile-tagged-")
    steps = {r["fusion"]: r for r in doc["rows"] if r["kind"] == "step"}
    assert set(steps) | set(doc["skipped_fusion_modes"]) == {"off", "norm_linear", "full"}
    assert {"off", "norm_linear"} <= set(steps)
    for fusion, step in steps.items():
        assert step["kernels_per_step"] > 0 and step["gpu_us_per_step"] > 0 and step["wall_us_per_step"] > 0
        assert step["wall_us_min"] <= step["wall_us_per_step"] <= step["wall_us_max"] and step["wall_steps"] > 1
        assert "replay_span_us_per_step" not in step  # no graphs on CPU: nothing replayed to profile
        assert step["timeline"] and all(k["end_us"] >= k["start_us"] >= 0 for k in step["timeline"])
        kernels = [r for r in doc["rows"] if r["kind"] == "kernel" and r["fusion"] == fusion]
        assert all(r["calls_per_step"] > 0 and r["category"] for r in kernels)
        assert abs(sum(r["calls_per_step"] for r in kernels) - step["kernels_per_step"]) < 1e-6

    def norm_calls(fusion):
        return sum(r["calls_per_step"] for r in doc["rows"]
                   if r["kind"] == "kernel" and r["fusion"] == fusion and r["category"] == "norm")

    assert 0 < norm_calls("norm_linear") < norm_calls("off")
    assert any(r["category"] == "fused_norm_linear" for r in doc["rows"] if r["fusion"] == "norm_linear")


@pytest.mark.gpu
def test_replayed_steps_are_profiled_where_graphs_run(tmp_path):
    # On a GPU the steps are also profiled as the engine runs them, graphs replayed: their kernels, the
    # span of the GPU's work and its idle time between kernels (PDL is off here: durations do not overlap).
    path = main(["--model", tiny_checkpoint(), "--fusion", "full", "--context", "40", "--steps", "3", "--device",
                 "cuda", "--out", str(tmp_path)])
    step = next(r for r in json.loads(open(path).read())["rows"] if r["kind"] == "step")
    assert step["cuda_graphs"] and step["replay_kernels_per_step"] > 0
    assert 0 < step["replay_busy_us_per_step"] <= 1.01 * step["replay_span_us_per_step"]
    assert step["replay_timeline"][0]["start_us"] == 0 and len(step["replay_span_us"]) == 3
