"""Checkpoints that resume exactly, written atomically.

`output_dir/checkpoint-N/` holds:
  adapter_model.safetensors + adapter_config.json (adapter runs) or model.safetensors + config.json,
  tokenizer files              - so a checkpoint is itself a loadable model folder,
  optimizer.pt, scheduler.pt   - absent with save_only_model (then the run cannot resume from it),
  rng_state_<rank>.pt          - python, numpy, torch and CUDA generators (dropout masks),
  objective_state_<rank>.pt    - what the objective carries between steps, where it carries anything
                                 (GRPO: generations still to train on: async prefetch, num_iterations),
  trainer_state.json           - step, data position (epoch + micro-batch index), counters; written last.

Atomicity: everything is written into `checkpoint-N.tmp/`, each file and the folder are fsynced, and
the folder is renamed to `checkpoint-N` in one step. A crash at any point leaves either the previous
complete checkpoint or a `.tmp` folder that resume ignores, never a half-written `checkpoint-N`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from tuneforge.errors import TuneforgeError

log = logging.getLogger("tuneforge")

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


# ---------------------------------------------------------------- finding checkpoints
def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (with trainer_state.json), oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def rotate(output_dir: Path, limit: int | None, keep: tuple[Path | None, ...] = ()) -> None:
    """Delete the oldest checkpoints beyond `save_total_limit` (never those in `keep`)."""
    if not limit:
        return
    kept = {p.resolve() for p in keep if p is not None}
    found = list_checkpoints(output_dir)
    for old in found[: max(0, len(found) - limit)]:
        if old.resolve() not in kept:
            shutil.rmtree(old, ignore_errors=True)


def clean_partial(output_dir: Path) -> None:
    """Remove `checkpoint-N.tmp` folders left by a crash during a save."""
    if Path(output_dir).is_dir():
        for p in Path(output_dir).glob("checkpoint-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------- RNG
def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- save
def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_model_files(model, tokenizer, folder: Path, safe: bool = True) -> None:
    """Weights (adapter or full model) and tokenizer, as a from_pretrained-loadable folder."""
    model.save_pretrained(str(folder), safe_serialization=safe)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    card = folder / "README.md"
    if card.exists() and hasattr(model, "peft_config"):
        card.unlink()  # PEFT's placeholder card; checkpoints need none


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def save_checkpoint(output_dir: Path, step: int, *, model, tokenizer, optimizer, scheduler, state: dict,
                    only_model: bool, accelerator, safe: bool = True, objective_state: dict | None = None,
                    sharded=None, sharded_full_weights: bool = False, zero=None, extra_files=None) -> Path:
    """Write checkpoint-<step> atomically and return its path. `model` is the unwrapped model; `sharded` (the
    FSDP2 root, or None) makes every process write its shards of the model and optimizer instead, plus the
    whole weights with `sharded_full_weights` (fsdp_config.state_dict_type FULL_STATE_DICT). `zero` (a DeepSpeed
    run's ZeroEngine) makes every process write its DeepSpeed state (deepspeed_hooks.save_state). `extra_files(folder)`
    writes a training variant's own files (the first process, engine/variants.py)."""
    output_dir = Path(output_dir)
    final = checkpoint_dir(output_dir, step)
    tmp = output_dir / f"checkpoint-{step}.tmp"
    main = accelerator.is_main_process
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    if objective_state:
        torch.save(objective_state, tmp / f"objective_state_{accelerator.process_index}.pt")
    if zero is not None:
        from .deepspeed_hooks import save_state

        save_state(zero, tmp, model, tokenizer, only_model=only_model, main=main, safe=safe)
    elif sharded is not None:
        _save_sharded(tmp, sharded, model, tokenizer, optimizer, only_model=only_model, main=main, safe=safe,
                      full_weights=sharded_full_weights)
    elif main:
        save_model_files(model, tokenizer, tmp, safe)
        if not only_model:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if main and not only_model:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if main and extra_files is not None:
        extra_files(tmp)
    if main:
        state = {**state, "resumable": not only_model, "world_size": accelerator.num_processes,
                 "sharded": sharded is not None, **({"deepspeed": True} if zero is not None else {})}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    accelerator.wait_for_everyone()
    if main:
        _fsync_tree(tmp)
        if final.exists():  # e.g. the step we resumed from, saved again
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(output_dir)
    accelerator.wait_for_everyone()
    return final


def _save_sharded(tmp: Path, runner, model, tokenizer, optimizer, *, only_model: bool, main: bool, safe: bool,
                  full_weights: bool) -> None:
    """FSDP2: DCP shards of the model (and optimizer) from every process; the tokenizer and model config from
    the first, so the folder still tells what model it holds (FULL_STATE_DICT also writes whole weights)."""
    from tuneforge.distributed import sharded_checkpoint

    sharded_checkpoint.save(tmp, runner, optimizer, with_optimizer=not only_model)
    if full_weights:
        sharded_checkpoint.save_full_model(runner, model, tokenizer, tmp, main=main, safe=safe)
    elif main:
        config = getattr(getattr(model, "get_base_model", lambda: model)(), "config", None)
        if config is not None:
            config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))


