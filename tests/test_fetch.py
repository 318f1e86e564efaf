"""fetch: the shipped examples and docs are copied verbatim, from a checkout and from a built wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tuneforge.errors import TuneforgeError

ROOT = Path(__file__).resolve().parents[1]


def tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(folder).parts)
    }


@pytest.mark.parametrize("what", ["docs", "examples"])
def test_fetch_from_checkout_copies_every_file(what, tmp_path):
    from tuneforge.fetch import run, source_dir

    assert source_dir(what) == ROOT / what
    dest = run(what, tmp_path / "got")
    assert tree(dest) == tree(ROOT / what)


def test_default_destination_is_cwd(tmp_path, monkeypatch):
    from tuneforge.fetch import run

    monkeypatch.chdir(tmp_path)
    assert run("docs") == tmp_path / "docs"
    assert tree(tmp_path / "docs") == tree(ROOT / "docs")


def test_unknown_kind_suggests_the_right_one(tmp_path):
    from tuneforge.fetch import run

    with pytest.raises(TuneforgeError, match="Did you mean `examples`"):
        run("exmples", tmp_path)


def test_never_overwrites_a_changed_file(tmp_path):
    from tuneforge.fetch import run

    dest = run("docs", tmp_path / "d")
    assert run("docs", dest) == dest  # identical files: re-running is fine
    victim = sorted(tree(dest))[0]
    (dest / victim).write_text("my notes")
    with pytest.raises(TuneforgeError, match="differ from the shipped ones"):
        run("docs", dest)
    assert (dest / victim).read_text() == "my notes"


def test_wheel_ships_examples_and_docs(tmp_path):
    """Build a wheel from a copy of the project, install it by unpacking, and fetch from it."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, project / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".*")
    for name in ("src", "examples", "docs"):
        shutil.copytree(ROOT / name, project / name, ignore=ignore)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(project), "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = wheels.glob("tuneforge-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(site)
    for what in ("examples", "docs"):
        for rel in tree(ROOT / what):
            assert f"tuneforge/_shipped/{what}/{rel}" in names

    # The unpacked wheel is first on sys.path, so this tuneforge has no checkout around it.
    kinds = [what for what in ("docs", "examples") if tree(ROOT / what)]  # git keeps no empty folders
    script = (
        "import sys, tuneforge, tuneforge.fetch as f;"
        f"assert tuneforge.__file__.startswith({str(site)!r}), tuneforge.__file__;"
        "[print(f.source_dir(w)) or f.run(w, sys.argv[1] + '/' + w) for w in sys.argv[2:]]"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "got"), *kinds],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "docs" in kinds and out.stdout.count("_shipped") == len(kinds)
    for what in kinds:
        assert tree(tmp_path / "got" / what) == tree(ROOT / what)
