"""Where a decode step's time goes, per fusion mode (chapter 9 of the book).

    python -m minivllm.profile --model DIR --fusion off,norm_linear,full --batch 1 --context 512

Writes <out>/decode_profile-<gpu slug>.json. The kernel breakdown comes from torch.profiler on
EAGER decode steps (kernels inside CUDA-graph replays are not attributed to the ops that
launched them), so the file says ``"profiled_eager": true``; the wall time per step is timed
separately, without the profiler, with CUDA graphs when the device has them: the median (and
min, max) of 3x as many steps as are profiled, after a few untimed ones. Each kernel is
attributed to the innermost engine op (module or kernels call) that launched it; the profiled steps
run without programmatic dependent launch, so that kernel durations do not overlap. On CPU the
"kernels" are emulated: one per kernels-package call and one per other top-level aten op.

Where CUDA graphs are captured, the steps are also profiled as they run, graphs replayed (with the
engine's PDL setting): the step row's ``replay_*`` fields give the kernels' summed duration, the span from
the first kernel's start to the last one's end (the GPU time of a step; span minus busy is the GPU idle
between kernels) and the last replay's timeline, its kernels named but not attributed to ops (a replay
runs no Python). They are None when the profiler records no kernel inside the replays.
"""
import argparse
import collections
import gc
import re
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import kernels
import minivllm.layers.attention as attention_mod
from kernels.guard import PDL_ALLOWED, pdl
import minivllm.models.decoder as decoder_mod
from minivllm import LLM, SamplingParams
from minivllm.config import FUSION_MODES
from minivllm.costs import measure_ceilings
from minivllm.results import write_result
from minivllm.layers.embed_head import ParallelLMHead
from minivllm.layers.layernorm import RMSNorm
from minivllm.layers.rotary import RotaryEmbedding
from minivllm.layers.sampler import Sampler

# Ops that are one kernel launch on the GPU (a CPU run counts each such call once).
KERNEL_LIKE = {"norm", "fused_norm_linear", "kv_store", "attention"}
NAME_RULES = [("fused_norm_linear", "rmsnorm_linear|rmsnorm_qkv"), ("norm", "rmsnorm"),
              ("attention", "attention"), ("kv_store", "kvcache"),
              ("gemm", "gemm|gemv|nvjet|cutlass|xmma|cublas|aten::linear|aten::mm|aten::addmm"),
              ("rope", "rotary|rope"), ("activation", "silu|gelu"),
              ("elementwise", "elementwise|aten::(mul|add|sub|cat|copy_|to|div|pow|mean|rsqrt|neg)")]
VIEWS = {"aten::view", "aten::reshape", "aten::split", "aten::chunk", "aten::flatten", "aten::t", "aten::transpose",
         "aten::slice", "aten::select", "aten::unsqueeze", "aten::as_strided", "aten::detach", "aten::empty",
         "aten::narrow", "aten::split_with_sizes", "aten::_unsafe_view", "aten::expand", "aten::alias",
         "aten::empty_strided", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg", "aten::item",
         "aten::_local_scalar_dense", "aten::is_nonzero", "aten::result_type"}


def category_of(name: str, rules=NAME_RULES) -> str:
    return next((cat for cat, pat in rules if re.search(pat, name, re.I)), "other")


def is_gpu_kernel(ev) -> bool:
    """A kernel or copy on the GPU's timeline (record_function ranges come back there too, as annotations)."""
    return ev.device_type == torch.autograd.DeviceType.CUDA and not ev.name.startswith(("mv::", "ProfilerStep"))


# A whole run's kernels are named, not labelled (CUDA-graph replays run no Python): the sampler by its kernels.
RUN_NAME_RULES = [("sampler", "gumbel_argmax|top_k_top_p")] + NAME_RULES


def gpu_time_by_category(prof) -> dict:
    """The GPU kernels (and copies) a profiler recorded over a whole run: ``seconds`` per category of their names
    (the sampler's own, then ``NAME_RULES``), ``busy_s`` their sum and ``span_s`` from the first one's start to
    the last one's end; ``span_s - busy_s`` is the time the GPU ran nothing (less where kernels overlapped)."""
    ranges, seconds = [], collections.Counter()
    for ev in filter(is_gpu_kernel, prof.events()):
        start, end = ev.time_range.start, ev.time_range.end
        ranges.append((start, end))
        seconds[category_of(ev.name, RUN_NAME_RULES)] += (end - start) / 1e6
    if not ranges:
        return dict(seconds={}, busy_s=0.0, span_s=0.0, kernels=0)
    return dict(seconds=dict(seconds.most_common()), busy_s=sum(seconds.values()),
                span_s=(max(e for _, e in ranges) - min(s for s, _ in ranges)) / 1e6, kernels=len(ranges))


