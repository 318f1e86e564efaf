"""Measure how many of Axolotl's example configs pass `tuneforge validate`.

    PYTHONPATH=src HF_HUB_OFFLINE=1 .venv/bin/python scripts/measure_axolotl_examples.py /path/to/axolotl/.git

The argument is a git directory (or a work tree) of Axolotl's repository; `--rev` picks the commit
(default HEAD). Its whole `examples/` tree is extracted into a temporary folder, so that files next to a
config (reward modules, small data files) are where the config expects them, and every `.yml`/`.yaml` with a
`base_model` is checked the way `tuneforge validate` checks it: `tuneforge.config.load`, the data checks that
need no model (`check_without_model`), and the method's own checks (`get_objective`, importing no user code).

Each config lands in one bucket:
- pass: no problem at all, or only "dataset file not found" for a local path that is not in Axolotl's
  repository (the user brings that file; hub models and hub datasets are never fetched, and validate does not
  need them). The second kind is counted separately as "pass (local file absent)".
- refused-multimodal / refused-context-parallel: refused with a message because the config needs a
  capability tuneforge does not have (a multimodal processor, context or sequence parallelism), counted apart
  as issue #17 allows.
- failed: any other problem, with its first message; `--verbose` prints every config's messages.
- traceback: an exception that is not a TuneforgeError (a bug; the goal is none).
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import yaml

# Markers of the refusals issue #17 lets us count apart (they are the refusal texts in tuneforge.config).
MULTIMODAL = ("multimodal",)
CONTEXT_PARALLEL = ("context parallelism",)
# A local file the example expects the user to bring (a data file, a reward module): not in the repository.
ABSENT = ("dataset file not found", "was not found. Put it next to the config",
          "which is not next to the config, in the working directory or on the import path")


def example_configs(mirror: Path, rev: str) -> list[str]:
    out = subprocess.run(["git", f"--git-dir={_git_dir(mirror)}", "ls-tree", "-r", "--name-only", rev, "examples"],
                         check=True, capture_output=True, text=True).stdout
    return sorted(p for p in out.splitlines() if p.endswith((".yml", ".yaml")))


def _git_dir(mirror: Path) -> Path:
    return mirror / ".git" if (mirror / ".git").is_dir() else mirror


def extract(mirror: Path, rev: str, dest: Path) -> None:
    """examples/ and deepspeed_configs/ (which examples name relative to the repository root)."""
    top = subprocess.run(["git", f"--git-dir={_git_dir(mirror)}", "ls-tree", "--name-only", rev], check=True,
                         capture_output=True, text=True).stdout.split()
    folders = [f for f in ("examples", "deepspeed_configs") if f in top]
    archive = subprocess.run(["git", f"--git-dir={_git_dir(mirror)}", "archive", rev, *folders], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def has_base_model(path: Path) -> bool:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return True  # let validate say what is wrong with it
    return isinstance(raw, dict) and bool(raw.get("base_model"))


def check(path: Path) -> list[str]:
    """The problems `tuneforge validate` reports for one config (empty: valid)."""
    from tuneforge.config import ConfigError, load
    from tuneforge.data.validate_rows import check_without_model
    from tuneforge.errors import TuneforgeError
    from tuneforge.methods import get_objective
    from tuneforge.methods.rewards import without_importing

    try:
        cfg = load(path, [])
    except ConfigError as exc:
        return [issue.render() for issue in exc.issues]
    except TuneforgeError as exc:
        return [str(exc)]
    problems: list[str] = []
    try:
        check_without_model(cfg)
    except ConfigError as exc:
        problems += [issue.render() for issue in exc.issues]
    try:
        with without_importing():
            get_objective(cfg).close()
    except ConfigError as exc:
        problems += [issue.render() for issue in exc.issues]
    except TuneforgeError as exc:
        problems.append(str(exc))
    return problems


def bucket(problems: list[str]) -> str:
    if not problems:
        return "pass"
    if any(m in p for p in problems for m in MULTIMODAL):
        return "refused-multimodal"
    if any(m in p for p in problems for m in CONTEXT_PARALLEL):
        return "refused-context-parallel"
    if all(_absent(p) for p in problems):
        return "pass (local file absent)"
    return "failed"


def _absent(problem: str) -> bool:
    return any(m in problem for m in ABSENT)


def reason(problem: str) -> str:
    """A problem without its file and line, so that equal reasons group together."""
    return re.sub(r" \([^()]*:\d+\)", "", problem.split("\n")[-1].strip().removeprefix("- "))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mirror", type=Path, help="Axolotl's git directory or work tree")
    ap.add_argument("--rev", default="HEAD")
    ap.add_argument("--verbose", action="store_true", help="print every config's bucket and problems")
    args = ap.parse_args(argv)
    commit = subprocess.run(["git", f"--git-dir={_git_dir(args.mirror)}", "rev-parse", args.rev], check=True,
                            capture_output=True, text=True).stdout.strip()
    mirror, home = args.mirror.resolve(), Path.cwd()
    # Notes are logged as warnings; only the results matter here. Restored after, as is the working folder.
    logging.disable(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            extract(mirror, commit, Path(tmp))
            os.chdir(tmp)  # as a user runs Axolotl's examples: from the repository root
            names = [n for n in example_configs(mirror, commit) if has_base_model(Path(tmp, n))]
            counts, reasons = _measure(Path(tmp), names, args.verbose)
    finally:
        os.chdir(home)
        logging.disable(logging.NOTSET)
    _summary(commit, len(names), counts, reasons)
    return 1 if counts["traceback"] else 0


def _measure(root: Path, names: list[str], verbose: bool) -> tuple[collections.Counter, collections.Counter]:
    counts: collections.Counter[str] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    for name in names:
        try:
            problems = check(root / name)
            kind = bucket(problems)
        except Exception:  # noqa: BLE001 - a traceback is what this script exists to count
            problems, kind = [traceback.format_exc()], "traceback"
        counts[kind] += 1
        if kind in ("failed", "traceback"):
            reasons.update({reason(p) for p in problems if not _absent(p)})
        if verbose or kind == "traceback":
            print(f"{kind}: {name}" + "".join(f"\n    {p}" for p in problems))
    return counts, reasons


def _summary(commit: str, total: int, counts: collections.Counter[str], reasons: collections.Counter[str]) -> None:
    refused = counts["refused-multimodal"] + counts["refused-context-parallel"]
    passed = counts["pass"] + counts["pass (local file absent)"]
    print(f"\nAxolotl {commit}: {total} example configs with a base_model")
    for kind in ("pass", "pass (local file absent)", "refused-multimodal", "refused-context-parallel",
                 "failed", "traceback"):
        print(f"  {kind:32} {counts[kind]}")
    if total - refused:
        print(f"passing: {passed} of {total - refused} ({100 * passed / (total - refused):.1f}%) not counting "
              f"the {refused} refused for multimodal / context parallelism; {passed} of {total} in all")
    if reasons:
        print("\nreasons of the failed configs, most frequent first:")
        for text, n in reasons.most_common():
            print(f"  {n:4}  {text}")


if __name__ == "__main__":
    sys.exit(main())
