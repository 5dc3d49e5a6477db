"""Which kernel serves a fused norm + linear at M >= 2 on the GPU in hand, decided by measurement.

The engine's default there is the cuBLAS route of ``kernels.rmsnorm_linear``. Where ``kernels.bench
--paths tma`` measured the Hopper TMA kernel (``kernels.rmsnorm_linear_tma`` with its row pass) faster at a
shape, it writes ``kernels/configs/tma-<gpu>.json``: per (N, K, silu_mul), the smallest M from which the TMA
kernel won at every larger measured M, with the times behind it. ``rmsnorm_linear`` takes the TMA kernel
from that M on. Without a file naming this GPU nothing changes.
"""
import functools
import json
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def tma_from_m(rows: list[dict]) -> list[dict]:
    """From ``kernels.bench`` rows: per (N, K, silu_mul) the smallest measured M from which the TMA kernel
    (``fused_tma_rows``; ``full_tma_rows`` for gate_up with SiLU * up) beat the route it replaces, forced
    (``cublas_route``; ``full_cublas``: a dispatched call may already take the TMA kernel), at every larger
    measured M, or none where it never did. Each entry keeps the times."""
    pairs = (("fused_tma_rows", "cublas_route", False), ("full_tma_rows", "full_cublas", True))
    times = {(r["N"], r["K"], r["M"], r["impl"]): r["us_median"] for r in rows if r.get("us_median") is not None}
    out = []
    for tma, route, silu_mul in pairs:
        shapes = sorted({(n, k) for n, k, _, impl in times if impl == tma})
        for n, k in shapes:
            ms = sorted(m for n2, k2, m, impl in times if (n2, k2, impl) == (n, k, tma) and (n, k, m, route) in times)
            wins = [times[(n, k, m, tma)] < times[(n, k, m, route)] for m in ms]
            from_m = next((m for i, m in enumerate(ms) if all(wins[i:])), None)
            out.append({"N": n, "K": k, "silu_mul": silu_mul, "from_m": from_m,
                        "us": {str(m): {"tma": times[(n, k, m, tma)], "route": times[(n, k, m, route)]} for m in ms}})
    return out


def write_table(rows: list[dict], gpu: str, slug: str, commit: str | None) -> Path:
    CONFIG_DIR.mkdir(exist_ok=True)
    path = CONFIG_DIR / f"tma-{slug}.json"
    path.write_text(json.dumps({"gpu": gpu, "git_commit": commit, "shapes": tma_from_m(rows)}, indent=1) + "\n")
    return path


@functools.cache
def _table(gpu: str) -> dict:
    """{(N, K, silu_mul): from_m} of the file naming ``gpu``; empty without one."""
    for path in sorted(CONFIG_DIR.glob("tma-*.json")):
        doc = json.loads(path.read_text())
        if doc.get("gpu") == gpu:
            return {(s["N"], s["K"], s["silu_mul"]): s["from_m"] for s in doc["shapes"] if s["from_m"] is not None}
    return {}


def takes_tma(m: int, n: int, k: int, silu_mul: bool, device: torch.device) -> bool:
    """Whether the TMA kernel serves this call (N: the weight's rows): measured faster from some M <= m at
    this shape on this GPU."""
    if device.type != "cuda":
        return False
    from_m = _table(torch.cuda.get_device_name(device)).get((n, k, silu_mul))
    return from_m is not None and m >= from_m