def instrument(llm: LLM):
    """record_function labels 'mv::<category>::<op>' around every op of a step; returns an undo."""
    model, undo = llm.model_runner.model, []
    for name, mod in model.named_modules():
        short = name.split(".")[-1]
        cat = ("gemm" if isinstance(mod, ParallelLMHead) or "proj" in short else "norm" if isinstance(mod, RMSNorm)
               else "rope" if isinstance(mod, RotaryEmbedding) else "other" if short == "embed_tokens" else None)
        if cat is None:
            continue
        ctx = {}
        undo.append(mod.register_forward_pre_hook(
            lambda m, a, ctx=ctx, lbl=f"mv::{cat}::{short}": ctx.__setitem__(m, record_function(lbl).__enter__())))
        undo.append(mod.register_forward_hook(lambda m, a, o, ctx=ctx: ctx.pop(m).__exit__(None, None, None)))
    names = {id(m): n.split(".")[-1] for n, m in model.named_modules()}

    def labelled(fn, label):
        def call(*args, **kwargs):
            lbl = label(*args, **kwargs) if callable(label) else label
            with record_function(lbl):
                return fn(*args, **kwargs)
        return call

    patches = [(attention_mod, "store_kvcache", "mv::kv_store::store_kvcache"),
               (attention_mod, "paged_attention", "mv::attention::paged_attention"),
               (decoder_mod, "norm_linear", lambda norm, lin, x, res, fused, **kw: (
                   f"mv::fused_norm_linear::{names[id(norm)]}+{names[id(lin)]}" if fused else "mv::x")),
               # fusion="full": the qkv kernel (+ QK-norm, RoPE, KV store) and gate_up (+ SiLU * up)
               (kernels, "rmsnorm_qkv_rope_store", "mv::fused_norm_linear::input_layernorm+qkv+qknorm+rope+kv_store"),
               (kernels, "rmsnorm_linear", lambda *a, **kw: ("mv::fused_norm_linear::post_attention_layernorm+"
                                                             "gate_up+silu_mul" if kw.get("silu_mul") else "mv::x"))]
    # Decode steps sample in the step itself (kernels.gumbel_argmax); the others through the Sampler.
    patches += [(Sampler, "forward", "mv::other::sampler"), (kernels, "gumbel_argmax", "mv::other::sampler")]
    for obj, attr, label in patches:
        orig = getattr(obj, attr)
        setattr(obj, attr, labelled(orig, label))
        undo.append(type("U", (), {"remove": lambda s, o=obj, a=attr, f=orig: setattr(o, a, f)})())
    return lambda: [u.remove() for u in undo]


def labels_of(ev, include_self=False):
    """Innermost engine label ('mv::cat::op') and whether an ancestor already counts as a CPU kernel."""
    label, inside, p = None, False, ev if include_self else ev.cpu_parent
    while p is not None and p.name != "mv::step":
        if p.name.startswith("mv::") and p.name != "mv::x":
            label = label or p.name
            inside |= p.name.split("::")[1] in KERNEL_LIKE
        inside |= p.name.startswith("aten::")
        p = p.cpu_parent
    return label, inside


