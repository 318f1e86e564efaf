#!/usr/bin/env python
"""Generate the reference docs that are derived from code, so they cannot drift from it.

    python scripts/gen_config_docs.py          # (re)write docs/configuration.md and docs/dataset-formats.md
    python scripts/gen_config_docs.py --check  # exit 1 when a file is out of date or a key lacks a description

docs/configuration.md comes from the configuration schema (`tuneforge.config.Config`): every key of
every section with its type, default and description, grouped by area (one area per schema class),
then the nested blocks (`datasets:` entries, `trl:`, ...) and the Axolotl keys that are renamed,
ignored or not supported yet.

docs/dataset-formats.md shows each dataset `type:` with a sample row and the tokens and label mask that
tuneforge's own format code produces for it on the tiny test tokenizer (`tuneforge.tiny`).

tests/test_docs.py checks both files against a fresh rendering.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "configuration.md"
FORMATS_OUTPUT = ROOT / "docs" / "dataset-formats.md"

# Area titles and one-line intros, by schema class; a class not listed here gets its own name.
AREAS = {
    "ModelKeys": ("Model, tokenizer and precision", "What to load and how: weights, tokenizer, chat template, dtype."),
    "AdapterKeys": ("LoRA / QLoRA adapters", "Parameter-efficient training through PEFT."),
    "DataKeys": ("Datasets and sequence length", "Where rows come from, how they are cut, and packing."),
    "TrainingKeys": ("Training, evaluation and checkpoints", "Optimizer, schedule, evaluation and saving."),
    "LoggingKeys": ("Logging and trackers", "Metrics are always written to output_dir/metrics.jsonl."),
    "RLKeys": ("Preference and RL methods", "Keys of `rl:` methods, reward models and the `trl:` block."),
    "DistributedKeys": ("Several GPUs and sharding", "Data parallelism, FSDP2 and DeepSpeed (docs/multi-gpu.md)."),
    "VariantKeys": ("Training variants", "LISA, ReLoRA, the EAFT loss and Llama 4's per-expert linears "
                    "(docs/training-variants.md)."),
    "QuantizationKeys": ("Quantization-aware and FP8 training", "qat, fp8 and the quantization block "
                         "(docs/quantization.md)."),
}
# Where each nested block appears in a config, for its heading.
NESTED_TITLES = {
    "DatasetEntry": "Entries of `datasets:` and `test_datasets:`",
    "UserDefinedFormat": "`type:` as a mapping (user-defined instruction format)",
    "SpecialTokens": "`special_tokens:`",
    "TRLBlock": "`trl:`",
    "VLLMBlock": "`vllm:`",
    "QATBlock": "`qat:`",
    "PTQBlock": "`quantization:`",
}


# ---------------------------------------------------------------- schema walking
def own_fields(cls: type[BaseModel]) -> dict[str, FieldInfo]:
    """Fields declared by `cls` itself (not inherited), in declaration order."""
    declared = cls.__dict__.get("__annotations__", {})
    return {name: f for name, f in cls.model_fields.items() if name in declared}


def nested_models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found.extend(m for m in nested_models(arg) if m not in found)
    return found


def all_models(root: type[BaseModel]) -> list[type[BaseModel]]:
    """`root` and every model reachable through its fields, depth first, each once."""
    seen: list[type[BaseModel]] = []

    def visit(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.append(model)
        for f in model.model_fields.values():
            for sub in nested_models(f.annotation):
                visit(sub)

    visit(root)
    return seen


def missing_descriptions(root: type[BaseModel]) -> list[str]:
    """`Model.key` for every field (at any depth) without a description."""
    return [
        f"{model.__name__}.{f.alias or name}"
        for model in all_models(root)
        for name, f in model.model_fields.items()
        if not (f.description or "").strip()
    ]


# ---------------------------------------------------------------- rendering
def type_text(annotation: Any) -> str:
    """A readable type: `int`, `list[str]`, one of `a`, `b`; unions joined with "or"."""
    origin = typing.get_origin(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        values = [f"`{json.dumps(v).strip(chr(34))}`" for v in typing.get_args(annotation)]
        return values[0] if len(values) == 1 else "one of " + ", ".join(values)
    if origin in (typing.Union, types.UnionType):
        parts = [type_text(a) for a in typing.get_args(annotation) if a is not type(None)]
        return " or ".join(parts)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[mapping](#{anchor(annotation)})"
    if origin is list:
        (item,) = typing.get_args(annotation)
        inner = nested_models(item)
        if inner:
            return f"[list of mappings](#{anchor(inner[0])})"
        return f"`list[{_plain(item)}]`"
    return f"`{_plain(annotation)}`"


def _plain(annotation: Any) -> str:
    if annotation is Any:
        return "any"
    origin = typing.get_origin(annotation)
    if origin is None:
        return getattr(annotation, "__name__", str(annotation))
    args = ", ".join(_plain(a) for a in typing.get_args(annotation))
    return f"{origin.__name__}[{args}]"


def bounds_text(field: FieldInfo) -> str:
    signs = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    found = []
    for meta in field.metadata:
        for attr, sign in signs.items():
            value = getattr(meta, attr, None)
            if value is not None:
                found.append(f"{sign} {value}")
    return f" ({', '.join(found)})" if found else ""


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "**required**"
    value = field.default
    if value is PydanticUndefined and field.default_factory is not None:
        value = field.default_factory()
    if value is None:
        return "—"
    if isinstance(value, BaseModel):
        value = value.model_dump()
    return f"`{json.dumps(value)}`"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def anchor(model: type[BaseModel]) -> str:
    return "block-" + model.__name__.lower()


def table(fields: dict[str, FieldInfo]) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, f in fields.items():
        key = f.alias or name
        kind = type_text(f.annotation) + bounds_text(f)
        rows.append(f"| `{key}` | {cell(kind)} | {cell(default_text(f))} | {cell(f.description or '')} |")
    return rows


def compat_section() -> list[str]:
    from tuneforge.config import compat

    lines = ["## Axolotl keys handled specially", ""]
    lines += ["Deprecated names are accepted and rewritten, with a warning:", ""]
    renamed = {**{k: f"attn_implementation: {v}" for k, v in compat.ATTENTION_FLAGS.items()}, **compat.RENAMED}
    lines += [f"- `{old}` → `{new}`" for old, new in renamed.items()]
    lines += ["", "Accepted and ignored (they carry no meaning in tuneforge): "
              + ", ".join(f"`{k}`" for k in sorted(compat.IGNORED)) + ".", ""]
    lines += ["Accepted because tuneforge always does what they switch on, or has nothing they tune (setting one "
              "prints a note):", ""]
    by_reason: dict[str, list[str]] = {}
    for key, reason in compat.BUILT_IN.items():
        by_reason.setdefault(reason, []).append(f"`{key}`")
    lines += [f"- {', '.join(keys)}: {reason}" for reason, keys in by_reason.items()]
    lines += ["", "Not supported yet: a false/empty value is accepted, anything else is an error naming the key.", ""]
    lines += ["| key | status |", "|---|---|"]
    lines += [f"| `{k}` | {cell(v)} |" for k, v in sorted(compat.NOT_SUPPORTED_YET.items())]
    return lines


def render() -> str:
    from tuneforge.config import Config

    lines = [
        "<!-- Generated by scripts/gen_config_docs.py from the schema in src/tuneforge/config/. "
        "Do not edit by hand: change the Field descriptions and re-run the script. -->",
        "",
        "# Configuration reference",
        "",
        "A run is one YAML file. Keys use Axolotl's names. Unknown keys are errors (with a did-you-mean), "
        "and cross-field rules are checked before anything loads: `tuneforge validate config.yaml` prints the "
        "resolved config or every problem at once. Any key can be overridden on the command line as "
        "`--key value`, nested keys with a dot (`--trl.beta 0.1`). Relative paths are resolved against the "
        "config file's folder first, then the working directory; `output_dir` is relative to the working "
        "directory.",
        "",
        "Default `—` means unset (null): the feature is off or the value is derived, as the description says.",
        "",
    ]
    covered: set[str] = set()
    areas = [c for c in Config.__bases__ if issubclass(c, BaseModel)]
    lines += ["Areas: " + ", ".join(f"[{AREAS.get(c.__name__, (c.__name__,))[0]}](#area-{c.__name__.lower()})" for c in areas), ""]
    for cls in areas:
        title, intro = AREAS.get(cls.__name__, (cls.__name__, (cls.__doc__ or "").strip().splitlines()[0:1] or [""]))
        intro = intro if isinstance(intro, str) else " ".join(intro)
        fields = own_fields(cls)
        covered |= set(fields)
        lines += [f'<a id="area-{cls.__name__.lower()}"></a>', "", f"## {title}", "", intro, ""] + table(fields) + [""]
    rest = {n: f for n, f in Config.model_fields.items() if n not in covered}
    if rest:
        lines += ["## Other keys", ""] + table(rest) + [""]
    lines += ["# Nested blocks", ""]
    order = list(NESTED_TITLES)
    nested = sorted(all_models(Config)[1:], key=lambda m: order.index(m.__name__) if m.__name__ in order else len(order))
    for model in nested:
        title = NESTED_TITLES.get(model.__name__, model.__name__)
        doc = (model.__doc__ or "").strip()
        lines += [f'<a id="{anchor(model)}"></a>', "", f"## {title}", ""]
        if doc and not doc.startswith(("Usage docs", "!!! abstract")):
            lines += [doc.splitlines()[0], ""]
        lines += table(dict(model.model_fields)) + [""]
    lines += compat_section()
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- dataset formats
@dataclass
class FormatSample:
    title: str
    prose: str
    entry: dict[str, Any]  # the `datasets:` entry
    row: dict[str, Any] | Any  # one source row, or a function of the tokenizer that builds it
    config: dict[str, Any] = field(default_factory=dict)  # other top-level keys the sample needs


CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Reverse the word cat."},
    {"role": "assistant", "content": "tac"},
    {"role": "user", "content": "And dog?"},
    {"role": "assistant", "content": "god"},
]

FORMAT_SAMPLES = [
    FormatSample(
        "`chat_template`",
        "Conversations rendered with the chat template (`chat_template:` at the top level or per dataset; "
        "named templates: chatml, llama3, mistral, gemma, qwen3, phi_3; or `tokenizer_default`). Messages come "
        "from `field_messages` (default `messages`, else `conversations`). Every assistant turn is trained, with "
        "the end-of-turn token that closes it; system and user turns and the role headers are not. "
        "`roles_to_train`, `train_on_inputs`, `train_on_eos` / `train_on_eot` (`turn`, `all`, `last`, `none`) "
        "and a per-message `message_field_training` key change that.",
        {"path": "chats.jsonl", "type": "chat_template"},
        {"messages": CHAT},
        {"chat_template": "chatml"},
    ),
    FormatSample(
        "`chat_template` with ShareGPT-style rows",
        "Other key and role names are mapped: `message_property_mappings` renames the message keys, and the "
        "roles `human`/`gpt` (and `model`, `function`, ...) are recognised as user/assistant (extend them with "
        "`roles:`). `type: sharegpt` is accepted as a deprecated alias of exactly this (`conversations`, "
        "`from`/`value`). Here with the llama3 template, and a per-message `train` flag that leaves the first "
        "answer untrained.",
        {
            "path": "sharegpt.jsonl",
            "type": "chat_template",
            "field_messages": "conversations",
            "message_property_mappings": {"role": "from", "content": "value"},
            "message_field_training": "train",
        },
        {
            "conversations": [
                {"from": "human", "value": "Reverse the word cat."},
                {"from": "gpt", "value": "tac", "train": False},
                {"from": "human", "value": "And dog?"},
                {"from": "gpt", "value": "god"},
            ]
        },
        {"chat_template": "llama3"},
    ),
    FormatSample(
        "`alpaca`",
        "Instruction rows `instruction`, `input` (optional) and `output`, in the Stanford Alpaca prompt. The "
        "prompt is untrained (unless `train_on_inputs: true`); the output and the closing EOS are trained. "
        "A prompt style can follow the colon: `alpaca:instruct` (the default, shown), `alpaca:chat`, "
        "`alpaca:chatml`, `alpaca:llama3`, `alpaca:phi`; the chat styles close the answer with their "
        "end-of-turn token instead of EOS.",
        {"path": "alpaca.jsonl", "type": "alpaca"},
        {"instruction": "Reverse the word.", "input": "cat", "output": "tac"},
    ),
    FormatSample(
        "`alpaca:chatml`",
        "The same rows in the chatml style; a row without `input` uses the no-input prompt.",
        {"path": "alpaca.jsonl", "type": "alpaca:chatml"},
        {"instruction": "Name a color.", "output": "blue"},
    ),
    FormatSample(
        "`gpteacher`",
        "Like alpaca, with the answer in `response`.",
        {"path": "gpteacher.jsonl", "type": "gpteacher"},
        {"instruction": "Add the numbers.", "input": "2 + 3", "response": "5"},
    ),
    FormatSample(
        "`oasst`",
        "Rows `INSTRUCTION` and `RESPONSE` (OpenAssistant exports), in the alpaca prompt.",
        {"path": "oasst.jsonl", "type": "oasst"},
        {"INSTRUCTION": "Say hello.", "RESPONSE": "hello"},
    ),
    FormatSample(
        "`jeopardy`",
        "Rows `question`, `category` and `answer`; the answer is trained as `what is <answer>`.",
        {"path": "jeopardy.jsonl", "type": "jeopardy"},
        {"question": "It says meow.", "category": "ANIMALS", "answer": "a cat"},
    ),
    FormatSample(
        "`input_output` (template-free)",
        "A list of `segments`, each `{text, label}`: the texts are tokenized as written and concatenated, with "
        "no template, BOS or EOS added (write special tokens into the text yourself). Segments with "
        "`label: false` are not trained.",
        {"path": "segments.jsonl", "type": "input_output"},
        {"segments": [
            {"text": "<s>Q: reverse cat\nA: ", "label": False},
            {"text": "tac</s>", "label": True},
        ]},
    ),
    FormatSample(
        "`completion` (continued pretraining)",
        "Raw text from the `text` column (or the one named by `field`), every token trained, closed by EOS. A "
        "text longer than `sequence_len` is cut into consecutive chunks of `sequence_len` tokens instead of "
        "being dropped (shown with `sequence_len: 8`).",
        {"path": "corpus.jsonl", "type": "completion"},
        {"text": "The cat sat on the mat and the dog sat on the log."},
        {"sequence_len": 8},
    ),
    FormatSample(
        "user-defined format (`type:` as a mapping)",
        "Field names and format strings instead of a named type (all keys: "
        "[configuration.md](configuration.md#block-userdefinedformat)). The prompt is `system_format` + "
        "`format` (or `no_input_format` when the row has no input) and is untrained; the output and EOS are "
        "trained.",
        {
            "path": "qa.jsonl",
            "type": {
                "field_instruction": "question",
                "field_output": "answer",
                "format": "Q: {instruction}\nContext: {input}\nA: ",
                "no_input_format": "Q: {instruction}\nA: ",
            },
        },
        {"question": "What is 2 + 3?", "answer": "5"},
    ),
    FormatSample(
        "pre-tokenized rows (no `type:`)",
        "Rows that already hold `input_ids` (and optionally `labels`, same length, -100 = untrained) are kept "
        "verbatim; without `labels` every token is trained. Ids must be inside the tokenizer's vocabulary.",
        {"path": "tokens.jsonl"},
        lambda tok: _pretokenized_row(tok, "Q: reverse cat\nA:", " tac"),
    ),
    FormatSample(
        "Preference pairs: `chatml.intel` (DPO, IPO, SimPO, ORPO)",
        "With `rl: dpo` (or ipo, simpo, orpo) a row becomes two sequences that share the prompt, `chosen` and "
        "`rejected`; each answer and its end-of-turn token are labelled. The types keep Axolotl's names: "
        "`chatml.intel` `{system?, question, chosen, rejected}`, `chatml` (= `chatml.default`), `chatml.icr`, "
        "`chatml.prompt_pairs`, `chatml.ultra`, `chatml.argilla_chat`, the same with `llama3.`, "
        "`chat_template.default` (messages + chosen/rejected with the configured template), a mapping type "
        "(`field_prompt`, `field_chosen`, ...), or no type for rows already `{prompt, chosen, rejected}`.",
        {"path": "pairs.jsonl", "type": "chatml.intel"},
        {"system": "Answer briefly.", "question": "Reverse the word cat.", "chosen": "tac", "rejected": "cat"},
        {"rl": "dpo"},
    ),
    FormatSample(
        "Unpaired completions: `chatml.prompt_pairs` (KTO)",
        "With `rl: kto` each row is one completion with a boolean `label` (desirable or not). The same type "
        "names as for pairs apply, with `completion` instead of `chosen`/`rejected`.",
        {"path": "kto.jsonl", "type": "chatml.prompt_pairs"},
        {"prompt": "Reverse the word cat.", "completion": "tac", "label": True},
        {"rl": "kto"},
    ),
    FormatSample(
        "`bradley_terry.chat_template` (outcome reward model)",
        "With `reward_model: true`, pairs `{system?, input, chosen, rejected, margin?}`, each answer rendered as a "
        "one-turn chat with the configured template; the model scores the last token. Every preference type "
        "above works for reward models too.",
        {"path": "rm.jsonl", "type": "bradley_terry.chat_template"},
        {"input": "Reverse the word cat.", "chosen": "tac", "rejected": "cat"},
        {"reward_model": True, "chat_template": "chatml", "num_labels": 1},
    ),
    FormatSample(
        "`stepwise_supervised` (process reward model)",
        "With `process_reward_model: true`, rows `{prompt, completions: [step, ...], labels: [bool, ...]}`. Each "
        "step is followed by `step_separator` (default a newline) and its 0/1 label sits on the last token of "
        "the separator; every other token is -100. These labels are token classes, not next-token targets.",
        {"path": "steps.jsonl", "type": "stepwise_supervised"},
        {"prompt": "2 + 3 * 4 = ?", "completions": ["3 * 4 = 12", "2 + 12 = 14"], "labels": [True, True]},
        {"process_reward_model": True, "num_labels": 2},
    ),
    FormatSample(
        "`ebft_strided_structured.transform` and `ebft_strided_chat.transform` (EBFT strided mode)",
        "With `rl: ebft` and `ebft.mode: strided`, prompt/completion rows `{prompt, completion}` (or `input`/"
        "`output`) become one document whose completion is trained, plus `prompt_length`: strided blocks start "
        "after the prompt and `ebft.ce_coef`'s cross-entropy covers the completion. `ebft_strided_chat.transform` "
        "takes conversations, rendered and masked as `chat_template` does. Raw text needs no transform "
        "(`type: completion`). See docs/ebft-strided.md.",
        {"path": "ebft.jsonl", "type": "ebft_strided_structured.transform"},
        {"prompt": "Reverse the word cat.", "completion": " tac"},
        {"rl": "ebft", "ebft": {"mode": "strided"}},
    ),
]


def _pretokenized_row(tokenizer, prompt: str, answer: str) -> dict[str, list[int]]:
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": p + a, "labels": [-100] * len(p) + a}


def _mask_text(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """The row's text with untrained spans in [[ ]], as `tuneforge preprocess --debug --debug-text-only` shows it."""
    from tuneforge.data.formats import IGNORE_INDEX

    out, run, trained = [], [], None
    for tid, label in [*zip(input_ids, labels, strict=True), (None, None)]:
        is_trained = label != IGNORE_INDEX if tid is not None else None
        if run and (tid is None or is_trained != trained):
            text = tokenizer.decode(run, skip_special_tokens=False)
            out.append(text if trained else f"[[{text}]]")
            run = []
        if tid is not None:
            run.append(tid)
            trained = is_trained
    return "".join(out)


