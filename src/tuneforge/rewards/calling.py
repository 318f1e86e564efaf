"""Importing and calling reward functions, without torch: worker processes import only this module.

See `tuneforge.methods.rewards` for the calling convention and the error messages.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

from tuneforge.user_code import UserCodeFailure, contained, describe, import_user_module

RewardFn = Callable[..., Sequence[float | None]]

# Rewards beyond this size are refused like NaN: their squares (the group's standard deviation, in float32)
# would overflow to inf and turn every advantage of the step into NaN.
MAX_ABS_REWARD = 1e15
NAN_POLICIES = ("error", "skip")


class RewardError(UserCodeFailure):
    """A reward function failed or returned something unusable."""


def resolve(spec: str, search: list[str] | None = None) -> RewardFn:
    """`module.function` -> the callable; a clear error when the module or function is missing."""
    module_name, _, fn_name = spec.rpartition(".")
    if not module_name:
        raise RewardError(f"trl.reward_funcs: `{spec}` is not `module.function`; e.g. `rewards.accuracy`.")
    try:
        module = import_user_module(module_name, search)
    except ImportError as exc:
        raise RewardError(
            f"trl.reward_funcs: cannot import module `{module_name}` for `{spec}` ({exc}). Put it next to the "
            "config file or where you run tuneforge, or on PYTHONPATH."
        ) from None
    except Exception as exc:  # noqa: BLE001 - the module's top-level code may raise anything
        raise RewardError(f"trl.reward_funcs: importing module `{module_name}` for `{spec}` {describe(exc)}"
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


def to_floats(name: str, values: Any, n: int, rows: Sequence[int] | None, policy: str = "error",
              skipped: list[str] | None = None) -> list[float]:
    """The rewards as floats (None -> NaN, "not applicable"). A non-number is refused; a NaN, an infinity or a
    value beyond +-MAX_ABS_REWARD stops the run (policy "error") or counts as None (policy "skip", noted in
    `skipped` for the log)."""
    where = (lambda i: f"dataset row {rows[i]}, completion {i}") if rows is not None else (lambda i: f"completion {i}")
    if isinstance(values, str | bytes | dict):
        raise RewardError(f"reward function `{name}` returned {type(values).__name__}, not a list of {n} numbers.")
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
            if isinstance(v, str | bytes):
                raise TypeError
            f = float(v)
        except (TypeError, ValueError, OverflowError):
            raise RewardError(f"reward function `{name}` returned {v!r} ({where(i)}); expected a number or None."
                              ) from None
        if not (math.isfinite(f) and abs(f) <= MAX_ABS_REWARD):
            if policy != "skip":
                raise RewardError(
                    f"reward function `{name}` returned {f!r} ({where(i)}); rewards must be finite numbers within "
                    f"+-{MAX_ABS_REWARD:g} (or None for not applicable). Fix the function, or set "
                    "`trl.reward_nan_policy: skip` to treat such values as None.")
            if skipped is not None:
                skipped.append(f"{f!r} ({where(i)})")
            f = math.nan
        out.append(f)
    return out


def call_one(name: str, fn: RewardFn, kwargs: dict[str, Any]) -> Any:
    """Call the function; an exit or KeyboardInterrupt it raises comes back as `UserCodeExit` (an Exception)."""
    with contained():
        result = fn(**_accepted(fn, kwargs))
        if inspect.isawaitable(result):
            result = asyncio.run(_await(result))
    return result


async def _await(x):
    return await x


def first_failure(name: str, fn: RewardFn, kwargs: dict[str, Any], n: int) -> tuple[int, str] | None:
    """Re-run the function one completion at a time: the first completion that fails and what happened."""
    for i in range(n):
        one = {k: (v[i : i + 1] if isinstance(v, list) and len(v) == n else v) for k, v in kwargs.items()}
        try:
            call_one(name, fn, one)
        except Exception as single:  # noqa: BLE001 - the user's code may raise anything
            return i, describe(single)
    return None


def failure_error(name: str, found: tuple[int, str] | None, batch_failure: str, kwargs: dict[str, Any], n: int,
                  rows: Sequence[int] | None, offset: int = 0) -> RewardError:
    if found is None:
        return RewardError(f"reward function `{name}` {batch_failure} (on the batch of {n} completions)")
    i, what = found
    row = f"dataset row {rows[i]}, " if rows is not None else ""
    return RewardError(f"reward function `{name}` {what} ({row}completion {i + offset}: "
                       f"{str(kwargs['completions'][i])[:200]!r})")


def locate_failure(name: str, fn: RewardFn, kwargs: dict[str, Any], n: int, rows, exc: Exception) -> RewardError:
    """The error naming the function, the first failing row and what it did."""
    return failure_error(name, first_failure(name, fn, kwargs, n), describe(exc), kwargs, n, rows)


def worker_call(spec: str, search: list[str], kwargs: dict[str, Any], n: int):
    """In a worker process: ("ok", values) or ("error", (first failing completion or None, what happened))."""
    try:
        fn = resolve(spec, search)
    except BaseException as exc:  # noqa: BLE001 - an import that exits is reported like any failure
        return "error", (None, describe(exc))
    try:
        return "ok", list(call_one(spec, fn, kwargs))
    except BaseException as exc:  # noqa: BLE001 - reported back to the trainer with the row located here
        try:
            return "error", (first_failure(spec, fn, kwargs, n), describe(exc))
        except BaseException:  # noqa: BLE001
            return "error", (None, describe(exc))
