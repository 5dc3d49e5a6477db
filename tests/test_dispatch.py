"""kernels.dispatch: the TMA kernel is taken where, and only where, kernels.bench measured it winning on
the GPU in hand."""
import json
import types

import torch

from kernels import dispatch


def rows(n, k, impl_times):
    return [{"N": n, "K": k, "M": m, "impl": impl, "us_median": us} for (m, impl), us in impl_times.items()]


def test_the_table_starts_where_the_tma_kernel_wins_at_every_larger_m():
    data = (rows(4096, 1024, {(256, "fused_tma_rows"): 9.0, (256, "cublas_route"): 8.0,
                              (1024, "fused_tma_rows"): 15.0, (1024, "cublas_route"): 17.0,
                              (4096, "fused_tma_rows"): 55.0, (4096, "cublas_route"): 60.0})
            + rows(6144, 1024, {(256, "full_tma_rows"): 9.0, (256, "full_cublas"): 10.0,  # a win, then a loss
                                (1024, "full_tma_rows"): 30.0, (1024, "full_cublas"): 25.0,
                                (4096, "full_tma_rows"): 90.0, (4096, "full_cublas"): 100.0})
            + rows(1024, 2048, {(256, "fused_tma_rows"): 9.0, (256, "cublas_route"): 8.0})  # never
            + rows(512, 512, {(256, "fused_tma_rows"): 1.0}))  # no route timed beside it: no decision
    table = {(s["N"], s["K"], s["silu_mul"]): s for s in dispatch.tma_from_m(data)}
    assert table[(4096, 1024, False)]["from_m"] == 1024
    assert table[(6144, 1024, True)]["from_m"] == 4096
    assert table[(1024, 2048, False)]["from_m"] is None
    assert table[(512, 512, False)]["from_m"] is None and table[(512, 512, False)]["us"] == {}
    assert table[(4096, 1024, False)]["us"]["256"] == {"tma": 9.0, "route": 8.0}


def test_dispatch_follows_the_file_of_the_gpu_in_hand_only(tmp_path, monkeypatch):
    monkeypatch.setattr(dispatch, "CONFIG_DIR", tmp_path)
    dispatch._table.cache_clear()
    data = rows(4096, 1024, {(1024, "fused_tma_rows"): 15.0, (1024, "cublas_route"): 17.0})
    path = dispatch.write_table(data, "NVIDIA H200", "nvidia-h200", "abc123")
    assert path == tmp_path / "tma-nvidia-h200.json" and json.loads(path.read_text())["git_commit"] == "abc123"
    cuda = types.SimpleNamespace(type="cuda")
    for gpu, expected in (("NVIDIA H200", True), ("NVIDIA H100 80GB HBM3", False)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, gpu=gpu: gpu)
        assert dispatch.takes_tma(2048, 4096, 1024, False, cuda) is expected
        assert not dispatch.takes_tma(512, 4096, 1024, False, cuda)  # below the measured winning M
        assert not dispatch.takes_tma(2048, 4096, 1024, True, cuda)  # another op at that shape
    assert not dispatch.takes_tma(2048, 4096, 1024, False, torch.device("cpu"))
    dispatch._table.cache_clear()
