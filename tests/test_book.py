"""The book's sources are well-formed, and the smoke build of the whole book succeeds."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")  # not on the GPU box

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_chapters_are_numbered_in_order_and_all_in_the_toc():
    # ten chapters from the architecture to the benchmarks, then the findings
    assert [p.stem[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(1, 12)]
    toc = (ROOT / "_toc.yml").read_text()
    assert all(f"book/{p.stem}\n" in toc for p in NOTEBOOKS), "every chapter is in _toc.yml"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_source(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", "needs a python3 kernelspec for papermill"
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{len(tagged)} cells tagged 'parameters' (need exactly one)"
    names = set(re.findall(r"^(\w+)\s*=", tagged[0].source, re.M))
    assert {"profile", "device", "results_dir"} <= names, f"parameters cell defines only {sorted(names)}"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any(c.get("outputs") or c.get("execution_count") for c in code), "sources carry no outputs"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "opens with a # title"


def test_toc_lists_exactly_the_notebooks():
    toc = (ROOT / "_toc.yml").read_text()
    chapters = re.findall(r"file:\s*book/(\d\d_\w+)", toc)
    assert chapters == [p.stem for p in NOTEBOOKS]
    for page in re.findall(r"file:\s*book/([a-z]\w*)\s*$", toc, re.M) + [re.search(r"root:\s*book/(\w+)", toc)[1]]:
        assert (ROOT / "book" / f"{page}.md").exists(), f"book/{page}.md listed in _toc.yml is missing"


def test_load_results_keeps_tagged_runs_apart(tmp_path):
    from minivllm.book import load_results

    def write(benchmark, gpu):
        rows = [{"benchmark": benchmark}]
        (tmp_path / f"{benchmark}-{gpu}.json").write_text(json.dumps({"benchmark": benchmark, "rows": rows}))

    write("engine_latency", "nvidia-h100-80gb-hbm3")
    write("engine_latency-qwen3-8b", "nvidia-h100-80gb-hbm3")  # newer, and matches engine_latency-*.json
    assert load_results("engine_latency", tmp_path).rows["benchmark"].tolist() == ["engine_latency"]
    assert load_results("engine_latency-qwen3-8b", tmp_path).rows["benchmark"].tolist() == ["engine_latency-qwen3-8b"]
    assert load_results("ttft", tmp_path) is None


def test_step_ms_picks_the_engine_batch_and_pdl_row(tmp_path):
    from minivllm.book import load_results, step_ms

    rows = [dict(engine="minivllm", batch_size=1, pdl=False, latency_ms=1.0, samples_ms=[1.0, 0.9, 1.2], floor_ms=0.4),
            dict(engine="minivllm", batch_size=1, pdl=True, latency_ms=0.8, samples_ms=[0.8, 0.7], floor_ms=0.4),
            dict(engine="minivllm", batch_size=8, pdl=False, latency_ms=2.0, samples_ms=[2.0], floor_ms=0.5),
            dict(engine="nano-vllm", batch_size=1, pdl=False, latency_ms=3.0, samples_ms=[3.0, 3.5])]
    (tmp_path / "engine_latency-gpu.json").write_text(json.dumps({"benchmark": "engine_latency", "rows": rows}))
    res = load_results("engine_latency", tmp_path)
    assert step_ms(res) == (1.0, 0.9, 1.2, 0.4)
    assert step_ms(res, pdl=True) == (0.8, 0.7, 0.8, 0.4)
    assert step_ms(res, batch=8) == (2.0, 2.0, 2.0, 0.5)
    latency, fastest, slowest, floor = step_ms(res, engine="nano-vllm")
    assert (latency, fastest, slowest) == (3.0, 3.0, 3.5) and floor != floor  # NaN: the peer's row has no floor


@pytest.mark.slow
def test_smoke_build(tmp_path):
    """The whole book in the smoke profile, executed and built with warnings as errors."""
    out = tmp_path / "book"
    proc = subprocess.run([sys.executable, str(ROOT / "book" / "build.py"), "--profile", "smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    html = out / "_build" / "html"
    for nb in NOTEBOOKS:
        assert (html / "book" / f"{nb.stem}.html").exists(), f"no HTML for {nb.stem}"
    assert not re.search(r"WARNING:", log), "\n".join(line for line in log.splitlines() if "WARNING:" in line)
    for slug in (p.stem for p in NOTEBOOKS):
        assert re.search(rf"{slug} \.\.\. ok", log), f"{slug} not executed"


def book_build():
    """book/build.py as a module (book/ is not a package)."""
    sys.path.insert(0, str(ROOT / "book"))
    try:
        import build
    finally:
        sys.path.remove(str(ROOT / "book"))
    return build


def test_build_rejects_chapters_that_print_rerun_notes_or_tracebacks(tmp_path):
    output_problems = book_build().output_problems
    v4 = nbformat.v4

    def problems(*outputs):
        cell = v4.new_code_cell("x")
        cell.outputs = list(outputs)
        path = tmp_path / "nb.ipynb"
        nbformat.write(v4.new_notebook(cells=[v4.new_markdown_cell("# t"), cell]), path)
        return output_problems(path)

    assert problems(v4.new_output("stream", name="stdout", text="all good\n")) == []
    assert problems(v4.new_output("display_data", data={"text/markdown": "> no sweep rows: rerun with `--sweep`."}))
    assert problems(v4.new_output("stream", name="stderr", text="Traceback (most recent call last):\n  ...\n"))
    assert problems(v4.new_output("error", ename="ValueError", evalue="bad", traceback=[]))


def test_build_names_published_chapters_executed_from_an_older_source(tmp_path):
    changed_cells = book_build().changed_cells
    v4 = nbformat.v4
    source = v4.new_notebook(cells=[v4.new_markdown_cell("# 1. t"), v4.new_code_cell("profile = 'auto'"),
                                    v4.new_code_cell("x = 1")])
    published = v4.new_notebook(cells=[source.cells[0], source.cells[1], v4.new_code_cell("profile = 'full'"),
                                       v4.new_code_cell("x = 1")])
    published.cells[2].metadata["tags"] = ["injected-parameters"]  # papermill's: not a change of the source
    paths = {name: tmp_path / f"{name}.ipynb" for name in ("source", "published")}
    for name, nb in (("source", source), ("published", published)):
        nbformat.write(nb, paths[name])
    assert changed_cells(paths["published"], paths["source"]) == 0
    source.cells[0].source = "# 1. A new title"
    source.cells.append(v4.new_markdown_cell("a new section"))
    nbformat.write(source, paths["source"])
    assert changed_cells(paths["published"], paths["source"]) == 2


def test_no_source_points_readers_at_files_outside_the_repository():
    """The book's own pages and chapter sources name no file a reader cannot find."""
    banned = re.compile(r"BENCHMARKS\.md|(?<!data/)anchors/h100|environment notes|the issue'?s?\b|shared/")
    pages = [p for p in (ROOT / "book").glob("*.md")] + NOTEBOOKS
    offenders = [f"{p.name}: {m.group(0)}" for p in pages for m in banned.finditer(p.read_text())]
    assert not offenders, offenders


