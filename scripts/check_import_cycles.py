"""Report import cycles among the modules of src/tuneforge (exit status 1 when there is one).

The graph is read from the source with `ast`, without importing anything. By default only imports that
run when a module is imported count: statements at module level (inside `try`/`if`/`with` blocks too), not
those inside functions or classes, nor those under `if TYPE_CHECKING:`. `--deferred` counts the imports
inside functions too (they run later, but still tie the two modules together).

An import depends on the module whose code must have run for it to succeed:
- `import a.b.c` -> `a.b.c`;
- `from a.b import name` -> `a.b` when `name` is defined there (its `__init__` must have run far enough to
  define it), or `a.b.name` when that is a submodule (`from . import sibling` needs the sibling, and only
  that: the package's `__init__` may still be running).
Imports of other distributions are ignored.

    python scripts/check_import_cycles.py [--deferred]     # lists every cycle, one per line
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "tuneforge"


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its `__init__.py`)."""
    files = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(body: list[ast.stmt]):
    """Import statements that run at import time: descend into blocks, never into functions or classes."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _module_level_imports(node.body)
            yield from _module_level_imports(node.orelse)
        elif isinstance(node, ast.Try | ast.TryStar):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _module_level_imports(block)
        elif isinstance(node, ast.With | ast.For | ast.While):
            yield from _module_level_imports(node.body)


def _base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` statement reads from."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    keep = len(parts) - node.level + (1 if is_package else 0)
    anchor = parts[:keep]
    return ".".join(anchor + ([node.module] if node.module else []))


def _all_imports(tree: ast.Module):
    return (node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom))


def import_graph(files: dict[str, Path] | None = None, *, deferred: bool = False) -> dict[str, set[str]]:
    """Module -> the package's modules it imports at import time (`deferred`: anywhere in its code)."""
    files = module_files() if files is None else files
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        targets: set[str] = set()
        for node in _all_imports(tree) if deferred else _module_level_imports(tree.body):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = _base(module, is_package, node)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in files else base)
        graph[module] = {t for t in targets if t in files and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted, listed in order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        # Iterative depth-first search: the recursive form would be limited by Python's stack depth.
        work = [(v, iter(sorted(graph.get(v, ()))))]
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def main(argv: list[str]) -> int:
    deferred = "--deferred" in argv
    found = cycles(import_graph(deferred=deferred))
    for component in found:
        print("import cycle: " + " <-> ".join(component))
    if not found:
        kind = "imports anywhere" if deferred else "module-level imports"
        print(f"no import cycles among the {len(module_files())} modules of {PACKAGE} ({kind})")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
