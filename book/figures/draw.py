"""Draws the book's five diagrams into book/figures/ (SVG). Diagrams, not measurements: no number in
them comes from a run; the sizes in them (block size 4, three requests) are picked to be readable.

    .venv/bin/python book/figures/draw.py

Writes kv_cache_block_table.svg, prefix_cache_hash_chain.svg, fused_kernel_dataflow.svg,
decode_timeline_overlap.svg and decode_step_pipeline.svg next to this file. The drawn files are
committed; rerun after a change.
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402

HERE = Path(__file__).resolve().parent
plt.rcParams.update({"font.family": "DejaVu Sans", "font.size": 10, "svg.fonttype": "none",
                     "svg.hashsalt": "minivllm-book"})  # text stays text; stable ids: diffs stay small
SEQ_COLORS = ["#4C72B0", "#DD8452", "#55A868"]
FREE = "#EEEEEE"


def box(ax, x, y, w, h, text="", fc="white", ec="#333333", fontsize=9, color="black", lw=1.0, rounded=False, **kw):
    cls = FancyBboxPatch if rounded else Rectangle
    extra = dict(boxstyle="round,pad=0.02,rounding_size=0.12") if rounded else {}
    ax.add_patch(cls((x, y), w, h, facecolor=fc, edgecolor=ec, lw=lw, **extra))
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize, color=color, **kw)


def arrow(ax, a, b, color="#333333", lw=1.2, style="-|>", ls="-", rad=0.0):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle=style, mutation_scale=12, color=color, lw=lw, ls=ls,
                                 connectionstyle=f"arc3,rad={rad}", shrinkA=2, shrinkB=2))


def canvas(w, h, xlim, ylim):
    fig, ax = plt.subplots(figsize=(w, h))
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_aspect("equal")
    ax.axis("off")
    return fig, ax


def save(fig, name):
    fig.savefig(HERE / name, bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    print("wrote", HERE / name)


def kv_cache_block_table():
    """Three sequences, their block tables, and where their tokens' K/V live in the block pool."""
    bs = 4
    seqs = [("seq 0", 6, [3, 7]), ("seq 1", 11, [0, 5, 9]), ("seq 2", 3, [2])]
    fig, ax = canvas(11, 5.2, (0, 22), (-1.2, 10))
    ax.text(0, 9.5, "Tokens of each sequence (block size 4)", fontsize=11, weight="bold")
    ax.text(10.0, 9.5, "Block tables", fontsize=11, weight="bold")
    ax.text(14.2, 9.5, "KV-cache block pool (one tensor, per layer)", fontsize=11, weight="bold")
    owner = {}
    for s, (name, ntok, table) in enumerate(seqs):
        y = 7.6 - 2.9 * s
        ax.text(0, y + 0.95, name, fontsize=9, color=SEQ_COLORS[s], weight="bold")
        for lb in range(len(table)):
            for t in range(bs):
                pos = lb * bs + t
                used = pos < ntok
                box(ax, 0.1 + pos * 0.62 + lb * 0.25, y, 0.58, 0.7, str(pos) if used else "",
                    fc=SEQ_COLORS[s] if used else "white", color="white", fontsize=7, ec="#666666", lw=0.6)
            ax.text(0.1 + lb * (4 * 0.62 + 0.25) + 1.2, y - 0.4, f"logical block {lb}", fontsize=7,
                    ha="center", color="#555555")
        # block table
        for i, b in enumerate(table):
            box(ax, 10.2 + i * 0.9, y, 0.85, 0.7, str(b), fc="white", ec=SEQ_COLORS[s], lw=1.5, fontsize=9)
            owner[b] = (s, i, min(bs, ntok - i * bs))
        arrow(ax, (9.6, y + 0.35), (10.15, y + 0.35), color=SEQ_COLORS[s])
    # pool: 12 blocks, 3 rows of 4
    for b in range(12):
        r, c = divmod(b, 4)
        x, y = 14.2 + c * 1.95, 7.0 - r * 2.6
        box(ax, x, y + 1.0, 1.8, 0.45, f"block {b}", fc="white", ec="white", fontsize=8)
        for t in range(bs):
            s, i, n = owner.get(b, (None, None, 0))
            fc = SEQ_COLORS[s] if s is not None and t < n else FREE
            box(ax, x + t * 0.45, y, 0.43, 0.9, "", fc=fc, ec="#999999", lw=0.5)
        if b not in owner:
            ax.text(x + 0.9, y + 0.45, "free", ha="center", va="center", fontsize=7, color="#888888")
    ax.text(0, -0.2, "slot of the token at position p  =  block_table[p // block_size] * block_size + p % block_size",
            fontsize=10, family="DejaVu Sans Mono")
    ax.text(0, -1.0, "e.g. seq 1, p = 9:  block_table[2] = 9,  slot = 9 * 4 + 1 = 37.   Unused slots: only the tail "
            "of each sequence's last block.   (Illustration; the engine's block size is 256 on a GPU, 16 on CPU.)",
            fontsize=8, color="#444444")
    save(fig, "kv_cache_block_table.svg")