def step_kernels(prof, on_gpu: bool):
    """Per profiled step: [(name, category, op, start_us, end_us)] sorted by start."""
    events = list(prof.events())
    steps = sorted((e for e in events if e.name == "mv::step"), key=lambda e: e.time_range.start)
    by_id = {e.id: e for e in events if e.device_type == torch.autograd.DeviceType.CPU}
    # torch < 2.13 keeps no link from a kernel to its launching op: go through the runtime call
    # (cudaLaunchKernel & co.), which shares the kernel's correlation id and nests in the op.
    launches = {e.id: e for e in events
                if e.device_type == torch.autograd.DeviceType.CPU and re.match(r"cu(da)?\w*Launch", e.name)}
    out = [[] for _ in steps]
    for ev in events:
        if on_gpu:
            if not is_gpu_kernel(ev):
                continue
            linked = getattr(ev, "linked_correlation_id", None)
            launch = by_id.get(linked) if linked else launches.get(ev.id)
            label, _ = labels_of(launch, include_self=True) if launch is not None else (None, False)
            t = launch.time_range.start if launch is not None else ev.time_range.start
        else:
            if ev.device_type != torch.autograd.DeviceType.CPU or ev.name in VIEWS or ev.name == "mv::x":
                continue
            if ev.name in ("aten::to", "aten::contiguous", "aten::detach_") and not ev.cpu_children:
                continue  # a no-op (already the right dtype/device): no kernel on any device
            label, inside = labels_of(ev)
            own = ev.name.startswith("mv::") and ev.name.split("::")[1] in KERNEL_LIKE
            if inside or not (own or ev.name.startswith("aten::")):
                continue
            label, t = (ev.name if own else label), ev.time_range.start
        i = next((i for i, s in enumerate(steps) if s.time_range.start <= t <= s.time_range.end), None)
        if i is None:
            continue
        cat, op = (label.split("::")[1:] if label else (category_of(ev.name), ""))
        if cat == "other" and not label:
            cat = category_of(ev.name)
        out[i].append((ev.name, cat, op, ev.time_range.start, ev.time_range.end))
    return [sorted(s, key=lambda k: k[3]) for s in out]


WALL_WARMUP = 3  # decode steps run before the wall clock is read
WALL_STEPS_PER_STEP = 3  # wall-timed steps per profiled step (a median over more steps)
TOKENS_PER_STEP = WALL_STEPS_PER_STEP + 2  # tokens each sequence needs per profiled step, with the warm-ups


