"""Executes the chapters with papermill, then builds the HTML with warnings as errors.

    python book/build.py                      # auto: smoke on a CPU machine, full + --publish on a GPU box
    python book/build.py --profile smoke      # tiny model on CPU into _build/smoke/, HTML in _build/smoke/_build/html
    python book/build.py --publish            # full profile on the GPU: executed notebooks -> book/NN_*.ipynb
    python book/build.py --profile smoke --results /tmp/fake_results --out /tmp/smokebook

notebooks/NN_slug.ipynb are the sources (no outputs). A scratch build stages a copy of the book's
pages so it builds standalone and never touches book/*.ipynb, the published edition. The
published edition's HTML is built too, at _build/html, from the book/NN_*.ipynb that exist.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["_config.yml", "_toc.yml", "book/*.md", "book/*.bib", "book/figures"]


def toc_files(book_dir: Path = ROOT) -> list[str]:
    """The pages _toc.yml lists (book/<name>), in order."""
    return re.findall(r"file:\s*book/(\w+)", (book_dir / "_toc.yml").read_text())


def toc_chapters() -> list[str]:
    return [f for f in toc_files() if re.match(r"\d\d_", f)]


def absent(book_dir: Path) -> list[str]:
    return [f for f in toc_files(book_dir) if not any((book_dir / "book" / f"{f}{ext}").exists()
                                                      for ext in (".md", ".ipynb"))]


def execute(slugs, out: Path, profile: str, device: str, results_dir: Path) -> bool:
    import papermill as pm
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore:IProgress not found"}
    os.environ.update(env)  # the kernel inherits this process's environment
    params = dict(profile=profile, device=device, results_dir=str(results_dir))
    start = time.time()
    for i, slug in enumerate(slugs, 1):
        t0 = time.time()
        print(f"[{i}/{len(slugs)}] {slug} ...", end=" ", flush=True)
        try:
            pm.execute_notebook(ROOT / "notebooks" / f"{slug}.ipynb", out / f"{slug}.ipynb", parameters=params,
                                kernel_name="python3", cwd=str(ROOT), progress_bar=False, log_output=False)
        except pm.PapermillExecutionError as e:
            print(f"FAILED after {time.time() - t0:.0f} s")
            print(f"\nchapter {slug} failed in cell {e.cell_index} (execution count {e.exec_count}):\n"
                  f"{e.source}\n---\n{e.ename}: {e.evalue}\n\n"
                  f"the executed notebook with the traceback: {out / (slug + '.ipynb')}", file=sys.stderr)
            return False
        problems = output_problems(out / f"{slug}.ipynb")
        if problems:
            print(f"FAILED after {time.time() - t0:.0f} s")
            print(f"\nchapter {slug} ran, but its outputs show a problem:\n  " + "\n  ".join(problems) +
                  f"\n\nthe executed notebook: {out / (slug + '.ipynb')}", file=sys.stderr)
            return False
        print(f"ok {time.time() - t0:.1f} s", flush=True)
        tidy(out / f"{slug}.ipynb")
    print(f"executed {len(slugs)} chapters ({profile} profile, {device}) in {time.time() - start:.0f} s")
    return True


# Text that must never reach a reader: a note telling them to rerun something, or a traceback.
BAD_OUTPUT = re.compile(r"rerun with|Traceback \(most recent call last\)")


def output_problems(path: Path) -> list[str]:
    """What an executed chapter shows that it must not: error outputs (a cell that raised, even where
    papermill went on), tracebacks and 'rerun with ...' notes in any output. Empty when clean."""
    import nbformat
    nb = nbformat.read(path, as_version=4)
    problems = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                problems.append(f"cell {i}: {out.get('ename')}: {out.get('evalue')}")
                continue
            texts = [out.get("text", "")] + [v for k, v in out.get("data", {}).items() if k.startswith("text/")]
            for text in texts:
                text = "".join(text) if isinstance(text, list) else str(text)
                m = BAD_OUTPUT.search(text)
                if m:
                    line = next(row for row in text.splitlines() if m.group(0) in row)
                    problems.append(f"cell {i} prints {line.strip()[:160]!r}")
                    break
    return problems


def changed_cells(published: Path, source: Path) -> int:
    """How many cells of the source notebook the published execution of it no longer matches (the cell papermill
    injected aside): 0 when the published chapter is an execution of the source as it is now."""
    import nbformat

    def sources(path, skip_injected):
        nb = nbformat.read(path, as_version=4)
        return [c.source for c in nb.cells
                if not (skip_injected and "injected-parameters" in c.metadata.get("tags", []))]
    old, new = sources(published, True), sources(source, False)
    return sum(a != b for a, b in zip(old, new)) + abs(len(old) - len(new))


def tidy(path: Path):
    """In the HTML, fold the parameters cell away and drop the cell papermill injected (the
    banner each chapter prints says which profile and device ran)."""
    import nbformat
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        tags = cell.metadata.setdefault("tags", [])
        if "parameters" in tags:
            tags.append("hide-cell")
        if "injected-parameters" in tags:
            tags.append("remove-cell")
    nbformat.write(nb, path)


def stage(book_dir: Path):
    """Copy the book's pages next to executed notebooks so book_dir builds standalone."""
    for pattern in PAGES:
        for src in ROOT.glob(pattern):
            dst = book_dir / src.relative_to(ROOT)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True)
            else:
                shutil.copy2(src, dst)


