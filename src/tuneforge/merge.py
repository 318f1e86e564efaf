"""`tuneforge merge-lora`: fold a LoRA / rsLoRA / DoRA adapter into its base model, one shard at a time.

The base model's safetensors shards are streamed: each shard is read, every adapter update that targets
one of its tensors is applied, the shard is written and freed. Peak memory is therefore about one shard
plus the adapter, whatever the size of the model. The math is PEFT's, restated on plain tensors:

    LoRA / rsLoRA   W' = W + s * B @ A,  s = alpha / r  (alpha / sqrt(r) with rsLoRA)
    DoRA            V  = W + s * B @ A,  W' = (m / ||V||_row) * V   (one norm per output feature)

`rank_pattern` / `alpha_pattern` give per-module r and alpha. Embedding LoRA (`lora_embedding_A/B`) and
`fan_in_fan_out` layers store the weight transposed, so they are merged in the transposed orientation.
Tensors saved whole in the adapter (`modules_to_save`, resized embeddings, `*.base_layer.weight`) replace
the base tensor before any delta is added. Tied input/output embeddings stay tied unless the adapter
makes them differ, in which case `lm_head.weight` is written and the tie is removed from config.json.

The result is written to a temporary sibling folder and renamed into place only when complete, so an
error never leaves a half-written model at the destination. Adapters on parameters (`target_parameters`,
MoE expert weights) are the exception to the streaming: PEFT merges them with the model in memory
(`merge_in_memory`).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.errors import ModelError, NotSupportedYet
from tuneforge.publish import check_destination, publish

log = logging.getLogger("tuneforge")

ADAPTER_PREFIX = "base_model.model."
LM_HEAD = "lm_head.weight"
EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
TOKENIZER_FILES = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|chat_template\.(jinja|json)|vocab\.(json|txt)"
    r"|merges\.txt|.*\.model|.*\.tiktoken)$"
)
# PEFT options that change what the adapter computes in ways a weight merge cannot express.
_UNMERGEABLE_OPTIONS = {
    "alora_invocation_tokens": "activated LoRA only applies after its invocation tokens",
    "layer_replication": "layer replication changes the model's structure",
    "trainable_token_indices": "trainable-token deltas are not supported by this merge",
    "use_qalora": "QA-LoRA is not supported by this merge",
    "lora_bias": "LoRA bias terms are not supported by this merge",
}


# ---------------------------------------------------------------- the adapter, as tensor updates
@dataclass
class LoraUpdate:
    """One adapted module: W (oriented out x in) gets scale * B @ A, then the DoRA rescale if any."""

    A: Any  # torch.Tensor (r, in)
    B: Any  # torch.Tensor (out, r)
    scale: float
    transposed: bool  # the stored weight is (in, out): embeddings and fan_in_fan_out layers
    magnitude: Any = None  # DoRA magnitude vector (out,)


@dataclass
class AdapterPlan:
    config: dict[str, Any]
    updates: dict[str, LoraUpdate] = field(default_factory=dict)  # base tensor name -> update
    replacements: dict[str, Any] = field(default_factory=dict)  # base tensor name -> whole tensor
    # Replacements saved as `*.base_layer.weight`: the layer's own base weight, which a tied lm_head shares.
    shared_replacements: set[str] = field(default_factory=set)

    def touched(self) -> set[str]:
        return set(self.updates) | set(self.replacements)


def _match_pattern(patterns: dict[str, Any], module: str) -> Any:
    """PEFT's rule: the first pattern that matches the end of the module name on a dot boundary."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
            return value
    return None


def _load_adapter_tensors(adapter_dir: Path) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    st = adapter_dir / "adapter_model.safetensors"
    if st.exists():
        return load_file(str(st))
    binary = adapter_dir / "adapter_model.bin"
    if binary.exists():
        return torch.load(str(binary), map_location="cpu", weights_only=True)
    raise ModelError(f"{adapter_dir} has adapter_config.json but no adapter_model.safetensors (or .bin) weights.")


def adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """adapter_config.json of `adapter_dir`, with one clear error when there is no adapter there."""
    cfg_file = adapter_dir / "adapter_config.json"
    if not adapter_dir.is_dir():
        raise ModelError(f"adapter folder not found: {adapter_dir}. Train first, or pass --lora-model-dir.")
    if not cfg_file.exists():
        if (adapter_dir / "config.json").exists():
            raise ModelError(
                f"{adapter_dir} holds a full model (config.json, no adapter_config.json): it is already a "
                "standalone model and there is nothing to merge. For an adapter elsewhere, pass --lora-model-dir."
            )
        raise ModelError(
            f"{adapter_dir} has no adapter_config.json, so it holds no LoRA adapter. Pass the folder that "
            "training wrote the adapter to with --lora-model-dir."
        )
    return json.loads(cfg_file.read_text())


