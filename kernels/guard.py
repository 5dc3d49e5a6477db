"""What every kernel module shares: the Triton import guard, the dispatch rule and the input checks.

CUDA tensors run Triton; CPU tensors run Triton's interpreter when ``TRITON_INTERPRET=1`` was set
before this package was imported, else each op's torch reference. Without Triton (e.g. the book build)
the package still imports for its references; CUDA tensors then raise.

Programmatic dependent launch (PDL, compute capability >= 9): the kernels of the decode step at one row
take a ``USE_PDL`` constexpr. With it they call ``gdc_launch_dependents`` on entry, so the next kernel
in the stream may launch as soon as every program of this one has started, and ``gdc_wait`` before
their first read of anything an earlier kernel wrote (the GEMVs issue their first W tiles before it:
weights are never written). Each kernel's launch and prologue then run under its predecessor's tail.
``pdl_launch`` gives a wrapper the launch arguments; ``pdl(False)`` turns it off for a block of code
(the engine's ``Config.pdl``).

The GEMVs trigger their successor's launch after their K loop (``USE_PDL`` 2; ``KERNELS_PDL_TRIGGER=entry``:
on entry, 1; the other kernels, short, trigger on entry either way): launched on entry, a GEMV's successor
occupies SM slots, waiting, for the whole of its predecessor's last wave.

PDL is on by default (``KERNELS_PDL=0`` in the environment turns it off for the process). Run 7 found it no
faster on the H200 (+2.7 % at Qwen3-0.6B's batch-1 step, -2.3 % at Llama-3.2-1B's); once each GEMV kept its
weight tiles in flight from entry (run 9), it cut the H100's batch-1 step by 12.5 % with the after-loop trigger
and 9.7 % with the entry one (kernels/NOTES.md, run 10). It computes what the plain kernels compute: under the
interpreter the same bits; compiled, the GEMV's peeled first K step rounds a rare output element one
bf16 ulp apart (a dependent chain of random GEMVs amplifies that, as it does any rounding).
"""
import contextlib
import contextvars
import functools
import os
import types

import torch

try:
    import triton
    import triton.language as tl
    import triton.testing

    HAVE_TRITON = True
except ImportError:
    # Torch-only installs (e.g. the book build) still import the package for its
    # references. The stand-ins let the decorators run; the kernels are never launched.
    def _passthrough(*args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return _passthrough

    triton = types.SimpleNamespace(jit=_passthrough, autotune=_passthrough, Config=_passthrough)
    tl = types.SimpleNamespace(constexpr=None)
    HAVE_TRITON = False

# Triton reads TRITON_INTERPRET when a kernel is decorated, so read it once here too:
# the dispatch below then always agrees with how the kernels were built.
INTERPRET = HAVE_TRITON and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

DTYPES = (torch.float16, torch.bfloat16, torch.float32)

PDL_ALLOWED = os.environ.get("KERNELS_PDL", "1") == "1"
PDL_TRIGGERS = {"entry": 1, "after_loop": 2}  # the USE_PDL value of each trigger point
PDL_TRIGGER = os.environ.get("KERNELS_PDL_TRIGGER", "after_loop")
if PDL_TRIGGER not in PDL_TRIGGERS:
    raise ValueError(f"KERNELS_PDL_TRIGGER={PDL_TRIGGER!r}; choose one of {sorted(PDL_TRIGGERS)}")
# A context variable, not a global: an engine's setting holds in its own thread only.
_pdl_on = contextvars.ContextVar("kernels_pdl", default=True)


@contextlib.contextmanager
def pdl(enabled: bool):
    """Within the block, kernels launch with PDL only if ``enabled`` (and where ``pdl_enabled`` allows). It
    can turn PDL off, not back on: ``pdl(True)`` inside a ``pdl(False)`` block (an engine's setting within
    a profile's PDL-free breakdown) keeps it off."""
    token = _pdl_on.set(enabled and _pdl_on.get())
    try:
        yield
    finally:
        _pdl_on.reset(token)


@functools.cache
def _has_pdl(device: torch.device) -> bool:
    # ROCm builds report their GPUs as "cuda" too, with AMD's own version numbers: no PDL there.
    return torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9


@functools.cache
def sm_count(device: torch.device, interpreted: int) -> int:
    """The SMs of a CUDA ``device``; on CPU (Triton's interpreter) ``interpreted`` stands in, which each
    kernel picks so that its tests on tiny shapes still take its multi-program paths."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else interpreted


def pdl_enabled(t: torch.Tensor) -> bool:
    """Whether kernels on ``t`` launch with PDL: CUDA with compute capability >= 9, compiled Triton (the
    interpreter has no grid dependencies), and not switched off (``pdl``, ``KERNELS_PDL``)."""
    return PDL_ALLOWED and _pdl_on.get() and t.is_cuda and HAVE_TRITON and not INTERPRET and _has_pdl(t.device)


@triton.jit
def pdl_entry(USE_PDL: tl.constexpr):
    """A PDL kernel's first step when it has nothing to prefetch: the next kernel may launch once every
    program of this one has started, then wait until the previous kernel has completed (its writes
    visible). Every program runs it, before any early exit: a kernel whose programs all skipped the wait
    could complete before its predecessor, and its successor would read unfinished data."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


def pdl_launch(t: torch.Tensor, wanted: bool = True) -> dict:
    """The launch arguments of a kernel with a ``USE_PDL`` constexpr, on ``t``'s device: ``launch_pdl``
    goes to the launcher only with PDL on. ``wanted``: the call's path takes PDL at all."""
    if wanted and pdl_enabled(t):
        return {"USE_PDL": PDL_TRIGGERS[PDL_TRIGGER], "launch_pdl": True}
    return {"USE_PDL": False}


def use_triton(t: torch.Tensor) -> bool:
    """Whether a kernel call on ``t`` runs Triton (True) or the torch reference (False)."""
    if t.is_cuda:
        if not HAVE_TRITON:
            raise RuntimeError("kernels: CUDA tensors need Triton, which is not installed")
        return True
    return INTERPRET


def check_tensors(op: str, **tensors: torch.Tensor) -> None:
    """ValueError unless all tensors share one supported dtype and one device, and each is
    contiguous in its last dim."""
    first_name, first = next(iter(tensors.items()))
    if first.dtype not in DTYPES:
        raise ValueError(f"{op}: {first_name} has dtype {first.dtype}; expected one of {DTYPES}")
    for name, t in tensors.items():
        if t.dtype != first.dtype:
            raise ValueError(f"{op}: {name} has dtype {t.dtype} but {first_name} has {first.dtype}")
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}")
        if t.dim() > 0 and t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must be contiguous in its last dim (stride {t.stride(-1)})")


