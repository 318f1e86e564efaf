"""Prompt datasets for online RL (GRPO/GDPO): rows become a tokenized prompt plus reward columns.

`type:` of a GRPO dataset entry is a *transform* (Axolotl's convention, not an SFT format):
- `module.function`: `function(cfg)` returns `row_mapper` or `(row_mapper, {"remove_columns": [...] |
  "__all__", "batched": bool})`; `row_mapper(example, tokenizer=None)` returns a dict with `prompt` (a
  string, or chat messages `[{"role", "content"}]`) and any extra columns the reward functions read (e.g.
  `answer`), or a list of such dicts (one source row, several prompts). With `"batched": True` the mapper
  takes and returns columns (dicts of lists), as `datasets.map(batched=True)` would call it.
- built-ins: `prompt` (the row already has `prompt`; also the default when `type` is empty),
  `question_answer` (`question`/`problem`/`prompt` column -> one user message; `answer`/`solution`
  kept as `answer`), `gsm8k` (like question_answer; the answer is the number after `####`).
  Style `:text` (`question_answer:text`) keeps the question as a plain-text prompt, without chat template.

Chat prompts are rendered with the tokenizer's chat template and `add_generation_prompt=True` (plus
`trl.chat_template_kwargs`); plain strings are tokenized without added special tokens (as TRL does).
Prompts longer than `trl.max_prompt_length` (or `max_prompt_len`) keep their last tokens.

The prepared rows hold `input_ids` (the prompt), `labels` (all -100: nothing is trained on a prompt),
`length`, `_source`, `_row`, `prompt_json` (the prompt as given, for reward functions) and
`columns_json` (the extra columns, JSON-encoded so any value shape survives Arrow).
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneforge.config.schema import Config
from tuneforge.errors import DataError

from .ebft_structured import PROMPT_TRANSFORMS
from .registry import IGNORE_INDEX

RowMapper = Callable[..., dict[str, Any]]
VERSION = "1"

_BUILTINS: dict[str, Callable[[Config, str | None], RowMapper]] = {}


def builtin(name: str):
    def deco(fn):
        _BUILTINS[name] = fn
        return fn

    return deco


def _first(row: dict[str, Any], names: tuple[str, ...], what: str) -> Any:
    for n in names:
        if n in row and row[n] is not None:
            return row[n]
    raise DataError(f"the row has no {what} column (looked for {', '.join(names)}); its columns are {sorted(row)}")


def _as_chat(text: str, style: str | None, system: str | None = None):
    if style == "text":
        return text
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": text}]


@builtin("prompt")
def _prompt(cfg: Config, style: str | None) -> RowMapper:
    def mapper(row: dict[str, Any]) -> dict[str, Any]:
        return {**row, "prompt": _first(row, ("prompt",), "prompt")}

    return mapper


@builtin("question_answer")
def _question_answer(cfg: Config, style: str | None) -> RowMapper:
    def mapper(row: dict[str, Any]) -> dict[str, Any]:
        question = _first(row, ("question", "problem", "prompt", "instruction"), "question")
        out = {k: v for k, v in row.items() if k not in ("question", "problem", "prompt", "instruction")}
        out["prompt"] = _as_chat(str(question), style, row.get("system"))
        answer = next((row[k] for k in ("answer", "solution", "output") if k in row), None)
        if answer is not None:
            out["answer"] = answer
        return out

    return mapper


_GSM8K_ANSWER = re.compile(r"####\s*(.+)$", re.S)


@builtin("gsm8k")
def _gsm8k(cfg: Config, style: str | None) -> RowMapper:
    qa = _question_answer(cfg, style)

    def mapper(row: dict[str, Any]) -> dict[str, Any]:
        out = qa(row)
        m = _GSM8K_ANSWER.search(str(out.get("answer", "")))
        if m:
            out["answer"] = m.group(1).strip().replace(",", "")
        return out

    return mapper


_BUILTINS.update(PROMPT_TRANSFORMS)  # EBFT's structured-mode transforms, under Axolotl's names


# ---------------------------------------------------------------- resolving `type:`
def resolve_transform(type_spec: Any, cfg: Config, where: str) -> tuple[RowMapper, Any]:
    """The row mapper for one dataset entry, and its remove_columns setting."""
    if type_spec is None:
        return _BUILTINS["prompt"](cfg, None), None
    if not isinstance(type_spec, str):
        raise DataError(f"{where}: GRPO datasets take `type: module.function` or one of "
                        f"{', '.join(sorted(_BUILTINS))}, not a dict of field_* keys.")
    name, _, style = type_spec.partition(":")
    if name in _BUILTINS:
        return _BUILTINS[name](cfg, style or None), None
    if "." not in name:
        raise DataError(f"{where}: unknown GRPO dataset type `{type_spec}`; use `module.function` (your transform) "
                        f"or one of {', '.join(sorted(_BUILTINS))}.")
    module_name, _, fn_name = name.rpartition(".")
    paths = [p for p in (str(Path.cwd()), str(cfg.source_dir) if cfg.source_dir else None) if p and p not in sys.path]
    sys.path[:0] = paths
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DataError(f"{where}: `type: {type_spec}` names module `{module_name}`, which cannot be imported "
                        f"({exc}). Put it next to the config file or where you run tuneforge.") from None
    finally:
        for p in paths:
            sys.path.remove(p)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise DataError(f"{where}: module `{module_name}` has no function `{fn_name}` (from `type: {type_spec}`).")
    made = fn(cfg)
    mapper, options = (made if isinstance(made, tuple) else (made, {}))
    if not callable(mapper):
        raise DataError(f"{where}: `{type_spec}`(cfg) must return a row mapper function (or (mapper, options)), "
                        f"not {type(mapper).__name__}.")
    if (options or {}).get("batched"):
        mapper = _unbatched(mapper)
    return mapper, (options or {}).get("remove_columns")


def _unbatched(batch_mapper: RowMapper) -> RowMapper:
    """A per-row mapper from one written for `datasets.map(batched=True)` (Axolotl's `{"batched": True}`
    option): the row goes in as a batch of one, and the columns that come back become a list of rows."""
    def mapper(row: dict[str, Any], tokenizer=None) -> list[dict[str, Any]]:
        batch = {k: [v] for k, v in row.items()}
        made = (batch_mapper(batch, tokenizer=tokenizer) if "tokenizer" in inspect.signature(batch_mapper).parameters
                else batch_mapper(batch))
        if not isinstance(made, dict) or not all(isinstance(v, list) for v in made.values()):
            raise DataError("a transform with `batched: True` must return a dict of equal-length lists")
        lengths = {len(v) for v in made.values()}
        if len(lengths) > 1:
            raise DataError(f"a transform with `batched: True` returned columns of different lengths {sorted(lengths)}")
        n = lengths.pop() if lengths else 0
        return [{k: v[i] for k, v in made.items()} for i in range(n)]

    return mapper


def _call_mapper(mapper: RowMapper, row: dict[str, Any], tokenizer) -> dict[str, Any]:
    params = inspect.signature(mapper).parameters
    if "tokenizer" in params:
        return mapper(row, tokenizer=tokenizer)
    return mapper(row)


# ---------------------------------------------------------------- tokenizing prompts
def prompt_limit(cfg: Config) -> int | None:
    trl = cfg.trl
    return (trl.max_prompt_length if trl and trl.max_prompt_length else None) or cfg.max_prompt_len


def tokenize_prompt(prompt: Any, tokenizer, cfg: Config) -> list[int]:
    if isinstance(prompt, str):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    elif isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        if tokenizer.chat_template is None:
            raise DataError("the prompt is a list of chat messages but the tokenizer has no chat template; set "
                            "`chat_template:` (e.g. chatml) or give plain-text prompts.")
        kwargs = (cfg.trl.chat_template_kwargs if cfg.trl else None) or {}
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **kwargs)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        raise DataError(f"`prompt` must be a string or a list of {{role, content}} messages, not {type(prompt).__name__}")
    limit = prompt_limit(cfg)
    return ids[-limit:] if limit and len(ids) > limit else ids


def prompt_rows(ds, mapper: RowMapper, remove: Any, cfg: Config, tokenizer, source: int, where: str) -> list[dict]:
    out = []
    for idx in range(len(ds)):
        row = ds[idx]
        try:
            mapped = _call_mapper(mapper, dict(row), tokenizer)
        except DataError as exc:
            raise DataError(f"{where} row {idx}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - the user's transform may raise anything
            raise DataError(f"{where} row {idx}: the transform failed with {type(exc).__name__}: {exc}") from exc
        # A transform may return a list: one source row becomes several prompts (one per assistant turn, say).
        for one in mapped if isinstance(mapped, list) else [mapped]:
            out.append(_prompt_row(one, row, remove, cfg, tokenizer, source, idx, f"{where} row {idx}"))
    return out


def _prompt_row(mapped: Any, row: dict, remove: Any, cfg: Config, tokenizer, source: int, idx: int,
                where: str) -> dict:
    try:
        if not isinstance(mapped, dict) or "prompt" not in mapped:
            raise DataError(f"the transform must return a dict with `prompt` (or a list of them), got "
                            f"{type(mapped).__name__}")
        ids = tokenize_prompt(mapped["prompt"], tokenizer, cfg)
        if not ids:
            raise DataError("the prompt is empty after tokenization")
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
    extra = {k: v for k, v in mapped.items() if k != "prompt"}
    if remove == "__all__":
        extra = {k: v for k, v in extra.items() if k not in row}
    elif remove:
        extra = {k: v for k, v in extra.items() if k not in set(remove)}
    try:
        columns = json.dumps(extra)
    except TypeError as exc:
        raise DataError(f"{where}: extra columns must be JSON values (str, number, list, dict): {exc}") from None
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(ids), "length": len(ids), "_source": source,
            "_row": idx, "prompt_json": json.dumps(mapped["prompt"]), "columns_json": columns}


def prepare_prompts(cfg: Config, tokenizer):
    """PreparedData of prompt rows for the GRPO objective (no cache: preparing prompts is cheap)."""
    import datasets

    from tuneforge.data.pipeline import PreparedData, Stats
    from tuneforge.data.sources import load_source

    def split(entries, key):
        rows, stats = [], Stats(name="all")
        for i, entry in enumerate(entries):
            where = f"{key}[{i}]"
            mapper, remove = resolve_transform(entry.type, cfg, where)
            ds = load_source(entry, cfg, where)
            produced = prompt_rows(ds, mapper, remove, cfg, tokenizer, i, where)
            stats.rows_in += len(ds)
            rows += produced
        if not rows:
            raise DataError(f"{key}: no prompts.")
        stats.rows_out = len(rows)
        stats.tokens = sum(r["length"] for r in rows)
        return datasets.Dataset.from_list(rows), stats

    if not cfg.datasets:
        raise DataError("no `datasets:` in the config; GRPO needs a dataset of prompts.")
    train, train_stats = split(cfg.datasets, "datasets")
    if cfg.shuffle_merged_datasets:
        train = train.shuffle(seed=cfg.seed)
    eval_ds, stats = None, {"train": train_stats}
    if cfg.test_datasets:
        eval_ds, stats["eval"] = split(cfg.test_datasets, "test_datasets")
    elif cfg.val_set_size:
        n_eval = int(cfg.val_set_size) if cfg.val_set_size >= 1 else max(1, round(cfg.val_set_size * len(train)))
        if n_eval >= len(train):  # the same guard as the SFT pipeline's split (data/pipeline.py)
            raise DataError(f"val_set_size {cfg.val_set_size} leaves no training prompts ({len(train)} prompts in "
                            "all). Lower val_set_size or add data.")
        parts = train.train_test_split(test_size=n_eval, seed=cfg.seed, shuffle=True)
        train, eval_ds = parts["train"], parts["test"]
        stats["eval"] = Stats(name="all", rows_in=len(eval_ds), rows_out=len(eval_ds))
        train_stats.rows_out = len(train)
    return PreparedData(train=train, eval=eval_ds, stats=stats)