def build_html(book_dir: Path, out_dir: Path) -> bool:
    t0 = time.time()
    try:
        import jupyter_book  # noqa: F401
    except ImportError:  # e.g. the GPU box: publish there, build the HTML on any other machine
        print(f"jupyter-book is not installed here: HTML of {book_dir} not built (run `make book` elsewhere)")
        return True
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(book_dir), "--path-output", str(out_dir),
           "--warningiserror", "--keep-going", "--quiet"]
    if not Path(cmd[0]).exists():
        cmd[:1] = [sys.executable, "-m", "jupyter_book.cli.main"]
    ok = subprocess.run(cmd, cwd=book_dir).returncode == 0
    html = out_dir / "_build" / "html"
    print(f"HTML {'built' if ok else 'FAILED (warnings are errors; see above)'}: {html}/index.html "
          f"({time.time() - t0:.0f} s)", flush=True)
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", choices=["auto", "smoke", "full"], default="auto")
    p.add_argument("--publish", action="store_true",
                   help="full profile on the GPU; write the executed notebooks to book/ (the published edition)")
    p.add_argument("--out", default=None, help="scratch book directory (default _build/<profile>)")
    p.add_argument("--results", default="data/results", help="results_dir passed to the chapters")
    p.add_argument("--chapters", default=None, help="comma-separated slug prefixes, e.g. 01,03 (default: all)")
    args = p.parse_args(argv)

    if args.profile == "auto":
        import torch
        args.publish = args.publish or torch.cuda.is_available()
        args.profile = "full" if torch.cuda.is_available() else "smoke"
    if args.publish and args.profile != "full":
        p.error("--publish executes the full profile (on the GPU)")
    slugs = [s for s in toc_chapters() if (ROOT / "notebooks" / f"{s}.ipynb").exists()]
    for s in sorted(set(toc_chapters()) - set(slugs)):
        print(f"note: _toc.yml lists {s} but notebooks/{s}.ipynb does not exist yet: left out")
    if args.chapters:
        slugs = [s for s in slugs if s.split("_")[0] in args.chapters.split(",")]
    device = "cuda" if args.profile == "full" else "cpu"
    out = Path(args.out or ROOT / "_build" / ("publish" if args.publish else args.profile)).resolve()
    if out.exists():
        shutil.rmtree(out)
    (out / "book").mkdir(parents=True)
    results = Path(args.results) if Path(args.results).is_absolute() else ROOT / args.results
    if not execute(slugs, out / "book", args.profile, device, results):
        return 1
    stage(out)
    if args.publish:  # only a complete, successful run replaces the published edition
        for s in slugs:
            shutil.copy2(out / "book" / f"{s}.ipynb", ROOT / "book" / f"{s}.ipynb")
        print(f"published {len(slugs)} executed notebooks to book/")
    elif not build_html(prune_toc(out, "this scratch book"), out):
        return 1
    published = ROOT / "_build" / "published"
    chapters = sorted(ROOT.glob("book/[0-9][0-9]_*.ipynb"))
    if not chapters:
        print("no published edition yet: book/NN_*.ipynb are produced on the GPU with python book/build.py --publish")
        return 0
    if published.exists():
        shutil.rmtree(published)
    stage(published)
    for nb in chapters:
        shutil.copy2(nb, published / "book" / nb.name)
        # Only a GPU publish rewrites them: say so, do not fail here.
        for problem in output_problems(nb):
            print(f"note: the published {nb.name} shows a problem (republish on a GPU): {problem}")
        source = ROOT / "notebooks" / nb.name
        changed = changed_cells(nb, source) if source.exists() else 0
        if changed:
            print(f"note: the published {nb.name} is an execution of an older source ({changed} cell"
                  f"{'s have' if changed > 1 else ' has'} changed since): republish on a GPU")
    return 0 if build_html(prune_toc(published, "the published edition"), ROOT) else 1


def prune_toc(book_dir: Path, what: str) -> Path:
    """Leave the chapters that book_dir lacks out of its staged table of contents (and say so)."""
    missing = absent(book_dir)
    if missing:
        print(f"note: left out of {what}: {', '.join(missing)}")
        import yaml
        toc = yaml.safe_load((book_dir / "_toc.yml").read_text())
        for part in toc["parts"]:
            part["chapters"] = [c for c in part["chapters"] if c["file"].split("/")[-1] not in missing]
        toc["parts"] = [part for part in toc["parts"] if part["chapters"]]
        (book_dir / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False))
    return book_dir

if __name__ == "__main__":
    sys.exit(main())
