"""Writing the merged model: shard by shard (`merge_adapter`), or whole through PEFT (`merge_in_memory`).

The base model's safetensors shards are streamed: each shard is read, every adapter update that targets
one of its tensors is applied, the shard is written and freed. Peak memory is therefore about one shard
plus the adapter, whatever the size of the model. Tied input/output embeddings stay tied unless the
adapter makes them differ, in which case `lm_head.weight` is written and the tie is removed from config.json.

The result is written to a temporary sibling folder and published (`tuneforge.publish`) only when complete,
so an error never leaves a half-written model at the destination.
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.errors import NotSupportedYet
from tuneforge.publish import check_destination, publish

from .adapter import AdapterPlan, adapter_config, apply_update, read_adapter
from .base import LM_HEAD, BaseCheckpoint, check_shapes, open_base, resolve_names, tied_embedding

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
TOKENIZER_FILES = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|chat_template\.(jinja|json)|vocab\.(json|txt)"
    r"|merges\.txt|.*\.model|.*\.tiktoken)$"
)


@dataclass
class MergeReport:
    dest: Path
    shards: int
    total_bytes: int
    merged_tensors: int
    replaced_tensors: int
    vocab_size: int | None
    untied: bool


def _final(name: str, tensor, plan: AdapterPlan):
    if name in plan.replacements:
        tensor = plan.replacements[name].to(tensor.dtype)
    if name in plan.updates:
        tensor = apply_update(tensor, plan.updates[name], name)
    return tensor


def merge_adapter(
    base_dir: str | Path,
    adapter_dir: str | Path,
    dest: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    generation_config_dir: str | Path | None = None,
    overwrite: bool = False,
    prepare_base: Callable | None = None,
) -> MergeReport:
    """Merge the adapter in `adapter_dir` into the safetensors model in `base_dir`, writing `dest`.

    Tokenizer files come from `tokenizer_dir` when it has any (the training run's tokenizer, with its chat
    template), else from the base. Everything is validated before the first byte is written; an existing
    destination is handled by `tuneforge.publish` (never a folder tuneforge did not write). `prepare_base(model)`,
    when given, changes the loaded base model in place before the merge (quantized experts: the values the
    adapter was trained against); the base is then merged in memory.
    """
    base_dir, adapter_dir, dest = Path(base_dir), Path(adapter_dir), Path(dest)
    check_destination(dest, overwrite=overwrite)
    if adapter_config(adapter_dir).get("target_parameters") or prepare_base is not None:
        return merge_in_memory(base_dir, adapter_dir, dest, tokenizer_dir, generation_config_dir, overwrite,
                               prepare_base)
    plan = read_adapter(adapter_dir)
    base = open_base(base_dir)
    embed_key = tied_embedding(base)
    resolve_names(plan, base, embed_key)
    new_vocab = check_shapes(plan, base, embed_key)
    tie_touched = embed_key is not None and bool({embed_key, LM_HEAD} & plan.touched())

    with _building(dest, overwrite) as tmp:
        weight_map, total, untied = _write_shards(plan, base, embed_key if tie_touched else None, tmp)
        config = dict(base.config)
        if new_vocab is not None:
            _set_config(config, "vocab_size", new_vocab)
        if untied:
            _set_config(config, "tie_word_embeddings", False)
        _write_metadata(base, tmp, config, weight_map, total)
        copy_side_files(base_dir, tmp, tokenizer_dir, generation_config_dir)
    return MergeReport(
        dest=dest,
        shards=len(base.shards),
        total_bytes=total,
        merged_tensors=len(plan.updates),
        replaced_tensors=len(plan.replacements),
        vocab_size=new_vocab,
        untied=untied,
    )


@contextlib.contextmanager
def _building(dest: Path, overwrite: bool):
    """A temporary sibling folder to write the merged model into; published to `dest` when the body finishes,
    removed if it fails (an error never leaves a half-written model at the destination)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        yield tmp
        _honor_umask(tmp)
        publish(tmp, dest, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def merge_in_memory(base_dir: Path, adapter_dir: Path, dest: Path, tokenizer_dir, generation_config_dir,
                    overwrite: bool = False, prepare_base: Callable | None = None) -> MergeReport:
    """An adapter with `target_parameters` (LoRA on parameters such as MoE expert weights), merged by PEFT.

    Why not shard by shard: the layout of a parameter's delta (experts x in x out, or experts x out x in)
    depends on the module's code (PEFT reads its `is_transposed`), which the tensors alone do not tell. So
    the base is loaded whole (peak memory: the model in its stored dtype) and PEFT's `merge_and_unload`
    applies every update; the rest (tokenizer, side files, atomic replace) is the shard-wise merge's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = adapter_config(adapter_dir)
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise NotSupportedYet(f"{adapter_dir}: a {config['task_type']} adapter with target_parameters cannot be "
                              "merged here; only causal language models.")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    if prepare_base is not None:
        prepare_base(model)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    with _building(dest, overwrite) as tmp:
        merged.save_pretrained(tmp)
        (tmp / "generation_config.json").unlink(missing_ok=True)  # the run's, if any, as in the shard-wise merge
        copy_side_files(base_dir, tmp, tokenizer_dir, generation_config_dir)
    total = sum(p.numel() * p.element_size() for p in merged.state_dict().values())
    return MergeReport(dest=dest, shards=1, total_bytes=total,
                       merged_tensors=len(config.get("target_parameters") or []), replaced_tensors=0,
                       vocab_size=None, untied=False)


def _write_shards(plan: AdapterPlan, base: BaseCheckpoint, tied_embed: str | None, tmp: Path):
    """Stream the shards: read one, apply its updates, write it, free it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    weight_map: dict[str, str] = {}
    total = 0
    untied = False
    for shard in base.shards:
        tensors = {}
        with safe_open(str(base.folder / shard), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                tensor = f.get_tensor(name)
                if name == tied_embed:
                    # The stored embedding is also lm_head: build both, and store lm_head only if they differ.
                    head = _tied_head(tensor, name, plan)
                    tensor = _final(name, tensor, plan)
                    if not _same(head, tensor):
                        tensors[LM_HEAD] = head
                        untied = True
                else:
                    tensor = _final(name, tensor, plan)
                tensors[name] = tensor
        save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
        for name, tensor in tensors.items():
            weight_map[name] = shard
            total += tensor.numel() * tensor.element_size()
        del tensors
        gc.collect()
    return weight_map, total, untied


def _tied_head(stored, embed_key: str, plan: AdapterPlan):
    """lm_head of a tied model: its own saved tensor, else the embedding's shared base weight, plus its update.

    It never sees the embedding's own LoRA update or a modules_to_save copy of the embedding: in the adapter
    model those live in the embedding module only.
    """
    if LM_HEAD in plan.replacements:
        head = plan.replacements[LM_HEAD].to(stored.dtype)
    elif embed_key in plan.shared_replacements:
        head = plan.replacements[embed_key].to(stored.dtype)
    else:
        head = stored
    if LM_HEAD in plan.updates:
        head = apply_update(head, plan.updates[LM_HEAD], LM_HEAD)
    return head


def _same(a, b) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.equal(a, b))


def _set_config(config: dict[str, Any], key: str, value: Any) -> None:
    config[key] = value
    if isinstance(config.get("text_config"), dict) and key in config["text_config"]:
        config["text_config"][key] = value


def _write_metadata(base: BaseCheckpoint, tmp: Path, config: dict, weight_map: dict[str, str], total: int) -> None:
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if len(base.shards) > 1 or (base.folder / "model.safetensors.index.json").exists():
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def copy_side_files(base_dir: Path, tmp: Path, tokenizer_dir, generation_config_dir) -> None:
    """Non-weight files of the base (custom code, processor configs...), then the training tokenizer."""
    tok_src = Path(tokenizer_dir) if tokenizer_dir else None
    if tok_src is not None and not tokenizer_files(tok_src):
        tok_src = None
    for item in base_dir.iterdir():
        if not item.is_file() or item.name.startswith(".") or item.name.endswith(WEIGHT_SUFFIXES):
            continue
        if item.name in ("config.json", "README.md") or (tok_src and TOKENIZER_FILES.match(item.name)):
            continue
        shutil.copy2(item, tmp / item.name)
    for item in tokenizer_files(tok_src) if tok_src else []:
        shutil.copy2(item, tmp / item.name)
    gen = Path(generation_config_dir) / "generation_config.json" if generation_config_dir else None
    if gen is not None and gen.exists():
        shutil.copy2(gen, tmp / gen.name)


def _honor_umask(tmp: Path) -> None:
    """mkdtemp makes a private (0700) folder; the merged model gets the modes the user's umask gives."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    tmp.chmod(0o777 & ~mask)
    for item in tmp.iterdir():
        if item.is_file():
            item.chmod(0o666 & ~mask)


def tokenizer_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.is_file() and TOKENIZER_FILES.match(p.name)]