def prefix_cache_hash_chain():
    """Full blocks are named by a hash chained over every block before them; B finds A's blocks."""
    fig, ax = canvas(11, 4.6, (0, 22), (-0.8, 9.2))
    ax.text(0, 8.6, "Prefix caching: each full block is named by a hash chained over the blocks before it",
            fontsize=11, weight="bold")
    toks_a = ["t0..t3", "t4..t7", "t8..t11", "a12 a13"]
    toks_b = ["t0..t3", "t4..t7", "t8..t11", "b12..b15", "b16"]
    y_a, y_b = 6.2, 1.2
    ax.text(0, y_a + 1.25, "request A (prefilled first)", fontsize=9, color=SEQ_COLORS[0], weight="bold")
    ax.text(0, y_b + 1.25, "request B (arrives later)", fontsize=9, color=SEQ_COLORS[1], weight="bold")
    for i, t in enumerate(toks_a):
        full = i < 3
        box(ax, 0.2 + i * 3.6, y_a, 2.6, 0.9, t, fc=SEQ_COLORS[0] if full else "white",
            color="white" if full else SEQ_COLORS[0], ec=SEQ_COLORS[0], rounded=True)
        if full:
            prev = "None" if i == 0 else f"h{i - 1}"
            ax.text(0.2 + i * 3.6 + 1.3, y_a - 0.45, f"h{i} = hash({prev}, block)", ha="center",
                    fontsize=7.5, family="DejaVu Sans Mono")
            if i:
                arrow(ax, (0.2 + (i - 1) * 3.6 + 2.62, y_a + 0.45), (0.2 + i * 3.6 - 0.02, y_a + 0.45), color="#333333")
        else:
            ax.text(0.2 + i * 3.6 + 1.3, y_a - 0.45, "partial: not hashed", ha="center", fontsize=7.5, color="#666666")
    # hash table
    tx, ty = 15.6, 3.2
    ax.text(tx, ty + 3.55, "hash_to_block_id", fontsize=9, family="DejaVu Sans Mono", weight="bold")
    for i in range(3):
        box(ax, tx, ty + 2.4 - i * 1.0, 2.0, 0.85, f"h{i}", fc="white", fontsize=9)
        box(ax, tx + 2.0, ty + 2.4 - i * 1.0, 2.6, 0.85, f"block {[4, 10, 1][i]}", fc=FREE, fontsize=9)
        arrow(ax, (0.2 + i * 3.6 + 1.3, y_a - 0.7), (tx - 0.05, ty + 2.82 - i * 1.0), color="#888888", lw=0.8,
              ls="--", rad=0.15)
    for i, t in enumerate(toks_b):
        hit = i < 3
        full = i < 4
        box(ax, 0.2 + i * 2.95, y_b, 2.5, 0.9, t, fc=SEQ_COLORS[0] if hit else (SEQ_COLORS[1] if full else "white"),
            color="white" if full else SEQ_COLORS[1], ec=SEQ_COLORS[0] if hit else SEQ_COLORS[1], rounded=True,
            fontsize=8.5)
        label = "hit: shared\nref_count 2" if hit else ("miss:\ncomputed" if full else "partial")
        ax.text(0.2 + i * 2.95 + 1.25, y_b - 0.25, label, ha="center", va="top", fontsize=7.5,
                color="#333333" if hit else "#666666")
        if hit:
            arrow(ax, (0.2 + i * 2.95 + 2.5, y_b + 0.75), (tx - 0.05, ty + 2.62 - i * 1.0), color=SEQ_COLORS[1], lw=0.9)
    ax.text(0, -0.7, "B's chain reaches the same h0, h1, h2 only if every token before and inside those blocks is "
            "equal; its first differing block breaks the chain, and everything after it is computed.",
            fontsize=8, color="#444444")
    save(fig, "prefix_cache_hash_chain.svg")


