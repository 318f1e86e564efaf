"""No import cycles among tuneforge's modules (scripts/check_import_cycles.py reads the imports with ast)."""

from __future__ import annotations

from pathlib import Path

from script_support import load_script

check = load_script("scripts/check_import_cycles.py")


def test_no_module_level_import_cycles():
    assert check.cycles(check.import_graph()) == []


def test_no_new_import_cycles_through_imports_inside_functions():
    assert check.cycles(check.import_graph(deferred=True)) == []


def _package(tmp_path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        path = tmp_path / "tuneforge" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return check.module_files(tmp_path, "tuneforge")


def test_the_checker_finds_cycles_and_tells_names_from_submodules(tmp_path):
    files = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from tuneforge import b\n",  # b is a module: a needs b
        "b.py": "from .c import VALUE\n",
        "c.py": "import tuneforge.a\nVALUE = 1\n",  # a -> b -> c -> a
        "pkg/__init__.py": "from .part import thing\nNAME = 1\n",
        "pkg/part.py": "from . import sibling\n\ndef thing():\n    from . import NAME\n",  # NAME: pkg's own
        "pkg/sibling.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tuneforge import a\n",
    })
    graph = check.import_graph(files)
    assert graph["tuneforge.a"] == {"tuneforge.b"}
    assert graph["tuneforge.pkg.part"] == {"tuneforge.pkg.sibling"}  # a submodule, not the package
    assert graph["tuneforge.pkg.sibling"] == set()  # TYPE_CHECKING imports never run
    assert check.cycles(graph) == [["tuneforge.a", "tuneforge.b", "tuneforge.c"]]
    deferred = check.cycles(check.import_graph(files, deferred=True))
    assert deferred == [["tuneforge.a", "tuneforge.b", "tuneforge.c"], ["tuneforge.pkg", "tuneforge.pkg.part"]]