def _render_row(tokenizer, out: dict[str, Any], chunk: str) -> list[str]:
    """Every token sequence of a produced row (`input_ids`, or `chosen_input_ids`/`rejected_...`) with its mask."""
    lines = []
    extras = {k: v for k, v in out.items() if not isinstance(v, list) and not k.startswith("_")}
    for key in [k for k in out if k.endswith("input_ids")]:
        prefix = key[: -len("input_ids")]
        ids, labels = out[key], out.get(prefix + "labels", out[key])
        trained = sum(1 for label in labels if label != -100)
        name = f"`{prefix.rstrip('_')}` tokens" if prefix else "Tokens"
        lines += [f"{name} ({len(ids)}, {trained} labelled{chunk}):", "", "```text", _mask_text(tokenizer, ids, labels),
                  "```", ""]
        classes = [label for tid, label in zip(ids, labels, strict=True) if label != -100 and label != tid]
        if classes:  # labels that are classes (process reward models), not the tokens themselves
            lines += [f"Label values at the labelled tokens: {[lb for lb in labels if lb != -100]}.", ""]
    if extras:
        lines += ["Also in the row: " + ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in extras.items()) + ".", ""]
    return lines


def _type_index() -> list[str]:
    """Every registered `type:` name, grouped by the module that implements it, with its summary."""
    import importlib

    from tuneforge.data import formats

    by_module: dict[str, list[str]] = {}
    for name, fmt in formats.registered().items():
        if name not in ("pretokenized", "user_defined"):
            by_module.setdefault(fmt.builder.__module__, []).append(name)
    lines = ["## Every registered type", "", "| `type:` | what |", "|---|---|"]
    for module, names in by_module.items():
        doc = (importlib.import_module(module).__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        lines.append(f"| {', '.join(f'`{n}`' for n in names)} | {cell(doc)} |")
    lines += ["", "No `type:` means pre-tokenized rows; a mapping means a user-defined format (see above)."]
    return lines


def _format_rows(sample: FormatSample, model_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]], Any]:
    """(the source row, the rows the format produced, the tokenizer)."""
    from tuneforge.config import load
    from tuneforge.data import formats
    from tuneforge.models.tokenizer import load_tokenizer

    cfg = load(data={"base_model": str(model_dir), "datasets": [sample.entry], **sample.config})
    tokenizer = load_tokenizer(cfg)
    entry = cfg.datasets[0]
    fmt, style = formats.resolve(entry.type)
    row_fn = fmt.builder(formats.FormatContext(cfg=cfg, entry=entry, tokenizer=tokenizer, style=style))
    row = sample.row(tokenizer) if callable(sample.row) else sample.row
    return row, row_fn(json.loads(json.dumps(row))), tokenizer


