"""Checkpoints and final weights of an FSDP2 run, without gathering the model into one process.

Checkpoints: every process writes its own shards of the model and optimizer states with
`torch.distributed.checkpoint` (DCP) into `checkpoint-N.tmp/sharded/`; the engine then publishes the
folder atomically as for any checkpoint. DCP stores each tensor's global shape and placement, so a
checkpoint loads on any number of processes (resharding on load).

Final weights: tensors are gathered one at a time (`DTensor.full_tensor`, a collective every process
joins) and the first process writes them into safetensors shards of at most `max_shard_bytes`, so its
memory holds one shard, not the model. Adapter runs gather the trainable tensors only (the adapter).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .fsdp import holds_nf4, local

FOLDER = "sharded"
PREFIX = "model."  # the runner holds the model as `.model`


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper -> the torch optimizer


def _options(runner: nn.Module):
    """A 4-bit base (QLoRA's NF4 weights, frozen) is left out of checkpoints: it never changes, and the resumed
    run quantizes it again from the base model, exactly as the first time. Loading is then not strict (the
    frozen keys are absent by design); every trainable key is still required, by `dcp.load`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    frozen_nf4 = holds_nf4(runner)
    return StateDictOptions(ignore_frozen_params=frozen_nf4, strict=not frozen_nf4)


def save(folder: Path, runner: nn.Module, optimizer, *, with_optimizer: bool) -> None:
    """Every process writes its shards of the model (and optimizer) states under folder/sharded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(runner, options=_options(runner))}
    if with_optimizer:
        state["optimizer"] = get_optimizer_state_dict(runner, _inner(optimizer))
    dcp.save(state, checkpoint_id=str(Path(folder) / FOLDER))


def exists(folder: Path) -> bool:
    return (Path(folder) / FOLDER / ".metadata").is_file()


def load(folder: Path, runner: nn.Module, optimizer, *, with_optimizer: bool) -> None:
    """Restore the model (and optimizer) shards from folder/sharded, whatever process count wrote them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = _options(runner)
    state = {"model": get_model_state_dict(runner, options=options)}
    if with_optimizer:
        state["optimizer"] = get_optimizer_state_dict(runner, _inner(optimizer))
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        dcp.load(state, checkpoint_id=str(Path(folder) / FOLDER))
    except (Exception, CheckpointException) as exc:  # missing keys, shape mismatches
        from tuneforge.errors import TuneforgeError

        detail = _first_cause(exc)
        raise TuneforgeError(
            f"{folder}: its sharded state does not fit this run's model{' and optimizer' if with_optimizer else ''} "
            f"({detail}). Resume with the config that wrote it (same base model, adapter and trainable "
            "parameters); the process count may differ.") from None
    set_model_state_dict(runner, state["model"], options=options)
    if with_optimizer:
        set_optimizer_state_dict(runner, _inner(optimizer), state["optimizer"])


def _first_cause(exc: BaseException) -> str:
    """The line that says what did not fit (DCP wraps each process's error in a report of tracebacks)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    said = [ln for ln in lines if "Error:" in ln or "Missing key" in ln or "size mismatch" in ln]
    return (said[-1] if said else lines[0] if lines else type(exc).__name__)[:300]


def full_tensors(runner: nn.Module, *, trainable_only: bool):
    """(name in the model, whole CPU tensor) one at a time, on every process (the gather is collective).
    Tied parameters are yielded once, under their first name, as `save_pretrained` stores them."""
    seen: set[int] = set()
    for name, param in runner.named_parameters(remove_duplicate=False):
        if id(param) in seen or (trainable_only and not param.requires_grad):
            continue
        seen.add(id(param))
        yield name.removeprefix(PREFIX), local(param.detach()).cpu()
    if not trainable_only:
        stored = set(runner.model.state_dict())  # persistent buffers only (no gather: shards are views)
        for name, buf in runner.model.named_buffers():
            if name in stored:
                yield name, local(buf).cpu()


def save_full_model(runner: nn.Module, model, tokenizer, folder: Path, *, main: bool, safe: bool = True,
                    max_shard_bytes: int = 5 * 2**30) -> None:
    """The trained model as a Hugging Face folder: the PEFT adapter (adapter runs) or safetensors shards."""
    write_hf_folder(lambda trainable_only: full_tensors(runner, trainable_only=trainable_only), model, tokenizer,
                    folder, main=main, safe=safe, max_shard_bytes=max_shard_bytes)


def write_hf_folder(tensors, model, tokenizer, folder: Path, *, main: bool, safe: bool = True,
                    max_shard_bytes: int = 5 * 2**30) -> None:
    """Write a Hugging Face folder from `tensors(trainable_only)`, an iterator of (name, whole CPU tensor) that
    every process runs (gathering is collective) while the first one writes: the PEFT adapter, or safetensors
    shards with the model's config. Shared by FSDP2 and DeepSpeed ZeRO."""
    from .collectives import barrier

    folder = Path(folder)
    if hasattr(model, "peft_config"):
        adapter = dict(tensors(True))
        if main:
            model.save_pretrained(str(folder), state_dict=adapter, safe_serialization=safe)
    else:
        _write_shards(tensors(False), folder, main, max_shard_bytes)
        if main:
            model.config.save_pretrained(str(folder))
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(str(folder))
    if main and tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    barrier()


def _write_shards(tensors, folder: Path, main: bool, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors:
        if not main:
            continue
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            _flush(shards, folder, save_file)
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    if main:
        _finish(shards, folder, save_file)


def _flush(shards: list[dict], folder: Path, save_file) -> None:
    """Write the current (full) shard under a temporary numbered name; its tensors are then freed."""
    index = len(shards)
    names = list(shards[-1])
    save_file(shards[-1], str(folder / f".shard-{index}.safetensors"), metadata={"format": "pt"})
    shards[-1] = dict.fromkeys(names)  # keep the names for the index; drop the tensors


def _finish(shards: list[dict], folder: Path, save_file) -> None:
    """Write the last shard and name every shard as transformers does (model-0000i-of-0000n)."""
    total = len(shards)
    last = shards[-1]
    if total == 1:
        save_file(last, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    save_file(last, str(folder / f".shard-{total}.safetensors"), metadata={"format": "pt"})
    weight_map, total_bytes = {}, 0
    for i, shard in enumerate(shards, start=1):
        final = f"model-{i:05d}-of-{total:05d}.safetensors"
        (folder / f".shard-{i}.safetensors").rename(folder / final)
        for name in shard:
            weight_map[name] = final
        total_bytes += (folder / final).stat().st_size
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