def graph_bench(kernel_call, quantiles, calls=20, samples=10):
    """The autotuners' timing of the GEMVs (a few microseconds each): inside a CUDA graph, as the engine
    replays them, and with the weights out of the L2 cache, as the engine reads them (a decode step's
    weights are 20x the L2; one projection's fit in it, so back-to-back replays would time L2 reads and
    favour tiles that keep too few DRAM bytes in flight). One graph runs ``calls`` x (a read of twice the
    L2, the kernel), another the reads alone; a sample is their difference over ``calls``. Timed in eager
    launches, whose overhead is as large as the differences between the candidates, the choice moved the
    batch-1 step by up to 12 % between two processes (kernels/NOTES.md, run 7). The interpreter times
    eagerly, as Triton's default does."""
    if INTERPRET:
        return triton.testing.do_bench(kernel_call, quantiles=quantiles)
    device = torch.device("cuda", torch.cuda.current_device())
    flush = torch.empty(2 * torch.cuda.get_device_properties(device).L2_cache_size // 4, dtype=torch.int32,
                        device=device)
    kernel_call()  # compiles, and allocates outside the graphs
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graphs = [torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()]
        for graph, with_kernel in zip(graphs, (True, False)):
            with torch.cuda.graph(graph, stream=stream):
                for _ in range(calls):
                    torch.amax(flush)
                    if with_kernel:
                        kernel_call()
        for graph in graphs:
            graph.replay()  # warm
        events = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(samples)]
        for start, middle, end in events:
            start.record(stream)
            graphs[0].replay()
            middle.record(stream)
            graphs[1].replay()
            end.record(stream)
    stream.synchronize()
    times = torch.tensor([(s.elapsed_time(m) - m.elapsed_time(e)) / calls for s, m, e in events])
    return torch.quantile(times, torch.tensor(quantiles, dtype=times.dtype)).tolist()


def autotuned_configs(modules=None) -> dict:
    """The configurations this process's autotuners chose, ``{module.kernel: {key: config}}``, for the
    result files: runs that autotune again may pick differently, and the rows should say what ran."""
    import sys
    if not HAVE_TRITON:
        return {}
    from triton.runtime.autotuner import Autotuner
    if modules is None:
        modules = [m for name, m in sys.modules.items() if name.startswith("kernels.") and m is not None]
    return {f"{module.__name__}.{name}": {str(key): str(config) for key, config in obj.cache.items()}
            for module in modules for name, obj in vars(module).items()
            if isinstance(obj, Autotuner) and obj.cache}
