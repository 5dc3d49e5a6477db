"""Every page of a built book as a reader's browser shows it: headless Chromium screenshots, one PNG a page.

    python book/screenshots.py                       # _build/html -> _build/screenshots/<page>.png
    python book/screenshots.py --html DIR --out DIR --width 1280 --height 9000

Chromium (Debian's ``chromium`` package, or CHROMIUM=/path/to/chrome) renders each page at a fixed window
size; pages longer than ``--height`` are cut there, so pick a height that holds the longest chapter.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# A closed network: without these flags Chromium keeps trying to reach Google's hosts.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def chromium() -> str:
    found = os.environ.get("CHROMIUM") or next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                                                "google-chrome"))), None)
    if not found:
        raise FileNotFoundError("no Chromium: install Debian's chromium package or set CHROMIUM=/path/to/chrome")
    return found


def screenshot(browser: str, page: Path, png: Path, width: int, height: int, profile: str) -> None:
    run = subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                          f"--screenshot={png}", page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    if run.returncode != 0 or not png.exists():
        raise RuntimeError(f"Chromium failed on {page}: {run.stderr[-2000:]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--html", default=str(ROOT / "_build" / "html"), help="a built book's html directory")
    p.add_argument("--out", default=str(ROOT / "_build" / "screenshots"))
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=9000)
    args = p.parse_args(argv)
    html, out = Path(args.html), Path(args.out)
    pages = sorted(html.glob("book/*.html"))  # index.html only redirects to the first page
    if not pages:
        raise FileNotFoundError(f"no pages under {html}/book: build the book first (make book)")
    out.mkdir(parents=True, exist_ok=True)
    browser = chromium()
    with tempfile.TemporaryDirectory() as profile:
        for page in pages:
            png = out / f"{page.stem}.png"
            screenshot(browser, page, png, args.width, args.height, profile)
            print(f"{png} ({png.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