# ---------------------------------------------------------------- load
def read_state(path: Path) -> dict:
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.exists():
        hint = " (it is an unfinished save: use the previous checkpoint)" if path.name.endswith(".tmp") else ""
        raise TuneforgeError(f"resume_from_checkpoint: {path} is not a tuneforge checkpoint (no {STATE_FILE}){hint}.")
    state = json.loads(state_file.read_text())
    if not state.get("resumable", True):
        raise TuneforgeError(
            f"{path} was saved with save_only_model: true (no optimizer/scheduler state), so the run cannot resume "
            f"from it exactly. Use it as a model (base_model or lora_model_dir), or resume from a full checkpoint."
        )
    return state


def load_training_state(path: Path, *, model, optimizer, scheduler, process_index: int, adapter: bool,
                        sharded=None, zero=None) -> dict:
    """Restore weights, optimizer, scheduler and RNG from checkpoint `path`; return its trainer state.
    `sharded` (the FSDP2 root) loads the DCP shards, whatever process count wrote them."""
    from tuneforge.distributed import sharded_checkpoint

    path = Path(path)
    state = read_state(path)
    from .deepspeed_hooks import load_state

    if load_state(zero, path):  # a DeepSpeed run: its model and optimizer are restored
        pass
    elif sharded is not None:
        if not sharded_checkpoint.exists(path):
            raise TuneforgeError(f"{path} holds no sharded (FSDP) state, but this run uses FSDP2: resume it "
                                 "without fsdp_version/fsdp_config, or from a checkpoint of an FSDP2 run.")
        sharded_checkpoint.load(path, sharded, optimizer, with_optimizer=True)
    else:
        if sharded_checkpoint.exists(path):
            raise TuneforgeError(f"{path} is an FSDP2 checkpoint (sharded state): resume it with the same "
                                 "fsdp_version: 2 / fsdp_config (any number of processes).")
        load_weights(path, model, adapter)
        optimizer.load_state_dict(load_plain(path / "optimizer.pt"))
    scheduler.load_state_dict(load_plain(path / "scheduler.pt"))
    objective_file = path / f"objective_state_{process_index}.pt"
    if objective_file.exists():
        state["objective"] = load_plain(objective_file)
    rng_file = path / f"rng_state_{process_index}.pt"
    if rng_file.exists():
        set_rng_state(load_plain(rng_file))
    else:
        log.warning("%s has no RNG state for rank %d; dropout masks will differ from the original run",
                    path, process_index)
    return state


def _safe_classes() -> list:
    """Data classes (fields only, no custom unpickling code) that objective states may hold."""
    from tuneforge.rollout.base import Rollout

    return [Rollout]


def load_plain(file: Path):
    """Load a checkpoint file of tensors and plain Python values without running any of its code.

    Checkpoints can come from anywhere (shared folders, downloads), and unpickling runs whatever the file
    says, so every `.pt` file is read with `weights_only=True`: tensors, numbers, strings, lists, tuples and
    dicts only, plus the plain data classes of `_safe_classes`. A file holding anything else is refused rather
    than executed.
    """
    import pickle

    try:
        with torch.serialization.safe_globals(_safe_classes()):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "torchao" in str(exc):  # torchao registers its optimizer state classes as safe when it is imported
            raise TuneforgeError(
                f"{file}: holds torchao's low-bit optimizer state (adamw_torch_8bit / adamw_torch_4bit), and torchao "
                "is not installed here: pip install torchao, and resume with the same optimizer") from None
        raise TuneforgeError(
            f"{file}: refused to load: it holds objects other than tensors and plain values ({exc}), which only a "
            "tampered or foreign checkpoint does. Resume from a checkpoint this tuneforge wrote."
        ) from None


def load_weights(path: Path, model, adapter: bool) -> None:
    from safetensors.torch import load_file

    if adapter:
        from peft import set_peft_model_state_dict

        file = path / "adapter_model.safetensors"
        if not file.exists():
            raise TuneforgeError(f"{path} holds no adapter_model.safetensors, but this run trains an adapter.")
        result = set_peft_model_state_dict(model, load_file(str(file)))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise TuneforgeError(f"{path}: adapter weights do not fit this model (e.g. {unexpected[0]}).")
        return
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise TuneforgeError(f"{path} holds no model*.safetensors, but this run fine-tunes the full model.")
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = _tied_names(model)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise TuneforgeError(f"{path}: the weights do not fit this model (missing {missing[:3]}, "
                             f"unexpected {list(unexpected)[:3]}).")


def _tied_names(model) -> set[str]:
    """Parameter names that share storage with another parameter (tied embeddings are saved once)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.data_ptr() in seen:
            tied.update({name, seen[p.data_ptr()]})
        else:
            seen[p.data_ptr()] = name
    return tied