def read_adapter(adapter_dir: str | Path) -> AdapterPlan:
    """Read a PEFT LoRA adapter folder into per-tensor updates keyed by base checkpoint names."""
    adapter_dir = Path(adapter_dir)
    config = adapter_config(adapter_dir)
    cfg_file = adapter_dir / "adapter_config.json"
    if config.get("peft_type", "LORA") != "LORA":
        raise NotSupportedYet(f"{cfg_file}: peft_type {config['peft_type']} cannot be merged; only LORA adapters.")
    for key, why in _UNMERGEABLE_OPTIONS.items():
        if config.get(key):
            raise NotSupportedYet(f"{cfg_file}: `{key}` is set; {why}.")

    raw, replacements, shared = _classify(_load_adapter_tensors(adapter_dir))
    plan = AdapterPlan(config=config, replacements=replacements, shared_replacements=shared)
    alpha_default = float(config.get("lora_alpha", 8))
    rslora = bool(config.get("use_rslora"))
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    for module, parts in raw.items():
        if "A" not in parts or "B" not in parts:
            raise ModelError(f"adapter is incomplete: module {module} lacks its lora_A or lora_B tensor.")
        A, B = parts["A"], parts["B"]
        if A.dim() != 2 or B.dim() != 2:
            raise NotSupportedYet(f"adapter module {module} is not a linear or embedding layer (conv LoRA).")
        r = A.shape[0]
        alpha = _match_pattern(config.get("alpha_pattern") or {}, module)
        alpha = alpha_default if alpha is None else float(alpha)
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        embedding = parts.get("kind") == "embedding"
        plan.updates[f"{module}.weight"] = LoraUpdate(
            A=A, B=B, scale=scale, transposed=embedding or fan_in_fan_out, magnitude=parts.get("m")
        )
    return plan


def _classify(tensors: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, Any], set[str]]:
    """Sort saved tensors into LoRA parts per module, whole-tensor replacements, and shared base weights."""
    raw: dict[str, dict[str, Any]] = {}
    replacements: dict[str, Any] = {}
    shared: set[str] = set()
    for key, tensor in tensors.items():
        name = key[len(ADAPTER_PREFIX):] if key.startswith(ADAPTER_PREFIX) else key
        if ".original_module." in name:
            continue  # the untrained module inside a modules_to_save wrapper; its trained copy is saved too
        name = name.replace(".modules_to_save.", ".")
        part = _lora_part(name)
        if part is None:
            if "lora_" in name or "token_adapter" in name:
                raise NotSupportedYet(f"adapter tensor {key} is of a kind this merge does not handle.")
            # A whole tensor: modules_to_save, or a (possibly resized) embedding base layer.
            target = name.replace(".base_layer.", ".")
            replacements[target] = tensor
            if ".base_layer." in name:
                shared.add(target)
            continue
        module, role = part
        entry = raw.setdefault(module, {})
        entry[role] = tensor
        if "lora_embedding_" in name:
            entry["kind"] = "embedding"
    return raw, replacements, shared


def _lora_part(name: str) -> tuple[str, str] | None:
    """Split `module.lora_A.weight` style names into (module, role); None for whole tensors."""
    suffixes = {
        ".lora_A.weight": "A",
        ".lora_B.weight": "B",
        ".lora_embedding_A": "A",
        ".lora_embedding_B": "B",
        ".lora_magnitude_vector": "m",
        ".lora_magnitude_vector.weight": "m",
    }
    for suffix, role in suffixes.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], role
    return None


