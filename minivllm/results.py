"""Result files and their provenance: every benchmark and profile writes one JSON document,
``<out>/<benchmark>-<gpu slug>.json``, naming the hardware, versions, commit, command and date
that produced its rows (the book's Method appendix gives the schema)."""
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def hardware(device: str = "auto") -> dict:
    """This machine: versions, CPU, and the GPU with its driver when ``device`` uses one."""
    import torch
    import transformers
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    hw = {"torch": torch.__version__, "triton": triton_version, "transformers": transformers.__version__,
          "cpu": _cpu_name(), "cores": os.cpu_count()}
    if device != "cpu" and torch.cuda.is_available():
        hw.update(gpu=torch.cuda.get_device_name(), driver=_driver(), cuda=torch.version.cuda)
    return hw


def gpu_slug() -> str:
    import torch
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_commit() -> str | None:
    """The commit the code ran at. A copy of the tree without its history (a GPU box's) names it in
    MINIVLLM_GIT_COMMIT."""
    if os.environ.get("MINIVLLM_GIT_COMMIT"):
        return os.environ["MINIVLLM_GIT_COMMIT"]
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30, cwd=ROOT)
        return git.stdout.strip() if git.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def write_result(benchmark: str, rows: list[dict], out_dir: str, program: str, argv: list[str] | None = None,
                 device: str = "auto", **extra) -> str:
    """Writes the document and returns its path; ``program`` and ``argv`` (default: this process's
    arguments) make its ``command``; ``extra`` fields (ceilings, dispatch, ...) go beside the rows."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{benchmark}-{gpu_slug() if device != 'cpu' else 'cpu'}.json")
    argv = sys.argv[1:] if argv is None else argv
    doc = {"benchmark": benchmark, "hardware": hardware(device), "git_commit": git_commit(),
           "date": datetime.date.today().isoformat(), "command": " ".join([program, *argv]), **extra, "rows": rows}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {path}")
    return path
