"""Peer engines measured beside minivllm on the same GPU, the same checkpoint and the same requests
(``minivllm.workloads``), each in its own process:

- ``minivllm.peers.nano_vllm``: nano-vLLM, the original (GeeeekExplorer/nano-vllm), from a directory holding a
  ``git archive`` of a named commit (its code is not part of this repository), with attention by
  ``standins/flash_attn`` on our Triton kernels;
- ``minivllm.peers.hf``: HF transformers ``generate``, eager and with its static cache + torch.compile.

A peer runs in a subprocess because nano-vLLM initialises torch.distributed (NCCL, port 2333) and sizes its KV
cache from the GPU memory left free, and because a compiled HF model keeps its graphs: a fresh process per peer
workload leaves the benchmark's own process as it was. ``run_peer`` starts one and returns its result rows.
"""
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STANDINS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "standins")
OUTPUT_TAIL_LINES = 60


class PeerError(RuntimeError):
    """A peer's process failed, timed out or wrote no rows; the message ends with the tail of its output."""


def run_peer(module: str, argv: list[str], timeout_s: float) -> list[dict]:
    """Run ``python -m minivllm.peers.<module> *argv --rows-out TMP`` with the repository on PYTHONPATH,
    print its output as it comes (each line prefixed with the module's name), and return the rows it wrote.

    Call it while this process holds little GPU memory (engines shut down, ``torch.cuda.empty_cache()``):
    nano-vLLM takes ``gpu_memory_utilization`` of the whole GPU minus what is in use when it starts.
    """
    with tempfile.TemporaryDirectory(prefix=f"peer-{module}-") as tmp:
        rows_out = os.path.join(tmp, "rows.json")
        command = [sys.executable, "-m", f"minivllm.peers.{module}", *argv, "--rows-out", rows_out]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
        returncode, tail = run_logged(command, env, timeout_s, module)
        what = " ".join(command)
        if returncode is None:
            raise PeerError(f"{what}\ntimed out after {timeout_s:.0f} s; its last output:\n" + "".join(tail))
        if returncode != 0:
            raise PeerError(f"{what}\nexited with status {returncode}; its last output:\n" + "".join(tail))
        if not os.path.exists(rows_out):
            raise PeerError(f"{what}\nexited cleanly but wrote no rows; its last output:\n" + "".join(tail))
        with open(rows_out) as f:
            return json.load(f)


def run_logged(command: list[str], env: dict, timeout_s: float, label: str) -> tuple[int | None, list[str]]:
    """Runs ``command`` in a session of its own, printing its output with ``label``; returns its exit status
    (None when it ran past ``timeout_s``) and the tail of its output. Whatever ends the wait (the timeout, or an
    exception in this process: bench turns SIGTERM into SystemExit) kills the whole group, torch.compile's
    workers included, so that no orphan keeps holding the GPU's memory."""
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True)
    tail = collections.deque(maxlen=OUTPUT_TAIL_LINES)
    reader = threading.Thread(target=_relay, args=(proc.stdout, label, tail), daemon=True)
    reader.start()
    returncode = None
    try:
        returncode = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=10)
    return returncode, list(tail)


def _relay(stream, module, tail):
    for line in stream:
        tail.append(line)
        print(f"[{module}] {line}", end="", flush=True)
