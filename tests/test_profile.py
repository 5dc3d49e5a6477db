"""minivllm.profile on the tiny checkpoint (CPU): the JSON chapter 9 reads."""
import json

from minivllm.profile import main
from tests.helpers import tiny_checkpoint


def test_decode_profile_json(tmp_path):
    path = main(["--model", tiny_checkpoint(), "--fusion", "off,norm_linear,full", "--context", "40",
                 "--steps", "3", "--device", "cpu", "--out", str(tmp_path)])
    doc = json.loads(open(path).read())
    for key in ("benchmark", "hardware", "git_commit", "date", "command", "rows"):
        assert key in doc
    assert doc["benchmark"] == "decode_profile" and doc["profiled_eager"] is True
    steps = {r["fusion"]: r for r in doc["rows"] if r["kind"] == "step"}
    assert set(steps) | set(doc["skipped_fusion_modes"]) == {"off", "norm_linear", "full"}
    assert {"off", "norm_linear"} <= set(steps)
    for fusion, step in steps.items():
        assert step["kernels_per_step"] > 0 and step["gpu_us_per_step"] > 0 and step["wall_us_per_step"] > 0
        assert step["wall_us_min"] <= step["wall_us_per_step"] <= step["wall_us_max"] and step["wall_steps"] > 1
        assert step["timeline"] and all(k["end_us"] >= k["start_us"] >= 0 for k in step["timeline"])
        kernels = [r for r in doc["rows"] if r["kind"] == "kernel" and r["fusion"] == fusion]
        assert all(r["calls_per_step"] > 0 and r["category"] for r in kernels)
        assert abs(sum(r["calls_per_step"] for r in kernels) - step["kernels_per_step"]) < 1e-6

    def norm_calls(fusion):
        return sum(r["calls_per_step"] for r in doc["rows"]
                   if r["kind"] == "kernel" and r["fusion"] == fusion and r["category"] == "norm")

    assert 0 < norm_calls("norm_linear") < norm_calls("off")
    assert any(r["category"] == "fused_norm_linear" for r in doc["rows"] if r["fusion"] == "norm_linear")
