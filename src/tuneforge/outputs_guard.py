"""What `train` may do to output_dir: never write into a folder that is not a run's own, never mix two runs.

Before anything is written (engine/run.py calls `claim`):

- `output_dir: ""`, the working directory, the home folder or `/`, and a non-empty folder holding files
  tuneforge did not write are refused: training writes config.yaml, README.md, tokenizer and weight files
  there and would replace the user's files of those names;
- a folder holding another run (a different fingerprint: base model, data, method, adapter, seed, chat
  template) is refused, naming that run; its checkpoints would otherwise be rotated away and
  `auto_resume_from_checkpoints` would resume the wrong run. The same run (same fingerprint) continues;
- a file, an unwritable folder: one message instead of a traceback.

`overwrite_output_dir: true` allows the first two (tuneforge still replaces only files of its own names),
but never auto-resume from a different run's checkpoints. The claim is `.tuneforge-run.json` in the folder.

`newest_intact_checkpoint` is what auto-resume resumes from: the newest checkpoint whose files are whole,
falling back (with a message naming the damaged one) to an earlier intact checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from tuneforge.errors import TuneforgeError

log = logging.getLogger("tuneforge")

CLAIM = ".tuneforge-run.json"
IDENTITY = ("base_model", "datasets", "rl", "adapter", "seed", "chat_template")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class OutputDirError(TuneforgeError):
    """output_dir cannot be used without touching files of the user's or of another run."""


def fingerprint(public: dict) -> dict:
    """The keys that make a run this run (not the step count, logging or the learning rate)."""
    ident = {k: public.get(k) for k in IDENTITY}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"fingerprint": digest, "base_model": ident["base_model"], "rl": ident["rl"],
            "datasets": [d.get("path") for d in ident["datasets"] or [] if isinstance(d, dict)]}