def test_chapter_titles_are_numbered():
    for i, path in enumerate(NOTEBOOKS, 1):
        title = nbformat.read(path, as_version=4).cells[0].source.splitlines()[0]
        assert title.startswith(f"# {i}. "), title


def test_trace_steps_records_every_step_and_restores_the_overlap():
    # generate's overlapped decode steps bypass schedule(): the trace runs them in turn, so that one request
    # of 6 tokens shows its prefill and its 5 decode steps, and the engine overlaps again afterwards.
    from minivllm import LLM, SamplingParams, book
    from tests.helpers import random_prompts, tiny_checkpoint
    llm = LLM(tiny_checkpoint(), device="cpu")
    with book.trace_steps(llm) as tr:
        llm.generate(random_prompts([9], seed=1), SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert list(tr.frame().kind) == ["prefill"] + ["decode"] * 5
    assert llm.overlap


def test_hover_svg_gives_each_artist_its_tooltip():
    # The book's hover figures: inline SVG whose artists carry <title> tooltips (escaped), no JavaScript.
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minivllm.book import hover_svg
    fig, ax = plt.subplots()
    points = [ax.plot([i], [i], "o")[0] for i in range(12)]  # hover-1 and hover-10 must not be confused
    svg = hover_svg(fig, {p: f"point {i} <{i}> & more" for i, p in enumerate(points)})
    assert svg.startswith("<svg") and "<script" not in svg
    titles = re.findall(r'<g id="hover-\d+-(\d+)"[^>]*>\s*<title>([^<]*)</title>', svg)
    assert [(int(i), t) for i, t in titles] == [(i, f"point {i} &lt;{i}&gt; &amp; more") for i in range(12)]
    other = plt.figure()
    stray = other.add_subplot().plot([0], [0])[0]  # an artist of another figure
    with pytest.raises(ValueError, match="not in the SVG"):
        hover_svg(fig, {stray: "x"})
    plt.close(fig)
    plt.close(other)