def render_formats() -> str:
    import tempfile

    import yaml

    from tuneforge.tiny import build_tiny_tokenizer

    lines = [
        "<!-- Generated by scripts/gen_config_docs.py: the masks below are produced by tuneforge's format code "
        "on the tiny test tokenizer. Do not edit by hand; re-run the script. -->",
        "",
        "# Dataset formats",
        "",
        "Each `datasets:` entry names its rows' format with `type:`. A format turns one row into token ids and "
        "labels; a label of -100 means the token is not trained. Below, each type with a sample row and what "
        "tuneforge produces for it: untrained text is wrapped in `[[ ]]` and trained text is bare, the way "
        "`tuneforge preprocess config.yaml --debug --debug-text-only` prints your own data (the colour version "
        "adds green for trained text, and without `--debug-text-only` every token as `token(label, id)`).",
        "",
        "The samples use a small byte-level BPE test tokenizer that adds no BOS token; a tokenizer that adds one "
        "puts it first, untrained. Rows longer than `sequence_len` are dropped (`excess_length_strategy: drop`, "
        "the default), truncated, or rejected, except in `completion`, which cuts them into chunks. Your own "
        "Python can also be a format: `type: mymodule.my_function` is called as `my_function(row, tokenizer, "
        "cfg)` and returns a dict (or a list of dicts) with `input_ids` and `labels` (without `labels`, every token "
        "is trained).",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_tokenizer(tmp)
        for sample in FORMAT_SAMPLES:
            row, produced, tokenizer = _format_rows(sample, Path(tmp))
            lines += [f"## {sample.title}", "", sample.prose, "", "```yaml"]
            lines += yaml.safe_dump({**sample.config, "datasets": [sample.entry]}, sort_keys=False, width=100).rstrip().splitlines()
            lines += ["```", "", "Row:", "", "```json", json.dumps(row), "```", ""]
            for i, out in enumerate(produced):
                chunk = f", chunk {i + 1} of {len(produced)}" if len(produced) > 1 else ""
                lines += _render_row(tokenizer, out, chunk)
        lines += _continual_pretraining()
        lines += _type_index()
    return "\n".join(lines).rstrip() + "\n"


def _continual_pretraining() -> list[str]:
    """The streamed corpus (`pretraining_dataset:`), which is not a `type:` of `datasets:` (data/streaming.py)."""
    return [
        "## Continual pretraining (`pretraining_dataset:`, streamed)",
        "",
        "A corpus too large to prepare beforehand is streamed: `pretraining_dataset:` lists text sources that are "
        "read, tokenized and packed while training, so memory holds one shuffle window and one partial row "
        "whatever the corpus size, and nothing is cached. Each document is the text of `text_column` (default `text`) as BOS (when the "
        "tokenizer adds one) + tokens + EOS, every token trained, as in `completion`. Entry fields: `path` (a "
        "local `.jsonl`/`.json`/`.txt`/`.parquet`/`.csv` file or folder, `json`/`text`/`parquet`/`csv` with "
        "`data_files`, or a hub id, streamed), `data_files`, `name`, `split` (default `train`), `text_column`, "
        "`type: pretrain`, `skip` (rows skipped at the start) and `ds_type`.",
        "",
        "```yaml",
        "pretraining_dataset:",
        "  - path: json",
        "    data_files: [corpus/part-000.jsonl, corpus/part-001.jsonl]",
        "    type: pretrain",
        "    text_column: text",
        "test_datasets:                  # evaluation data (a stream holds no rows out: no val_set_size)",
        "  - path: corpus/held_out.jsonl",
        "    type: completion",
        "sequence_len: 2048",
        "max_steps: 10000                # required: a stream has no length known in advance",
        "pretrain_multipack_attn: true   # default: packed documents do not attend to each other",
        "streaming_multipack_buffer_size: 10000  # default: documents shuffled in windows of this many",
        "```",
        "",
        "- Rows of `sequence_len` tokens are filled in stream order: a document that does not fit starts the next "
        "row (the rest of the row is padding), and a document longer than a row is cut into row-sized pieces. "
        "With `pretraining_sample_concatenation: true` every row is filled: the document that does not fit is cut "
        "and its rest opens the next row. `pretrain_multipack_attn: false` makes each row one sequence, whose "
        "documents attend to each other.",
        "- The entries are read one after the other; after the last the stream starts again, and `epoch` in the "
        "logs counts these passes. Each data-parallel process reads every N-th document of N (its own shard).",
        "- Shuffling (`shuffle_merged_datasets`, default `true`): each process reads its documents "
        "`streaming_multipack_buffer_size` at a time (default 10,000; Axolotl's older name "
        "`pretrain_multipack_buffer_size` is accepted) and trains each such window in a random order seeded by "
        "`seed` and the pass, so a document moves less than one window from its place in the files, and every "
        "pass is ordered anew. Memory holds one window of source rows (their text, not yet tokenized). "
        "`shuffle_merged_datasets: false` reads the files in order. A corpus sorted by topic or source stays "
        "sorted at scales above the window: mix it beforehand, or raise the window.",
        "- Checkpoints hold the stream position (the file offset where the current window starts, the documents "
        "of it already taken, and the part of a document waiting for the next row): `--resume-from-checkpoint` "
        "continues with exactly the rows the uninterrupted run would have trained on, seeking in local "
        "JSON-lines and text files instead of reading the consumed part again (the current window is read again "
        "and its order rebuilt from the seed). Resume with the same `shuffle_merged_datasets`, "
        "`streaming_multipack_buffer_size` and `seed`.",
        "- Resuming on another number of processes works too: the stream restarts, in the new shards, at the "
        "earliest document that one of the saved processes had not yet put into a trained row. No document is "
        "skipped; the documents after that point that other processes had already trained are trained again: "
        "about one window per process at most, plus how far the processes had drifted apart (shards of unequal "
        "documents are read at unequal speeds). The log says where the stream restarted.",
        "- `streaming: true` streams `datasets:` the same way: each row goes through its `type:` format and the "
        "length rules of prepared data, and rows are packed with `sample_packing` (else one per row).",
        "- `tuneforge preprocess config.yaml --debug` shows the first packed rows of the stream. An example that "
        "trains on CPU: `examples/pretrain-tiny.yaml`.",
        "",
    ]


def outputs() -> dict[Path, str]:
    """Each generated file and its fresh text."""
    return {OUTPUT: render(), FORMATS_OUTPUT: render_formats()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when a generated file is out of date")
    args = parser.parse_args(argv)
    from tuneforge.config import Config

    missing = missing_descriptions(Config)
    if missing:
        print("config keys without a description (add Field(description=...)): " + ", ".join(missing), file=sys.stderr)
        return 1
    stale = []
    for path, text in outputs().items():
        current = path.read_text() if path.exists() else ""
        if current == text:
            continue
        if args.check:
            stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        names = ", ".join(str(p.relative_to(ROOT)) for p in stale)
        print(f"{names} out of date with the code; run: python scripts/gen_config_docs.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
