"""Screenshots of a few pages of the built docs site, in headless Chromium, to see that it renders.

    python scripts/screenshot_docs.py OUT_DIR [--site SITE_DIR]

Builds the site with mkdocs (unless --site names a built one), then writes OUT_DIR/<page>.png for each page
in PAGES. tests/test_docs_site.py checks the pictures (navigation drawn, code blocks, tables, images).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# One page per kind of content: navigation + prose, code blocks, a generated table, embedded pictures.
PAGES = ("index", "grpo", "configuration", "training-stability")


def chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


def build_site(dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(dest)], cwd=ROOT,
                   check=True, capture_output=True)
    return dest


def screenshot(site: Path, page: str, out: Path, browser: str) -> Path:
    html = site / "index.html" if page == "index" else site / page / "index.html"
    png = out / f"{page}.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1280,1000", f"--screenshot={png}", html.as_uri()],
                   check=True, capture_output=True, timeout=120)
    return png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--site", type=Path, default=None)
    args = p.parse_args(argv)
    browser = chromium()
    if browser is None:
        print("no Chromium found (apt-get install chromium)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    site = args.site or build_site(Path(tempfile.mkdtemp()) / "site")
    for page in PAGES:
        print(screenshot(site, page, args.out, browser))
    return 0


if __name__ == "__main__":
    sys.exit(main())
