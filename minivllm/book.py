"""Small helpers every chapter of the book calls: where it runs, which model, which results.

    from minivllm import book
    S = book.setup(profile, device, model_dir, results_dir)   # prints the machine banner
    res = book.load_results("engine_throughput", S.results_dir)
    if res is None:
        book.missing("engine_throughput", "python -m minivllm.bench throughput --model checkpoints/qwen3-0.6b")

Heavy code lives in the packages; notebooks call it and plot.
"""
from __future__ import annotations

import datetime
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from minivllm.results import hardware as local_hardware

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PRESET = {"smoke": "qwen3-tiny", "full": "qwen3-0.6b"}


def _resolve(path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else ROOT / path


@dataclass
class Setup:
    profile: str                    # 'smoke' (tiny model, CPU, seconds) | 'full' (GPU, Qwen3-0.6B shapes)
    device: str                     # 'cpu' | 'cuda'
    model_dir: str
    results_dir: Path
    root: Path = field(default=ROOT)

    def checkpoint(self, preset: str) -> str:
        """The directory of an embedded checkpoint preset, made on first use (seeded random weights)."""
        return checkpoint(preset, self.device)

    @property
    def smoke(self) -> bool:
        return self.profile == "smoke"


def checkpoint(preset: str, device: str = "cpu") -> str:
    out = ROOT / "checkpoints" / preset
    if not (out / "config.json").exists() or not any(out.glob("*.safetensors")):
        from minivllm.make_checkpoint import make_checkpoint
        make_checkpoint(preset, str(out), device=device)
    return str(out)


def setup(profile: str = "auto", device: str = "auto", model_dir: str | None = None,
          results_dir: str | os.PathLike = "data/results") -> Setup:
    import torch
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cuda = torch.cuda.is_available()
    if profile == "auto":
        profile = "full" if cuda else "smoke"
    if profile not in ("smoke", "full"):
        raise ValueError(f"profile must be 'auto', 'smoke' or 'full', got {profile!r}")
    if device == "auto":
        device = "cuda" if cuda else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if model_dir is None:
        model_dir = checkpoint(DEFAULT_PRESET[profile], device)
    s = Setup(profile, device, str(model_dir), _resolve(results_dir))
    hw = local_hardware(device)
    where = (f"{hw['gpu']} · driver {hw['driver']} · CUDA {hw['cuda']}" if "gpu" in hw
             else f"CPU {hw['cpu']} · {hw['cores']} cores")
    print(f"machine      {where}\n"
          f"software     torch {hw['torch']} · triton {hw['triton']} · transformers {hw['transformers']}\n"
          f"profile      {profile} (device {device}, model {Path(model_dir).name})\n"
          f"date         {datetime.date.today().isoformat()}")
    return s


@dataclass
class Results:
    name: str
    rows: "pandas.DataFrame"  # noqa: F821
    hardware: dict
    command: str
    date: str
    git_commit: str | None
    path: Path
    ceilings: dict | None = None  # the GPU's measured copy bandwidth and matmul rate, where the run measured them
    failed_peers: dict | None = None  # peer -> why it has no rows in this run

    @property
    def label(self) -> str:
        return machine_label(self.hardware)


def load_results(name: str, results_dir: str | os.PathLike = "data/results", gpu: str | None = None) -> Results | None:
    """``<results_dir>/<name>-<gpu slug>.json`` as a DataFrame: of the files whose slug contains
    ``gpu`` (e.g. "h100" for the first edition's runs), or of all, the newest by its date. None when
    there is none. A tagged run of the same benchmark (``engine_latency-qwen3-8b-<gpu>.json``) is
    another name: files are matched on their "benchmark" field."""
    import pandas as pd
    results_dir = _resolve(results_dir)
    docs = {p: json.loads(p.read_text()) for p in sorted(results_dir.glob(f"{name}-*.json"))}
    files = [p for p, doc in docs.items() if doc.get("benchmark") == name
             and (gpu is None or gpu in p.name[len(name) + 1:].lower())]
    if not files:
        return None
    path = max(files, key=lambda p: (docs[p].get("date", ""), p.stat().st_mtime))
    doc = docs[path]
    return Results(name, pd.DataFrame(doc.get("rows", [])), doc.get("hardware", {}), doc.get("command", ""),
                   doc.get("date", ""), doc.get("git_commit"), path, doc.get("ceilings"), doc.get("failed_peers"))


def machine_label(hardware: dict) -> str:
    """'NVIDIA H100 80GB HBM3 · driver 580.159.04 · torch 2.11.0+cu130 · triton 3.6.0'."""
    hardware = hardware or {}
    parts = [hardware.get("gpu") or (f"CPU {hardware['cpu']}" if hardware.get("cpu") else "unknown machine")]
    if hardware.get("driver"):
        parts.append(f"driver {hardware['driver']}")
    for key in ("torch", "triton"):
        if hardware.get(key):
            parts.append(f"{key} {hardware[key]}")
    return " · ".join(parts)


_HOVER_CALLS = itertools.count()


def hover_svg(fig, tips: dict) -> str:
    """``fig`` as inline SVG in which hovering over an artist of ``tips`` ({artist: text}) shows its text:
    each artist's group gets an SVG ``<title>``, which browsers show as a tooltip. No JavaScript, so the book
    builds offline and a page gains only the figure's SVG."""
    import io
    import re
    from xml.sax.saxutils import escape
    call = next(_HOVER_CALLS)  # ids unique across calls: an artist keeps the gid an earlier call gave it
    for i, artist in enumerate(tips):
        artist.set_gid(f"hover-{call}-{i}")
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    svg = buf.getvalue()
    for i, text in enumerate(tips.values()):
        svg, found = re.subn(f'(<g id="hover-{call}-{i}"[^>]*>)',
                             lambda m, t=text: m.group(1) + f"<title>{escape(t)}</title>", svg, count=1)
        if not found:
            raise ValueError(f"hover_svg: artist {i} ({text!r}) is not in the SVG")
    return svg[svg.index("<svg"):]


def show_with_hover(fig, tips: dict) -> None:
    """Displays ``hover_svg(fig, tips)`` as HTML (the book renders it inline) and closes ``fig``."""
    import matplotlib.pyplot as plt
    from IPython.display import HTML, display
    display(HTML(hover_svg(fig, tips)))
    plt.close(fig)


def missing(name: str, command: str) -> None:
    """A visible note in place of a figure whose result file is absent (the notebook goes on)."""
    text = (f"**No results file for `{name}` yet**: produce it with `{command}` on a GPU "
            f"(it writes `data/results/{name}-<gpu>.json`), then rebuild the book.")
    try:
        from IPython.display import Markdown, display
        display(Markdown("> " + text))
    except ImportError:
        print(text)


def model_config(preset: str, **overrides):
    """The engine's ModelConfig of an embedded preset, without writing any weights (e.g. 'qwen3-8b')."""
    import tempfile
    from minivllm.config import ModelConfig
    from minivllm.make_checkpoint import write_config
    with tempfile.TemporaryDirectory() as tmp:
        write_config(preset, tmp, **overrides)
        return ModelConfig.from_dir(tmp)


class trace_steps:
    """Records every scheduler step of ``llm`` while active: which sequences ran, prefill or
    decode, tokens each, queue lengths, free KV blocks and preemptions so far. The steps run one
    after another while it is active (no overlap of the host with the device).

        with book.trace_steps(llm) as tr:
            llm.generate(prompts, params, use_tqdm=False)
        tr.frame()   # one row per (step, sequence)
    """

    def __init__(self, llm):
        self.llm, self.rows, self.steps = llm, [], 0

    def __enter__(self):
        sched = self.llm.scheduler
        original = self._original = sched.schedule
        # Every step through schedule(), in turn: generate's overlapped decode steps bypass it.
        self._overlap, self.llm.overlap = self.llm.overlap, False

        def schedule():
            seqs, num_new, is_prefill = original()
            bm = sched.block_manager
            for seq, n in zip(seqs, num_new):
                self.rows.append(dict(step=self.steps, kind="prefill" if is_prefill else "decode", seq_id=seq.seq_id,
                                      tokens=n, computed_before=seq.num_computed_tokens, blocks=len(seq.block_table),
                                      running=len(sched.running), waiting=len(sched.waiting),
                                      free_blocks=bm.num_free_blocks, preemptions=sched.num_preemptions))
            self.steps += 1
            return seqs, num_new, is_prefill

        sched.schedule = schedule
        return self

    def __exit__(self, *exc):
        del self.llm.scheduler.schedule  # back to the class's method
        self.llm.overlap = self._overlap
        return False

    def frame(self):
        import pandas as pd
        return pd.DataFrame(self.rows)


def ladder(modes) -> list[str]:
    """The fusion modes present, in the ladder's order (``FUSION_MODES``)."""
    from minivllm.config import FUSION_MODES
    present = set(modes)
    return [m for m in FUSION_MODES if m in present]


def step_ms(res: Results, batch: int = 1, engine: str = "minivllm", pdl: bool | None = None) -> tuple:
    """(median, fastest, slowest sample, floor) in ms of the first row of ``res`` for ``engine`` at ``batch``
    (and with PDL on or off, where ``pdl`` says which); the floor is NaN (None if no row has one) where this row
    has none."""
    rows = res.rows[(res.rows.engine == engine) & (res.rows.batch_size == batch)]
    if pdl is not None:
        rows = rows[rows.pdl == pdl]
    r = rows.iloc[0]
    return r.latency_ms, min(r.samples_ms), max(r.samples_ms), r.get("floor_ms")


def gain(base: dict, other: dict) -> tuple[float, float, float]:
    """``1 - other / base`` of two result rows' medians, and its range over their samples: the least and
    the most the gain can be if any sample of one is paired with any sample of the other."""
    g = 1 - other["latency_ms"] / base["latency_ms"]
    low = 1 - max(other["samples_ms"]) / min(base["samples_ms"])
    high = 1 - min(other["samples_ms"]) / max(base["samples_ms"])
    return g, low, high


def rung_gains(rows, pairs=None):
    """Per batch size (and prompt length), the gain of each rung of the fusion ladder over the rung below,
    of ``full`` over ``off`` and over ``eager_elementwise``, and of ``full`` over each peer engine: one row
    each with the median gain, its sample range, and whether the whole range has one sign ("real")."""
    import pandas as pd
    ours = rows[rows.engine == "minivllm"]
    modes = ladder(ours.fusion.unique())
    pairs = pairs or ([(a, b) for a, b in zip(modes, modes[1:])]
                      + [(m, "full") for m in ("eager_elementwise", "off") if m in modes and "full" in modes])
    out = []
    for (batch, plen), g in rows.groupby(["batch_size", "seq_len"]):
        by = {(r.engine if r.engine != "minivllm" else r.fusion): r._asdict() for r in g.itertuples()}
        peer_pairs = [(e, "full") for e in by if e not in modes and "full" in by]
        for base, mode in pairs + peer_pairs:
            if base in by and mode in by:
                v, low, high = gain(by[base], by[mode])
                out.append(dict(batch_size=batch, seq_len=plen, comparison=f"{base} -> {mode}", gain=v, low=low,
                                high=high, real=low > 0 or high < 0))
    return pd.DataFrame(out)
