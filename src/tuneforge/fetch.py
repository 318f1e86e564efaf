"""`tuneforge fetch examples|docs|deepspeed_configs`: copy the example configs or the docs that ship with tuneforge.

No network: the files come from the installed package. In a source checkout (including an editable
install) they are the repository's own `examples/` and `docs/`; in a wheel they are copies placed in
`tuneforge/_shipped/` by the build hook in `setup.py`.
"""

from __future__ import annotations

import difflib
import logging
import os
import shutil
from pathlib import Path

from tuneforge.errors import TuneforgeError

log = logging.getLogger("tuneforge")

SHIPPED = ("examples", "docs", "deepspeed_configs")
_PACKAGE = Path(__file__).resolve().parent


def source_dir(what: str) -> Path:
    """Where the shipped `what` folder lives: the checkout's, else the copy inside the package."""
    root = _PACKAGE.parent.parent  # src/tuneforge -> the repository root, in a checkout
    if (root / "pyproject.toml").is_file() and (root / what).is_dir():
        return root / what
    shipped = _PACKAGE / "_shipped" / what
    if shipped.is_dir():
        return shipped
    raise TuneforgeError(
        f"this tuneforge installation has no shipped {what} (looked in {root / what} and {shipped}); "
        "reinstall tuneforge from a wheel or a source checkout."
    )


def _files(folder: Path) -> list[Path]:
    """Files under `folder`, relative, skipping hidden files and caches."""
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
            out.append(rel)
    return out


def _check_destination(dest: Path, files: list[Path]) -> None:
    """Refuse a destination that is a file, that is not writable, or where a copy would go through a symbolic
    link (a dangling link or a linked subfolder would write outside the destination)."""
    if dest.exists() and not dest.is_dir():
        raise TuneforgeError(f"--dest {dest} is a file, not a folder; pass another --dest.")
    links = set()
    for rel in files:
        for depth in range(1, len(rel.parts) + 1):
            part = dest.joinpath(*rel.parts[:depth])
            if part.is_symlink():
                links.add(part)
                break
            if not part.exists():
                break
    if links:
        shown = ", ".join(str(p) for p in sorted(links)[:5]) + (", ..." if len(links) > 5 else "")
        raise TuneforgeError(f"{dest} holds symbolic links where fetch would write ({shown}); a copy through them "
                             "would land outside the destination. Remove them, or pass another --dest.")
    probe = dest
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK) or _read_only_fs(probe):
        raise TuneforgeError(f"cannot write into {dest} ({probe} is read-only); pass a writable --dest.")


def _read_only_fs(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def run(what: str, dest: str | Path | None = None) -> Path:
    """Copy the shipped folder to `dest` (default ./<what>); never overwrites a file that differs."""
    if what not in SHIPPED:
        close = difflib.get_close_matches(what, SHIPPED, n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        raise TuneforgeError(f"cannot fetch `{what}`: choose one of {', '.join(SHIPPED)}.{hint}")
    src = source_dir(what)
    dest = Path(dest).expanduser() if dest is not None else Path.cwd() / what
    files = _files(src)
    if src.resolve() == dest.resolve():
        raise TuneforgeError(f"{dest} is the shipped folder itself; pass another --dest.")
    _check_destination(dest, files)
    conflicts = [rel for rel in files if (dest / rel).exists() and (dest / rel).read_bytes() != (src / rel).read_bytes()]
    if conflicts:
        shown = ", ".join(str(c) for c in conflicts[:5]) + (", ..." if len(conflicts) > 5 else "")
        raise TuneforgeError(
            f"{len(conflicts)} file(s) in {dest} differ from the shipped ones and would be overwritten ({shown}). "
            "Move them away, or pass another --dest."
        )
    copied = [rel for rel in files if not (dest / rel).exists()]  # the others are identical (checked above)
    try:
        for rel in copied:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dest / rel)
    except OSError as exc:
        raise TuneforgeError(f"cannot write into {dest}: {exc.strerror or exc} ({exc.filename}); pass a writable "
                             "--dest.") from None
    same = len(files) - len(copied)
    print(f"copied {len(copied)} file(s) of {what} to {dest}" + (f"; {same} already there, unchanged" if same else ""))
    return dest