# ---------------------------------------------------------------- the math on one tensor
def apply_update(weight, update: LoraUpdate, name: str):
    """W' for one tensor, computed in float32 and returned in the weight's dtype."""
    import torch

    w = weight.to(torch.float32)
    oriented = w.T if update.transposed else w
    delta = update.scale * (update.B.to(torch.float32) @ update.A.to(torch.float32))
    if delta.shape != oriented.shape:
        want = tuple(delta.T.shape if update.transposed else delta.shape)
        raise ModelError(
            f"adapter does not fit the base model: {name} has shape {tuple(weight.shape)} in the base, but the "
            f"adapter's update for it has shape {want}. Is base_model the model this adapter was trained on?"
        )
    merged = oriented + delta
    if update.magnitude is not None:
        # DoRA: rescale each output feature to the learned magnitude; the norm is of the updated weight.
        norm = torch.linalg.norm(merged, dim=1)
        merged = merged * (update.magnitude.to(torch.float32) / norm).unsqueeze(1)
    merged = merged.T if update.transposed else merged
    return merged.to(weight.dtype).contiguous()


# ---------------------------------------------------------------- the base checkpoint
@dataclass
class BaseCheckpoint:
    folder: Path
    shards: list[str]  # file names, in order
    shapes: dict[str, tuple[int, ...]]  # tensor name -> shape
    where: dict[str, str]  # tensor name -> shard file name
    config: dict[str, Any]


