"""Configs of the shapes Axolotl's own examples have (written here, with the same keys and kinds of values):
`ok_*` pass `tuneforge validate`; `refused_*` and `separate_*` (multimodal, context parallelism, FSDP:
counted apart in the acceptance measurement) are refused for exactly the keys their first comment
names, as one user error (exit status 2), never a traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tuneforge.config import ConfigError

ASSETS = Path(__file__).parent / "assets" / "axolotl_like"
CONFIGS = sorted(ASSETS.glob("*.yaml"))


def _refused_keys(path: Path) -> set[str]:
    first = path.read_text().splitlines()[0]
    match = re.match(r"# refused: (.*)", first)
    return {k.strip() for k in match.group(1).split(",")} if match else set()


def test_the_assets_cover_each_kind():
    kinds = {p.name.split("_")[0] for p in CONFIGS}
    assert kinds == {"ok", "refused", "separate"} and len(CONFIGS) >= 12


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_axolotl_like_config(config, monkeypatch):
    from tuneforge.cli import app

    monkeypatch.chdir(config.parent)
    result = CliRunner().invoke(app, ["validate", str(config)])
    expected = _refused_keys(config)
    if not expected:
        assert result.exit_code == 0, result.output or repr(result.exception)
        return
    # A refusal is one ConfigError naming exactly the expected keys (main() turns it into exit status 2).
    assert isinstance(result.exception, ConfigError), repr(result.exception)
    assert {issue.path for issue in result.exception.issues} == expected
