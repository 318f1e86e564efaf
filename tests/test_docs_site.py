"""The built docs site renders: screenshots of a few pages in headless Chromium (scripts/screenshot_docs.py).

Skipped where no Chromium is installed (.ci/run installs Debian's). What is checked, per page, in pixels: the
top bar is drawn in the theme's colour, the left navigation holds text, the page has the grey background of
code blocks, and training-stability shows its plotted pictures (coloured curve pixels)."""

from __future__ import annotations

import importlib.util

import pytest

from script_support import load_script

shots = load_script("scripts/screenshot_docs.py")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shots.chromium() is None, reason="no Chromium installed"),
              pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed")]


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    from PIL import Image

    out = tmp_path_factory.mktemp("shots")
    assert shots.main([str(out)]) == 0
    return {page: Image.open(out / f"{page}.png").convert("RGB") for page in shots.PAGES}


def _count(image, box, test) -> int:
    region = image.crop(box)
    return sum(1 for px in region.getdata() if test(px))


def _blueish(px):
    r, g, b = px
    return b > 150 and b > r + 40


def _dark(px):
    return sum(px) < 300


def _code_grey(px):
    r, g, b = px
    return 235 <= r <= 250 and abs(r - g) < 4 and abs(g - b) < 4


@pytest.mark.parametrize("page", shots.PAGES)
def test_page_draws_header_navigation_and_text(pictures, page):
    image = pictures[page]
    assert image.size == (1280, 1000)
    assert _count(image, (0, 0, 1280, 40), _blueish) > 0.8 * 1280 * 40  # the header bar
    assert _count(image, (30, 90, 260, 900), _dark) > 2000  # navigation entries
    assert _count(image, (290, 90, 990, 990), _dark) > 5000  # the page's text


def test_code_blocks_have_their_background(pictures):
    assert _count(pictures["grpo"], (290, 90, 990, 990), _code_grey) > 20000


def test_tables_draw_their_row_rules(pictures):
    # a table row is closed by a light grey rule across the content column
    image = pictures["configuration"]
    rules = [y for y in range(90, 1000)
             if _count(image, (290, y, 990, y + 1), lambda px: 200 <= px[0] < 245 and abs(px[0] - px[2]) < 8) > 600]
    assert len(rules) >= 5, rules


def test_stability_pictures_are_shown(pictures):
    # matplotlib's default blue (31, 119, 180) draws the curves; nothing else on the page has that colour
    near = _count(pictures["training-stability"], (290, 700, 990, 1000),
                  lambda px: abs(px[0] - 31) < 40 and abs(px[1] - 119) < 40 and abs(px[2] - 180) < 40)
    assert near > 200