def start_decoding(llm: LLM, batch: int, context: int, max_tokens: int):
    gen = torch.Generator().manual_seed(0)
    vocab = llm.config.hf_config.vocab_size
    for _ in range(batch):
        ids = torch.randint(0, min(vocab, 10000), (context,), generator=gen).tolist()
        llm.add_request(ids, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    while any(s.num_uncomputed_tokens > 1 for s in llm.scheduler.running) or llm.scheduler.waiting:
        llm.step()


def replayed_steps(llm: LLM, steps: int, sync) -> dict:
    """The ``replay_*`` fields of the step row (module docstring), from ``steps`` decode steps run as the
    engine runs them."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            with record_function("mv::step"):
                llm.step()
                sync()
    runs = [s for s in step_kernels(prof, True) if s]
    if not runs:
        return dict(replay_kernels_per_step=None, replay_busy_us_per_step=None, replay_span_us_per_step=None,
                    replay_timeline=None)
    busy = [sum(t1 - t0 for *_, t0, t1 in s) for s in runs]
    spans = [max(k[4] for k in s) - s[0][3] for s in runs]
    t_first = runs[-1][0][3]
    return dict(replay_kernels_per_step=sum(map(len, runs)) / len(runs),
                replay_busy_us_per_step=statistics.median(busy), replay_span_us_per_step=statistics.median(spans),
                replay_span_us=spans,
                replay_timeline=[dict(name=k[0], category=k[1], start_us=k[3] - t_first, end_us=k[4] - t_first)
                                 for k in runs[-1]])


def profile_mode(args, fusion: str) -> list[dict]:
    on_gpu = torch.cuda.is_available() and args.device != "cpu"
    llm = LLM(args.model, fusion=fusion, device="cuda" if on_gpu else "cpu", max_num_seqs=args.batch + 1,
              max_model_len=args.context + args.steps * TOKENS_PER_STEP + 32, enforce_eager=args.enforce_eager)
    cfg = llm.config.hf_config
    layers = cfg.num_hidden_layers
    start_decoding(llm, args.batch, args.context, args.steps * TOKENS_PER_STEP + 8)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    walls = []
    for _ in range(WALL_WARMUP + WALL_STEPS_PER_STEP * args.steps):  # wall time: CUDA graphs (when captured)
        sync(), walls.append(-time.perf_counter()), llm.step(), sync()
        walls[-1] += time.perf_counter()
    walls = walls[WALL_WARMUP:]  # the first replays after capture and prefill are not the steady state
    graphs = llm.cuda_graphs
    replay = replayed_steps(llm, args.steps, sync) if graphs else {}
    # Eager steps for the breakdown, without PDL: a kernel launched early would count its wait for the
    # previous one in its own duration (the wall time above ran with the engine's setting, "pdl").
    with llm.eager(), pdl(False):
        undo = instrument(llm)
        llm.step()  # warm-up of the eager path
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        with profile(activities=acts) as prof:
            for _ in range(args.steps):
                with record_function("mv::step"):
                    llm.step()
                    sync()
        undo()
    steps = [s for s in step_kernels(prof, on_gpu) if s]
    n = len(steps)
    rows, per_name, per_op = [], collections.defaultdict(lambda: [0, 0.0]), collections.defaultdict(lambda: [0, 0.0])
    for s in steps:
        for name, cat, op, t0, t1 in s:
            per_name[(name, cat)][0] += 1
            per_name[(name, cat)][1] += t1 - t0
            per_op[(op, cat)][0] += 1
            per_op[(op, cat)][1] += t1 - t0
    for (name, cat), (calls, us) in sorted(per_name.items(), key=lambda kv: -kv[1][1]):
        rows.append(dict(kind="kernel", fusion=fusion, name=name, category=cat, calls_per_step=calls / n,
                         us_per_step=us / n))
    for (op, cat), (calls, us) in sorted(per_op.items(), key=lambda kv: -kv[1][1]):
        rows.append(dict(kind="op", fusion=fusion, op=op or "(unlabelled)", category=cat,
                         kernels_per_step=calls / n, us_per_step=us / n))
    last, t_first = steps[-1], steps[-1][0][3]
    kernels = sum(len(s) for s in steps) / n
    rows.append(dict(kind="step", fusion=fusion, batch_size=args.batch, context=args.context, num_layers=layers,
                     steps_profiled=n, kernels_per_step=kernels, kernels_per_layer=kernels / layers,
                     gpu_us_per_step=sum(t1 - t0 for s in steps for *_, t0, t1 in s) / n,
                     wall_us_per_step=1e6 * statistics.median(walls), wall_us_min=1e6 * min(walls),
                     wall_us_max=1e6 * max(walls), wall_steps=len(walls), cuda_graphs=graphs,
                     pdl=llm.config.pdl and PDL_ALLOWED,
                     dtype=str(llm.config.torch_dtype).replace("torch.", ""), device=llm.config.device,
                     model={k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                         "num_key_value_heads", "head_dim", "vocab_size")},
                     itemsize=llm.config.torch_dtype.itemsize,
                     timeline=[dict(name=k[0], category=k[1], op=k[2], start_us=k[3] - t_first, end_us=k[4] - t_first)
                               for k in last], **replay))
    llm.shutdown()  # frees the KV cache and graphs before the next mode's engine sizes its own
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--fusion", default=",".join(FUSION_MODES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="decode steps profiled (and timed)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--enforce-eager", action="store_true", help="time the wall clock without CUDA graphs too")
    parser.add_argument("--out", default="data/results")
    parser.add_argument("--tag", default="", help="suffix of the result file's benchmark name, e.g. -run8")
    args = parser.parse_args(argv)
    rows, skipped = [], {}
    for fusion in args.fusion.split(","):
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the previous mode's engine
        try:
            rows += profile_mode(args, fusion)
        except NotImplementedError as e:  # a mode the engine rejects
            skipped[fusion] = str(e)
            print(f"skipping fusion={fusion}: {e}")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    for r in rows:
        if r["kind"] == "step":
            print(f"{r['fusion']:<12} {r['kernels_per_step']:6.0f} kernels/step  "
                  f"{r['gpu_us_per_step']:9.1f} us kernels  "
                  f"{r['wall_us_per_step']:9.1f} us wall ({'graphs' if r['cuda_graphs'] else 'eager'})"
                  + (f"  replayed: {r['replay_busy_us_per_step']:.1f} us busy in a "
                     f"{r['replay_span_us_per_step']:.1f} us span" if r.get("replay_span_us_per_step") else ""))
    on_gpu = torch.cuda.is_available() and args.device != "cpu"
    return write_result("decode_profile" + args.tag, rows, args.out, "python -m minivllm.profile", argv,
                        device="cuda" if on_gpu else "cpu", ceilings=measure_ceilings() if on_gpu else None,
                        profiled_eager=True, skipped_fusion_modes=skipped)


if __name__ == "__main__":
    main()