def fused_kernel_dataflow():
    """Unfused (norm kernel, then GEMM) against the fused kernel: what crosses HBM, what stays on chip."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.4))
    for ax in axes:
        ax.set_xlim(0, 12)
        ax.set_ylim(0, 10)
        ax.axis("off")
    hbm, chip = "#F3E3C3", "#D8E8F5"
    for ax, title in zip(axes, ["Unfused: add + RMSNorm kernel, then the linear (2 kernels)",
                                "Fused: one kernel (gamma folded into W' at load)"]):
        ax.text(6, 9.6, title, ha="center", fontsize=10.5, weight="bold")
        ax.add_patch(Rectangle((0.2, 6.9), 11.6, 2.2, facecolor=hbm, edgecolor="none"))
        ax.text(0.4, 8.75, "HBM", fontsize=9, weight="bold", color="#8A6D2F")
        ax.add_patch(Rectangle((0.2, 0.3), 11.6, 5.6, facecolor=chip, edgecolor="none"))
        ax.text(0.4, 5.5, "on chip: registers / shared memory", fontsize=9, weight="bold", color="#2F5F8A")
    ax = axes[0]
    for x, w, t in [(0.6, 1.2, "x"), (2.0, 1.6, "residual"), (4.2, 1.2, "h"), (5.9, 1.6, "normed"), (8.0, 1.4, "W"),
                    (10.2, 1.4, "y")]:
        box(ax, x, 7.3, w, 0.9, t, fc="white", fontsize=9)
    box(ax, 0.6, 3.8, 4.2, 1.2, "kernel 1: h = x + residual\nr = rsqrt(mean(h²) + eps)\nnormed = r · h · gamma",
        fc="white", fontsize=8, rounded=True)
    box(ax, 6.0, 1.2, 5.4, 1.6, "kernel 2 (cuBLAS): y = normed · Wᵀ\nfp32 accumulator per tile", fc="white",
        fontsize=8, rounded=True)
    arrow(ax, (1.3, 7.3), (1.6, 5.0))
    arrow(ax, (2.7, 7.3), (2.6, 5.0))
    arrow(ax, (4.0, 5.0), (4.9, 7.3), color="#C0392B")
    arrow(ax, (4.6, 5.0), (6.5, 7.3), color="#C0392B", lw=2)
    arrow(ax, (6.6, 7.3), (7.5, 2.8), color="#C0392B", lw=2)
    arrow(ax, (8.7, 7.3), (9.0, 2.8))
    arrow(ax, (10.3, 2.8), (10.9, 7.3))
    ax.text(6, 0.6, "red: the normalised copy is written to HBM and read back (2·M·K elements more), plus one launch",
            ha="center", fontsize=7.5, color="#C0392B")
    ax = axes[1]
    for x, w, t in [(0.6, 1.2, "x"), (2.0, 1.6, "residual"), (4.4, 2.4, "h (new tensor)"), (7.6, 1.4, "W'"),
                    (10.2, 1.4, "y")]:
        box(ax, x, 7.3, w, 0.9, t, fc="white", fontsize=9)
    box(ax, 0.6, 3.6, 3.6, 1.5, "K loop, per tile:\nh = x + res (rounded)\nss += Σ h²", fc="white", fontsize=8,
        rounded=True)
    box(ax, 4.8, 3.6, 3.6, 1.5, "acc += h · W'ᵀ\n(fp32, tl.dot or GEMV)", fc="white", fontsize=8, rounded=True)
    box(ax, 8.6, 1.0, 3.0, 1.8, "epilogue:\nr = rsqrt(ss/K + eps)\ny = r · acc", fc="white", fontsize=8,
        rounded=True)
    arrow(ax, (1.3, 7.3), (1.6, 5.1))
    arrow(ax, (2.7, 7.3), (2.6, 5.1))
    arrow(ax, (4.2, 4.35), (4.8, 4.35), color="#2F5F8A", lw=1.6)
    arrow(ax, (3.4, 5.1), (5.3, 7.3), color="#555555")
    ax.text(3.0, 6.1, "first column\nblock only", fontsize=7, color="#555555")
    arrow(ax, (8.3, 7.3), (7.4, 5.1))
    arrow(ax, (7.5, 3.6), (9.0, 2.8), color="#2F5F8A", lw=1.6)
    arrow(ax, (2.4, 3.6), (8.6, 2.0), color="#2F5F8A", lw=1.6, rad=0.25)
    arrow(ax, (10.6, 2.8), (10.9, 7.3))
    ax.text(6, 0.6, "blue: stays on chip (h tile, Σh², accumulator, r); HBM sees W', x, residual once, h and y once",
            ha="center", fontsize=7.5, color="#2F5F8A")
    fig.text(0.5, 0.01, "Diagram of kernels/rmsnorm_linear.py, no measurement.", ha="center", fontsize=8,
             color="#666666")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    save(fig, "fused_kernel_dataflow.svg")


def decode_timeline_overlap():
    """One kernel per projection, serial, against the same kernels whose fixed costs overlap."""
    fig, axes = plt.subplots(2, 1, figsize=(12, 4.6), sharex=True)
    kernels = [("qkv", 3.0), ("attn", 2.0), ("o_proj", 1.6), ("gate_up", 4.0), ("down", 2.6)]
    fixed = 1.6
    colors = ["#4C72B0", "#8172B3", "#55A868", "#DD8452", "#C44E52"]
    for ax, overlap in zip(axes, (False, True)):
        t = 0.0
        for (name, stream), c in zip(kernels, colors):
            start = t
            y = 0.55 if not overlap else (0.85 if kernels.index((name, stream)) % 2 == 0 else 0.15)
            h = 0.8 if not overlap else 0.6
            ax.add_patch(Rectangle((start, y), fixed, h, facecolor="white", edgecolor=c, hatch="////", lw=1))
            ax.add_patch(Rectangle((start + fixed, y), stream, h, facecolor=c, edgecolor=c))
            ax.text(start + fixed + stream / 2, y + h / 2, name, ha="center", va="center", color="white", fontsize=9)
            t = start + fixed + stream
            if overlap:
                t -= fixed  # the next kernel's launch, prologue and first loads run under this one's tail
        end = t + (fixed if overlap else 0)
        ax.set_ylim(0, 2.0)
        ax.set_xlim(-0.3, 26)
        ax.set_yticks([])
        for s in ("left", "right", "top"):
            ax.spines[s].set_visible(False)
        ax.set_title("without overlap: each kernel pays its fixed cost after the previous one ends" if not overlap else
                     "with overlap (programmatic dependent launch, or one persistent kernel): fixed costs hidden "
                     "under the previous kernel's streaming", fontsize=9.5, loc="left")
        ax.annotate("", (end, 1.6), (0, 1.6), arrowprops=dict(arrowstyle="<->", color="#333333"))
        ax.text(end / 2, 1.72, "one decoder layer", ha="center", fontsize=8)
    axes[1].set_xticks([])
    axes[1].set_xlabel("time (schematic, not to scale)")
    handles = [Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="#333333", hatch="////"),
               Rectangle((0, 0), 1, 1, facecolor="#777777")]
    axes[1].legend(handles, ["fixed cost per kernel: launch, first DRAM round trips, tail of the last wave",
                             "streaming the weights at the memory bandwidth"], fontsize=8, loc="upper right",
                   frameon=False)
    fig.text(0.5, -0.02, "Diagram, no measurement: bar lengths are illustrative (chapter 7 fits the fixed cost and "
             "the streaming rate from the kernel benchmark).", ha="center", fontsize=8, color="#666666")
    fig.tight_layout()
    save(fig, "decode_timeline_overlap.svg")


def decode_step_pipeline():
    """The host's work per decode step against the GPU's: in turn, or the next step prepared under this one."""
    prep, gpu, take = 1.7, 4.0, 1.0  # schedule + pack + launch; one graph replay; tokens and stop checks
    fig, axes = plt.subplots(2, 1, figsize=(12, 3.8), sharex=True)

    def host(ax, t, w, text, c):
        box(ax, t, 1.1, w, 0.6, text, fc=c, ec=c, color="white", fontsize=7.5)

    for ax, overlap in zip(axes, (False, True)):
        if not overlap:  # prepare, run, take the tokens, in turn
            for n in range(3):
                t = n * (prep + gpu + take)
                host(ax, t, prep, f"prepare {n + 1}", "#4C72B0")
                box(ax, t + prep, 0.2, gpu, 0.6, f"step {n + 1}", fc="#DD8452", ec="#DD8452", color="white", fontsize=8)
                host(ax, t + prep + gpu, take, f"take {n + 1}", "#55A868")
        else:  # step n + 1 is prepared and launched before the host waits for step n's tokens
            host(ax, 0, prep, "prepare 1", "#4C72B0")
            gpu_end, t = prep, prep
            for n in range(4):
                box(ax, gpu_end, 0.2, gpu, 0.6, f"step {n + 1}", fc="#DD8452", ec="#DD8452", color="white", fontsize=8)
                host(ax, t, prep, f"prepare {n + 2}", "#4C72B0")
                gpu_end += gpu
                host(ax, gpu_end, take, f"take {n + 1}", "#55A868")  # waits for step n + 1 to end
                t = gpu_end + take
        ax.text(-0.2, 1.4, "host", ha="right", va="center", fontsize=9)
        ax.text(-0.2, 0.5, "GPU", ha="right", va="center", fontsize=9)
        ax.set_xlim(-1.2, 21)
        ax.set_ylim(0, 2.1)
        ax.axis("off")
        ax.set_title("synchronous: the GPU idles while the host takes a step's tokens and prepares the next"
                     if not overlap else "overlapped (generate's loop): step N+1 is prepared and launched, its input "
                     "tokens read on the GPU from step N's output, before the host waits for step N", fontsize=9.5,
                     loc="left")
    fig.text(0.5, -0.02, "Diagram, no measurement: bar lengths are illustrative.", ha="center", fontsize=8,
             color="#666666")
    fig.tight_layout()
    save(fig, "decode_step_pipeline.svg")

if __name__ == "__main__":
    kv_cache_block_table()
    prefix_cache_hash_chain()
    fused_kernel_dataflow()
    decode_timeline_overlap()
    decode_step_pipeline()
