"""Put a finished output folder in place without deleting anything tuneforge did not write.

Commands that write a whole folder (`merge-lora`) build it in a temporary sibling and publish it here.
The rules:

- a missing or empty destination is simply filled;
- a non-empty destination is refused unless the user passed an explicit overwrite;
- with overwrite, only files listed in the destination's manifest (`.tuneforge-files.json`, written by
  the previous publish) are replaced or removed; any other file stays, and a new file that would land on
  such a file is refused before anything is touched. A folder without a manifest (the working directory,
  an adapter folder, anything of the user's) is never written into.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from tuneforge.errors import TuneforgeError

MANIFEST = ".tuneforge-files.json"


class DestinationError(TuneforgeError):
    """The destination folder cannot be written without touching files tuneforge did not create."""


def _manifest(folder: Path) -> set[str] | None:
    file = folder / MANIFEST
    if not file.is_file():
        return None
    try:
        names = json.loads(file.read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None
    return {n for n in names if isinstance(n, str) and "/" not in n and n not in ("", ".", "..")}


def check_destination(dest: Path, *, overwrite: bool, option: str = "--overwrite") -> None:
    """Fail early (before any work) when `dest` cannot be published to; see the module's rules."""
    dest = Path(dest)
    if not dest.exists() and not dest.is_symlink():
        return
    if not dest.is_dir() or dest.is_symlink():
        raise DestinationError(f"{dest} exists and is not a folder; choose another destination.")
    present = {p.name for p in dest.iterdir()}
    if not present:
        return
    if not overwrite:
        raise DestinationError(
            f"{dest} already exists and is not empty; nothing was written. Choose another destination, or pass "
            f"{option} to replace the files a previous tuneforge run wrote there (other files are kept)."
        )
    if _manifest(dest) is None:
        raise DestinationError(
            f"{dest} holds files that tuneforge did not write (no {MANIFEST}), so {option} will not replace "
            "anything there. Choose another (new or empty) destination."
        )


def publish(tmp: Path, dest: Path, *, overwrite: bool, option: str = "--overwrite") -> None:
    """Move the finished folder `tmp` to `dest` under the module's rules; `tmp` is consumed."""
    tmp, dest = Path(tmp), Path(dest)
    check_destination(dest, overwrite=overwrite, option=option)
    new = sorted(p.name for p in tmp.iterdir() if p.name != MANIFEST)
    (tmp / MANIFEST).write_text(json.dumps({"files": new}, indent=1) + "\n")
    if not dest.exists() or not any(dest.iterdir()):
        if dest.exists():
            dest.rmdir()  # empty: the rename below needs the name free
        os.replace(tmp, dest)
        return
    ours = _manifest(dest) or set()
    foreign = {p.name for p in dest.iterdir()} - ours - {MANIFEST}
    clash = sorted(foreign & set(new))
    if clash:
        raise DestinationError(
            f"{dest}/{clash[0]} was not written by tuneforge and would be replaced; nothing was written. Move it "
            "away or choose another destination."
        )
    if not foreign:  # the whole folder is ours: swap it in one rename
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        old.rmdir()
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
        return
    for name in ours - set(new):  # our stale files; the user's own stay
        _remove(dest / name)
    for name in new:
        _remove(dest / name)
        os.replace(tmp / name, dest / name)
    os.replace(tmp / MANIFEST, dest / MANIFEST)
    shutil.rmtree(tmp, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