def open_base(folder: Path) -> BaseCheckpoint:
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").exists():
        shards = ["model.safetensors"]
    elif any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise ModelError(
            f"{folder} holds PyTorch .bin weights only; merge-lora streams safetensors shards. Convert the base "
            "once (load it with transformers and save_pretrained), then point base_model to the new folder."
        )
    else:
        raise ModelError(f"no model weights (model.safetensors or its index) found in {folder}.")
    config_file = folder / "config.json"
    if not config_file.exists():
        raise ModelError(f"{folder} has no config.json; is base_model a model folder?")
    config = json.loads(config_file.read_text())
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantized")
        raise ModelError(
            f"the base checkpoint in {folder} is stored pre-quantized ({method}); merging needs its original "
            "16/32-bit weights. Set base_model to the unquantized model the quantized one was made from."
        )
    shapes: dict[str, tuple[int, ...]] = {}
    where: dict[str, str] = {}
    for shard in shards:
        if not (folder / shard).exists():
            raise ModelError(f"{folder}: the index lists {shard}, which is missing (incomplete download?).")
        with safe_open(str(folder / shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                shapes[key] = tuple(f.get_slice(key).get_shape())
                where[key] = shard
    return BaseCheckpoint(folder, shards, shapes, where, config)


def _tied(base: BaseCheckpoint) -> str | None:
    """Name of the input embedding when lm_head shares it (no lm_head tensor stored), else None."""
    tie = base.config.get("tie_word_embeddings")
    if tie is None:
        tie = (base.config.get("text_config") or {}).get("tie_word_embeddings", False)
    if not tie or LM_HEAD in base.shapes:
        return None
    candidates = [k for k in base.shapes if k.endswith(EMBED_SUFFIXES)]
    return candidates[0] if len(candidates) == 1 else None


def _resolve_names(plan: AdapterPlan, base: BaseCheckpoint, embed_key: str | None) -> None:
    """Rename adapter targets to the base's tensor names; fail on any target the base does not have."""
    known = set(base.shapes) | ({LM_HEAD} if embed_key else set())

    def resolve(name: str) -> str:
        if name in known:
            return name
        for alt in (name.removeprefix("model."), f"model.{name}"):
            if alt in known:
                return alt
        sample = ", ".join(sorted(base.shapes)[:3])
        raise ModelError(
            f"adapter targets {name}, which the base checkpoint in {base.folder} does not have (its tensors look "
            f"like: {sample}, ...). Is base_model the model this adapter was trained on?"
        )

    plan.updates = {resolve(k): v for k, v in plan.updates.items()}
    plan.replacements = {resolve(k): v for k, v in plan.replacements.items()}
    plan.shared_replacements = {resolve(k) for k in plan.shared_replacements}


def _check_shapes(plan: AdapterPlan, base: BaseCheckpoint, embed_key: str | None) -> int | None:
    """Validate every update against the base before writing anything; return the new vocab size if resized."""
    vocab = base.config.get("vocab_size") or (base.config.get("text_config") or {}).get("vocab_size")
    new_vocab = None
    def base_shape_of(name: str) -> tuple[int, ...]:
        return base.shapes[name] if name in base.shapes else base.shapes[embed_key]  # lm_head of a tied model

    for name, tensor in plan.replacements.items():
        base_shape = base_shape_of(name)
        shape = tuple(tensor.shape)
        if shape == base_shape:
            continue
        resized = len(shape) == 2 and shape[1:] == base_shape[1:] and base_shape[0] == vocab
        if not resized:
            raise ModelError(
                f"adapter does not fit the base model: {name} has shape {base_shape} in the base but {shape} in the "
                "adapter. Is base_model the model this adapter was trained on?"
            )
        if new_vocab not in (None, shape[0]):
            raise ModelError(f"adapter holds embeddings of two different vocabulary sizes ({new_vocab}, {shape[0]}).")
        new_vocab = shape[0]
    for name, upd in plan.updates.items():
        shape = tuple(plan.replacements[name].shape) if name in plan.replacements else base_shape_of(name)
        out_in = (upd.B.shape[0], upd.A.shape[1])
        expect = out_in[::-1] if upd.transposed else out_in
        if tuple(expect) != tuple(shape):
            raise ModelError(
                f"adapter does not fit the base model: {name} has shape {shape} in the base, but the adapter's "
                f"update for it has shape {tuple(expect)}. Is base_model the model this adapter was trained on?"
            )
        if upd.magnitude is not None and upd.magnitude.numel() != out_in[0]:
            raise ModelError(f"adapter's DoRA magnitude for {name} has {upd.magnitude.numel()} values, expected {out_in[0]}.")
    if embed_key and embed_key in plan.replacements and embed_key not in plan.shared_replacements:
        head = plan.replacements.get(LM_HEAD)
        head_rows = head.shape[0] if head is not None else base.shapes[embed_key][0]
        if head_rows != plan.replacements[embed_key].shape[0]:
            raise ModelError(
                f"the base ties lm_head to {embed_key}, but the adapter resizes {embed_key} only "
                f"({head_rows} vs {plan.replacements[embed_key].shape[0]} rows); save lm_head with the adapter too."
            )
    return new_vocab


# ---------------------------------------------------------------- the merge
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
) -> MergeReport:
    """Merge the adapter in `adapter_dir` into the safetensors model in `base_dir`, writing `dest`.

    Tokenizer files come from `tokenizer_dir` when it has any (the training run's tokenizer, with its chat
    template), else from the base. Everything is validated before the first byte is written; an existing
    destination is handled by `tuneforge.publish` (never a folder tuneforge did not write).
    """
    base_dir, adapter_dir, dest = Path(base_dir), Path(adapter_dir), Path(dest)
    check_destination(dest, overwrite=overwrite)
    if adapter_config(adapter_dir).get("target_parameters"):
        return merge_in_memory(base_dir, adapter_dir, dest, tokenizer_dir, generation_config_dir, overwrite)
    plan = read_adapter(adapter_dir)
    base = open_base(base_dir)
    embed_key = _tied(base)
    _resolve_names(plan, base, embed_key)
    new_vocab = _check_shapes(plan, base, embed_key)
    tie_touched = embed_key is not None and bool({embed_key, LM_HEAD} & plan.touched())

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        weight_map, total, untied = _write_shards(plan, base, embed_key if tie_touched else None, tmp)
        config = dict(base.config)
        if new_vocab is not None:
            _set_config(config, "vocab_size", new_vocab)
        if untied:
            _set_config(config, "tie_word_embeddings", False)
        _write_metadata(base, tmp, config, weight_map, total)
        _copy_side_files(base_dir, tmp, tokenizer_dir, generation_config_dir)
        publish(tmp, dest, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return MergeReport(
        dest=dest,
        shards=len(base.shards),
        total_bytes=total,
        merged_tensors=len(plan.updates),
        replaced_tensors=len(plan.replacements),
        vocab_size=new_vocab,
        untied=untied,
    )


def merge_in_memory(base_dir: Path, adapter_dir: Path, dest: Path, tokenizer_dir, generation_config_dir,
                    overwrite: bool = False) -> MergeReport:
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
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        merged.save_pretrained(tmp)
        (tmp / "generation_config.json").unlink(missing_ok=True)  # the run's, if any, as in the shard-wise merge
        _copy_side_files(base_dir, tmp, tokenizer_dir, generation_config_dir)
        publish(tmp, dest, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def _copy_side_files(base_dir: Path, tmp: Path, tokenizer_dir, generation_config_dir) -> None:
    """Non-weight files of the base (custom code, processor configs...), then the training tokenizer."""
    tok_src = Path(tokenizer_dir) if tokenizer_dir else None
    if tok_src is not None and not _tokenizer_files(tok_src):
        tok_src = None
    for item in base_dir.iterdir():
        if not item.is_file() or item.name.startswith(".") or item.name.endswith(WEIGHT_SUFFIXES):
            continue
        if item.name in ("config.json", "README.md") or (tok_src and TOKENIZER_FILES.match(item.name)):
            continue
        shutil.copy2(item, tmp / item.name)
    for item in _tokenizer_files(tok_src) if tok_src else []:
        shutil.copy2(item, tmp / item.name)
    gen = Path(generation_config_dir) / "generation_config.json" if generation_config_dir else None
    if gen is not None and gen.exists():
        shutil.copy2(gen, tmp / gen.name)


def _tokenizer_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.is_file() and TOKENIZER_FILES.match(p.name)]


# ---------------------------------------------------------------- the command
def find_adapter_dir(cfg, lora_model_dir: str | None) -> Path:
    """--lora-model-dir, else output_dir when it holds an adapter, else the config's lora_model_dir."""
    if lora_model_dir:
        return Path(cfg.resolve_path(lora_model_dir))
    out = cfg.output_path()
    if (out / "adapter_config.json").exists() or not cfg.lora_model_dir:
        return out
    log.info("output_dir %s holds no adapter; using lora_model_dir %s", out, cfg.lora_model_dir)
    return Path(cfg.resolve_path(cfg.lora_model_dir))


def base_model_dir(cfg, base_model: str | None = None) -> Path:
    """The base model as a local folder: a path, or a hub id already in the local cache (or downloadable)."""
    from tuneforge.models.tokenizer import model_source

    src = model_source(cfg, base_model)
    if Path(src).expanduser().is_dir():
        return Path(src).expanduser()
    if src.startswith((".", "/", "~")) or src.count("/") > 1:
        raise ModelError(f"base model folder not found: {src}. Check base_model.")
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            src,
            revision=cfg.model_revision,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken", "*.py"],
        )
    except Exception as exc:
        raise ModelError(
            f"could not get base model `{src}`: not a local folder, and the hub download failed "
            f"({type(exc).__name__}). Download it once and point base_model to the folder."
        ) from None
    return Path(path)


def run(cfg, lora_model_dir: str | None = None, output: str | None = None, dequant: bool = False,
        overwrite: bool = False) -> Path:
    """Entry point of `tuneforge merge-lora`."""
    quantized = cfg.adapter == "qlora" or cfg.load_in_4bit or cfg.load_in_8bit
    if quantized and not dequant:
        raise ModelError(
            "this run trained a QLoRA/8-bit adapter on a quantized base. Merging writes the base in its stored "
            "16/32-bit precision plus the adapter delta (a 4-bit model cannot hold the delta exactly). The "
            "adapter learned against the quantized weights, so the merged model differs from the QLoRA model "
            "by about the quantization error. Re-run with --dequant to accept this."
        )
    adapter_dir = find_adapter_dir(cfg, lora_model_dir)
    recorded = adapter_config(adapter_dir).get("base_model_name_or_path")
    dest = Path(output).expanduser() if output else cfg.output_path() / "merged"
    check_destination(dest, overwrite=overwrite)
    saved_base = cfg.output_path() / "base_model"  # an adapter trained on a randomly initialised base
    base_dir = saved_base if cfg.reinit_weights and saved_base.is_dir() else base_model_dir(cfg)
    if quantized:
        log.warning(
            "--dequant: merging into the unquantized base weights from %s; outputs will differ slightly from "
            "the 4-bit training model (quantization error).",
            base_dir,
        )
    if recorded and Path(recorded).name != base_dir.name and recorded != cfg.base_model:
        log.warning("the adapter was trained on %s, but base_model is %s", recorded, cfg.base_model)
    tokenizer_dir = adapter_dir if _tokenizer_files(adapter_dir) else cfg.output_path()
    gen_dir = adapter_dir if (adapter_dir / "generation_config.json").exists() else base_dir
    log.info("merging %s into %s -> %s", adapter_dir, base_dir, dest)
    report = merge_adapter(base_dir, adapter_dir, dest, tokenizer_dir=tokenizer_dir, generation_config_dir=gen_dir,
                           overwrite=overwrite)
    log.info(
        "merged %d LoRA modules and %d saved tensors over %d shard(s) (%.1f MB) into %s%s",
        report.merged_tensors,
        report.replaced_tensors,
        report.shards,
        report.total_bytes / 1e6,
        dest,
        f"; vocab_size -> {report.vocab_size}" if report.vocab_size else "",
    )
    return dest
