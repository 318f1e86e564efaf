"""Importing and calling reward functions, without torch: worker processes import only this module.

See `tuneforge.methods.rewards` for the calling convention and the error messages.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import math
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tuneforge.errors import TuneforgeError

RewardFn = Callable[..., Sequence[float | None]]


class RewardError(TuneforgeError):
    """A reward function failed or returned something unusable."""


@contextmanager
def _import_paths(extra: list[str]):
    """Make modules next to the config file and in the working directory importable while loading."""
    added = [p for p in extra if p not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for p in added:
            if p in sys.path:
                sys.path.remove(p)


def resolve(spec: str, search: list[str] | None = None) -> RewardFn:
    """`module.function` -> the callable; a clear error when the module or function is missing."""
    module_name, _, fn_name = spec.rpartition(".")
    if not module_name:
        raise RewardError(f"trl.reward_funcs: `{spec}` is not `module.function`; e.g. `rewards.accuracy`.")
    with _import_paths([str(Path.cwd()), *(search or [])]):
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise RewardError(
                f"trl.reward_funcs: cannot import module `{module_name}` for `{spec}` ({exc}). Put it next to the "
                "config file or where you run tuneforge, or on PYTHONPATH."
            ) from None
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        raise RewardError(f"trl.reward_funcs: module `{module_name}` has no function `{fn_name}` (from `{spec}`).")
    _check_signature(spec, fn)
    return fn


def _check_signature(name: str, fn: RewardFn) -> None:
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    if "completions" not in {p.name for p in params} and "completion_ids" not in {p.name for p in params}:
        raise RewardError(
            f"reward function `{name}` takes neither `completions` nor `completion_ids` nor **kwargs; it is "
            "called as fn(prompts=..., completions=..., completion_ids=..., **columns)."
        )


def _accepted(fn: RewardFn, kwargs: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def to_floats(name: str, values: Any, n: int, rows: Sequence[int] | None) -> list[float]:
    where = (lambda i: f"dataset row {rows[i]}, completion {i}") if rows is not None else (lambda i: f"completion {i}")
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"reward function `{name}` returned {type(values).__name__}, not a list of {n} numbers.") from None
    if len(values) != n:
        raise RewardError(f"reward function `{name}` returned {len(values)} values for {n} completions; it must "
                          "return exactly one reward (or None) per completion.")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise RewardError(f"reward function `{name}` returned {v!r} ({where(i)}); expected a number or None.") from None
        out.append(f)
    return out


def call_one(name: str, fn: RewardFn, kwargs: dict[str, Any]) -> Any:
    result = fn(**_accepted(fn, kwargs))
    if inspect.isawaitable(result):
        result = asyncio.run(_await(result))
    return result


async def _await(x):
    return await x


def locate_failure(name: str, fn: RewardFn, kwargs: dict[str, Any], n: int, rows, exc: Exception) -> RewardError:
    """Re-run the function one completion at a time to name the first row that fails."""
    for i in range(n):
        one = {k: (v[i : i + 1] if isinstance(v, list) and len(v) == n else v) for k, v in kwargs.items()}
        try:
            call_one(name, fn, one)
        except Exception as single:  # noqa: BLE001 - the user's code may raise anything
            row = f"dataset row {rows[i]}, " if rows is not None else ""
            return RewardError(f"reward function `{name}` raised {type(single).__name__}: {single} "
                               f"({row}completion {i}: {str(kwargs['completions'][i])[:200]!r})")
    return RewardError(f"reward function `{name}` raised {type(exc).__name__}: {exc} (on the batch of {n} completions)")



def worker_call(spec: str, search: list[str], kwargs: dict[str, Any]):
    try:
        fn = resolve(spec, search)
        return "ok", list(call_one(spec, fn, kwargs))
    except Exception as exc:  # noqa: BLE001 - reported back to the trainer with the row located there
        return "error", f"{type(exc).__name__}: {exc}"
