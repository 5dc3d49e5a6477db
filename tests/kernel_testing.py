"""What the kernel test modules share: running Triton's interpreter on CPU, and outputs that
start as NaN so an element a kernel never writes fails the test.

Triton picks the interpreter when it is first imported. A kernel test module calls
``select_interpreter()`` before importing ``kernels``; if another module imported Triton
first (a full `pytest` run), its ``test_cpu_kernels_in_fresh_process`` calls
``rerun_in_interpreter(__file__)`` to run the module again in a new process instead.
"""
import os
import subprocess
import sys

import torch


def select_interpreter():
    if not torch.cuda.is_available() and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def rerun_in_interpreter(test_file: str):
    root = os.path.dirname(os.path.dirname(os.path.abspath(test_file)))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not gpu", "-p", "no:cacheprovider", test_file],
                         cwd=root, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


def poisoned(fn, *args, **kwargs):
    """Call ``fn`` with every torch.empty NaN-filled, so unwritten outputs show up."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)
