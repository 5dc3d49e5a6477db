"""minivllm.profile on the tiny checkpoint (CPU): the JSON chapter 9 reads."""
import json
import os

import pytest
import torch

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


def test_a_runs_gpu_time_is_split_by_kernel_name_with_its_idle_time():
    from types import SimpleNamespace

    from minivllm.profile import gpu_time_by_category
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def ev(name, start, end, device=cuda):
        return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end))
    events = [ev("_paged_attention_kernel", 0, 30), ev("nvjet_tst_128x64_64x4_1x2_h_bz_coopA_NTN", 40, 100),
              ev("_gumbel_argmax_kernel", 100, 110), ev("_gumbel_argmax_combine_kernel", 110, 112),
              ev("Memcpy HtoD (Pinned -> Device)", 200, 201),
              ev("mv::step", 0, 300),  # a record_function range on the GPU timeline, not a kernel
              ev("aten::mm", 0, 1000, cpu)]
    got = gpu_time_by_category(SimpleNamespace(events=lambda: events))
    assert got["seconds"] == {"gemm": 60e-6, "attention": 30e-6, "sampler": 12e-6, "other": 1e-6}
    assert got["busy_s"] == pytest.approx(103e-6) and got["span_s"] == pytest.approx(201e-6)
    assert got["kernels"] == 5


def test_workload_floor_counts_each_steps_weights_and_kv_reads():
    # Step by step: at its s-th decode step a request of prompt p reads the K/V of its p + s tokens so far, and
    # every step (as many as the longest request) reads the weights once.
    from minivllm import book, costs
    cfg = book.model_config("qwen3-0.6b")
    prompts, outputs, bandwidth = [5, 100, 37], [3, 10, 1], 1e12
    parts = costs.throughput_floor_parts_s(cfg, 2, prompts, outputs, 1, bandwidth)
    kv_tokens = sum(p + s for p, n in zip(prompts, outputs) for s in range(n))
    assert parts["kv"] == pytest.approx(kv_tokens * costs.kv_bytes_per_token(cfg, 2) / bandwidth)
    assert parts["weights"] == pytest.approx(max(outputs) * costs.weight_bytes(cfg, 2) / bandwidth)
    halves = costs.throughput_floor_parts_s(cfg, 2, prompts, outputs, 2, bandwidth)  # two GPUs, each its share
    assert halves == pytest.approx({k: v / 2 for k, v in parts.items()})
