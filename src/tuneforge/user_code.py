"""Containing the user's own code (reward functions, `type: module.fn` formats): what it may not do to us.

`contained()` runs a call so that `sys.exit`, `os._exit`, `KeyboardInterrupt` raised by the code itself and
any exception become one ordinary `UserCodeExit`/exception that the caller turns into a message naming the
function and the row. `UserCodeFailure` is the error the trainer catches to save the last completed step
before the run stops (engine/trainer.py), so a failing reward costs at most the step it failed in.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import signal
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tuneforge.errors import TuneforgeError


class UserCodeFailure(TuneforgeError):
    """The user's code failed during a training step; the trainer saves the last completed step, then stops."""

    def with_checkpoint(self, saved: str | None, step: int) -> UserCodeFailure:
        if saved:
            note = (f" The last completed step ({step}) is saved in {saved}; fix the function, then resume with "
                    f"`--resume-from-checkpoint {saved}`.")
        elif step == 0:
            note = " No step had completed, so there is no checkpoint to resume from."
        else:  # several processes: the others wait in a collective and cannot join a save now
            note = " Fix the function, then resume from the last checkpoint saved in output_dir."
        return type(self)(str(self).rstrip(".") + "." + note)


@contextmanager
def keep_last_step_on_failure(completed: int, processes: int, checkpoint_last_step) -> Iterator[None]:
    """Around a training step: the user's code failed in it, so stop, with the checkpoint of the last
    completed step (`checkpoint_last_step()` saves it unless it exists). Single-process runs only: the other
    processes of a data-parallel run wait in a collective and would not join the save."""
    try:
        yield
    except UserCodeFailure as exc:
        saved = str(checkpoint_last_step()) if processes == 1 and completed > 0 else None
        raise exc.with_checkpoint(saved, completed) from None


class UserCodeExit(Exception):  # noqa: N818 - an exit of user code turned into an ordinary exception
    """The user's code tried to end the process (sys.exit, os._exit) or raised KeyboardInterrupt itself."""


class _OsExit(BaseException):
    def __init__(self, code):
        super().__init__(code)
        self.code = code


def _user_abort_pending() -> bool:
    """A second Ctrl-C from the user (the trainer's stop flag already set) aborts: it is not the code's."""
    handler = signal.getsignal(signal.SIGINT)
    return getattr(getattr(handler, "__self__", None), "signum", None) is not None


@contextmanager
def contained() -> Iterator[None]:
    """Run user code with `os._exit` intercepted and process-ending exceptions turned into `UserCodeExit`."""
    real_exit = os._exit

    def _exit(code=0):
        raise _OsExit(code)

    os._exit = _exit
    try:
        yield
    except _OsExit as exc:
        raise UserCodeExit(f"called os._exit({exc.code})") from None
    except SystemExit as exc:
        raise UserCodeExit(f"called sys.exit({exc.code if exc.code is not None else ''})") from None
    except KeyboardInterrupt:
        if _user_abort_pending():
            raise
        raise UserCodeExit("raised KeyboardInterrupt (a function may not stop the run itself)") from None
    finally:
        os._exit = real_exit


def describe(exc: BaseException) -> str:
    """`raised ValueError: msg`, or the exit it attempted."""
    if isinstance(exc, UserCodeExit):
        return str(exc)
    return f"raised {type(exc).__name__}: {exc}"


# ---------------------------------------------------------------- importing the user's modules
@contextmanager
def _import_paths(extra: list[str]) -> Iterator[None]:
    """The working directory and the config's folder on sys.path while importing: the `tuneforge` command's
    own sys.path[0] is its bin folder, so modules next to the config would not import without PYTHONPATH."""
    added = [p for p in extra if p not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for p in added:
            if p in sys.path:
                sys.path.remove(p)


def import_user_module(name: str, search: list[str] | None = None) -> types.ModuleType:
    """Import `name` from the working directory, the config's folder (`search`) or sys.path; the module's
    top-level code runs contained (an exit becomes `UserCodeExit`)."""
    with _import_paths([str(Path.cwd()), *(search or [])]), contained():
        return importlib.import_module(name)


MAX_DIGEST_FILES = 2000


def local_sources_digest(module: types.ModuleType) -> str:
    """A hash of the user's module and the local code next to it: every .py file of its package (or, for a
    single-file module, of its folder), so an edit of a helper it imports changes the cache key."""
    file = getattr(module, "__file__", None)
    if not file:
        return ""
    top = sys.modules.get(module.__name__.partition(".")[0], module)
    top_file = Path(getattr(top, "__file__", None) or file)
    if top_file.name == "__init__.py":
        files = sorted(top_file.parent.rglob("*.py"))
    else:
        files = sorted(top_file.parent.glob("*.py"))
    digest = hashlib.sha256()
    for f in files[:MAX_DIGEST_FILES]:
        try:
            digest.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
        except OSError:
            continue
    return digest.hexdigest()[:16]


def module_file(name: str, search: list[str] | None = None) -> Path | None:
    """Where module `name` would be imported from, found without running any of its code (not even its
    parent packages' __init__): the working directory and `search` first, then sys.path."""
    import importlib.util

    parts = name.split(".")
    for root in [str(Path.cwd()), *(search or []), *sys.path]:
        base = Path(root or ".", *parts)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    if name in sys.modules:
        file = getattr(sys.modules[name], "__file__", None)
        return Path(file) if file else Path(name)
    try:  # an installed top-level module (no parent package to run)
        spec = importlib.util.find_spec(parts[0]) if len(parts) == 1 else None
    except (ImportError, ValueError):
        spec = None
    return Path(spec.origin) if spec is not None and spec.origin else None