def _stored_run(out: Path) -> dict | None:
    """The run that owns `out`: its claim, or (folders written before claims existed) its config.yaml."""
    try:
        if (out / CLAIM).is_file():
            return json.loads((out / CLAIM).read_text())
        if (out / "config.yaml").is_file():
            stored = yaml.safe_load((out / "config.yaml").read_text())
            if isinstance(stored, dict) and "base_model" in stored:
                return fingerprint(stored)
    except (OSError, ValueError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return None


def _refuse_special(cfg, out: Path) -> None:
    if not str(cfg.output_dir).strip():
        raise OutputDirError("output_dir is empty, which would mean the working directory; give the run a folder "
                             "of its own, e.g. output_dir: ./outputs/run1")
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output_dir {out} is a file, not a folder; choose another output_dir.")
    special = {Path.cwd().resolve(): "the working directory", Path("/"): "the filesystem root"}
    with contextlib.suppress(RuntimeError, KeyError):  # no home folder known
        special.setdefault(Path.home().resolve(), "your home folder")
    if cfg.source_file is not None:
        special[Path(cfg.source_file).resolve().parent] = "the config file's folder"
    what = special.get(out.resolve())
    if what and not cfg.overwrite_output_dir:
        raise OutputDirError(f"output_dir {out} is {what}; training writes config.yaml, README.md, tokenizer and "
                             "weight files there. Give the run a folder of its own (e.g. ./outputs/run1), or set "
                             "overwrite_output_dir: true to write there anyway.")


def claim(cfg, out: Path, public: dict, *, main: bool = True) -> None:
    """Check that `out` may receive this run (see the module doc), then mark it as this run's."""
    out = Path(out)
    _refuse_special(cfg, out)
    mine = fingerprint(public)
    request = getattr(cfg.dynamic_checkpoint, "trigger_file_path", None) or "axolotl_checkpoint.save"
    # The checkpoint-request file (dynamic_checkpoint) is the user's message to tuneforge, not data of theirs.
    ours = {request, CLAIM, CLAIM + ".tmp"}  # the claim itself: other processes may be writing it right now
    present = sorted(p.name for p in out.iterdir() if p.name not in ours) if out.is_dir() else []
    theirs = _stored_run(out) if out.is_dir() else None
    checkpoints = sorted((n for n in present if _CHECKPOINT.match(n)), key=lambda n: int(n.rpartition("-")[2]))
    if theirs is not None and present and theirs.get("fingerprint") != mine["fingerprint"]:
        other = (f"another run (base_model {theirs.get('base_model')}, datasets {theirs.get('datasets')}, "
                 f"rl {theirs.get('rl')}{', with ' + ', '.join(checkpoints[-3:]) if checkpoints else ''})")
        if cfg.auto_resume_from_checkpoints and checkpoints:
            raise OutputDirError(f"output_dir {out} holds {other}; auto_resume_from_checkpoints would resume that "
                                 "run, not this one. Choose another output_dir, or resume that run with its own "
                                 f"config ({out / 'config.yaml'}).")
        if not cfg.overwrite_output_dir:
            raise OutputDirError(f"output_dir {out} holds {other}. To continue it, train with its own config "
                                 f"({out / 'config.yaml'}) and --resume-from-checkpoint; for a new run choose "
                                 "another output_dir (or set overwrite_output_dir: true to replace it).")
    elif theirs is None and present and not cfg.overwrite_output_dir:
        shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
        raise OutputDirError(f"output_dir {out} holds files tuneforge did not write ({shown}); training would "
                             "replace files of the same names. Choose a new or empty folder, or set "
                             "overwrite_output_dir: true.")
    if main:
        # run_id: this start's own mark, so that processes checking they see this file (distributed/
        # shared_output.py) cannot mistake an older run's claim of the same config for it.
        _write_claim(out, {**mine, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "run_id": secrets.token_hex(8)})


def _write_claim(out: Path, record: dict) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (CLAIM + ".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, out / CLAIM)
    except OSError as exc:
        raise OutputDirError(f"cannot write to output_dir {out}: {exc.strerror or exc} (read-only, full, or not "
                             "yours?); choose a writable output_dir.") from None


# ---------------------------------------------------------------- a save that cannot be written
_DISK_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
# torch.save and safetensors report a failed write as RuntimeError / their own error, not OSError.
_WRITE_FAILURES = ("file write failed", "no space left", "file too large", "disk quota", "read-only file system",
                   "failed writing", "permission denied", "unexpected pos", "input/output error")


def _is_disk_failure(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        return True
    return any(s in str(exc).lower() for s in _WRITE_FAILURES)


@contextmanager
def save_errors(out: Path, step: int, previous: Path | None) -> Iterator[None]:
    """A checkpoint that cannot be written (disk full, file-size limit, read-only): one message naming the
    intact checkpoint to resume from, and the unfinished `.tmp` folder (ours) removed so its space is back."""
    try:
        yield
    except Exception as exc:
        if not _is_disk_failure(exc):
            raise
        shutil.rmtree(Path(out) / f"checkpoint-{step}.tmp", ignore_errors=True)
        usable = (f"the previous checkpoint {previous} is intact: free space, then resume with "
                  f"--resume-from-checkpoint {previous}") if previous else "no earlier checkpoint exists"
        raise OutputDirError(f"could not write checkpoint-{step} in {out} ({_reason(exc)}); nothing half-written "
                             f"is left behind, and {usable}.") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno)
    return str(exc).strip().splitlines()[0][:200]


# ---------------------------------------------------------------- intact checkpoints
def damage(path: Path) -> str | None:
    """Why checkpoint `path` cannot be resumed from (None: its files are whole)."""
    state_file = path / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return "its trainer_state.json is missing or unreadable"
    if not isinstance(state, dict):
        return "its trainer_state.json is not a JSON object"
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        return "it has no .safetensors weights"
    for w in weights:
        problem = _safetensors_damage(w)
        if problem:
            return f"{w.name} {problem}"
    needed = ["optimizer.pt", "scheduler.pt"] if state.get("resumable", True) else []
    for name in needed + [p.name for p in path.glob("*_state_*.pt")]:
        f = path / name
        try:
            if not zipfile.is_zipfile(f):
                return f"{name} is missing or not a torch file"
            with zipfile.ZipFile(f) as z:
                if z.testzip() is not None:
                    return f"{name} fails its checksum"
        except (OSError, zipfile.BadZipFile):
            return f"{name} is unreadable"
    return None


def _safetensors_damage(file: Path) -> str | None:
    try:
        with open(file, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or n > 100 * 2**20:
                return "has a damaged header"
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if file.stat().st_size < 8 + n + end:
            return "is truncated"
    except (OSError, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
        return "has a damaged header"
    return None


def newest_intact_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint whose files are whole; the damaged newer ones are named in the log."""
    output_dir = Path(output_dir)
    found = [(int(m.group(1)), p) for p in (output_dir.iterdir() if output_dir.is_dir() else [])
             if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    for _, path in sorted(found, reverse=True):
        why = damage(path)
        if why is None:
            return path
        log.warning("auto_resume_from_checkpoints: skipping %s: %s; trying the checkpoint before it", path, why)
    return None
