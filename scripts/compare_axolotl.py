"""Compare tuneforge's tokens and label masks with Axolotl's on the same small datasets.

A manual cross-check, not a test (CI has no Axolotl): the script runs twice in two environments.
In tuneforge's venv it writes the datasets, tokenizes every case with `tuneforge.data.pipeline.prepare`,
then starts itself under Axolotl's Python (`--axolotl-side`), which tokenizes the same rows with Axolotl's
own dataset code path (`_load_and_process_single_dataset`: load the file, pick the prompt strategy,
tokenize) and writes `input_ids`/`labels` to JSON. Rows are then compared one by one: equal `input_ids`,
and equal trained spans (labels != -100); every difference is printed with its tokens decoded.

    AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \\
        .venv/bin/python scripts/compare_axolotl.py --axolotl-python /tmp/axo/bin/python --model /tmp/axo-tiny

`--model` is a local model folder, e.g. one made by `tuneforge.tiny.build_tiny_model`. The Axolotl side
imports nothing from tuneforge, so it runs in a venv where only Axolotl is installed.
See docs/axolotl-compatibility.md for the results and the reasons behind each difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

IGNORE = -100

# ---------------------------------------------------------------- the datasets
CHAT_ROWS = [
    {"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "Now 10 and 4."},
        {"role": "assistant", "content": "14, the sum of the two."},
    ]},
    {"messages": [
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello there, how are you?"},
    ]},
    {"messages": [
        {"role": "user", "content": "Write two lines\nabout water."},
        {"role": "assistant", "content": "Water is a thing.\nIt has a long way to go."},
        {"role": "user", "content": "And one about the city."},
        {"role": "assistant", "content": "The city is big."},
        {"role": "user", "content": "Thanks."},
        {"role": "assistant", "content": "You are welcome."},
    ]},
]
# Text with edge whitespace, and a per-turn `train` flag (message_field_training) on some turns.
EDGE_ROWS = [
    {"messages": [
        {"role": "system", "content": "Be kind. "},
        {"role": "user", "content": " Hi there\n", "train": False},
        {"role": "assistant", "content": " Hello, you.\n", "train": False},
        {"role": "user", "content": "Count to three.", "train": True},
        {"role": "assistant", "content": "One two three."},
    ]},
]
SHAREGPT_ROWS = [
    {"conversations": [
        {"from": "system", "value": "Answer in one word."},
        {"from": "human", "value": "What is the color of water?"},
        {"from": "gpt", "value": "Blue."},
        {"from": "human", "value": "And of the earth?"},
        {"from": "gpt", "value": "Brown."},
    ]},
]
ALPACA_ROWS = [
    {"instruction": "Add the numbers.", "input": "12 and 30", "output": "42"},
    {"instruction": "Say something about the city.", "input": "", "output": "The city is very big."},
]
IO_ROWS = [
    {"segments": [
        {"text": "<s>Question: what is 2 + 2?\n", "label": False},
        {"text": "Answer: 4</s>", "label": True},
    ]},
    {"segments": [
        {"text": "User: hello\n", "label": False},
        {"text": "Bot: hi", "label": True},
        {"text": "\nUser: bye\n", "label": False},
        {"text": "Bot: bye</s>", "label": True},
    ]},
]
COMPLETION_ROWS = [
    {"text": "The water is in the city."},
    {"text": " ".join(["the number of people in the world is very large"] * 6)},
]
DATASETS = {
    "chat": CHAT_ROWS, "edge": EDGE_ROWS, "sharegpt": SHAREGPT_ROWS, "alpaca": ALPACA_ROWS, "io": IO_ROWS, "completion": COMPLETION_ROWS,
}
EOT = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}


def cases() -> list[dict[str, Any]]:
    """Each case: a name, the dataset it reads, its `datasets:` entry and its top-level keys (Axolotl names)."""
    out: list[dict[str, Any]] = []
    for tmpl in ("chatml", "llama3"):
        chat = {"type": "chat_template"}
        top = {"chat_template": tmpl}
        eot = {**top, "eot_tokens": [EOT[tmpl]]}
        out.append({"name": f"{tmpl} defaults", "data": "chat", "entry": chat, "top": top})
        # A tokenizer whose eos_token is the template's terminator (as in Qwen's chatml models).
        out.append({"name": f"{tmpl} defaults, eos_token={EOT[tmpl]}", "data": "chat", "entry": chat,
                    "top": {**top, "special_tokens": {"eos_token": EOT[tmpl]}}})
        for mode in ("turn", "all", "last", "none"):
            out.append({"name": f"{tmpl} eot_tokens, train_on_eos={mode}", "data": "chat",
                        "entry": {**chat, "train_on_eos": mode}, "top": eot})
        out.append({"name": f"{tmpl} eot_tokens, roles_to_train=[user, assistant]", "data": "chat",
                    "entry": {**chat, "roles_to_train": ["user", "assistant"]}, "top": eot})
        out.append({"name": f"{tmpl} eot_tokens, roles_to_train=[user]", "data": "chat",
                    "entry": {**chat, "roles_to_train": ["user"]}, "top": eot})
        out.append({"name": f"{tmpl} eot_tokens, train_on_inputs", "data": "chat", "entry": chat,
                    "top": {**eot, "train_on_inputs": True}})
        # The same Jinja text on both sides (Axolotl's named template): only the masking differs.
        out.append({"name": f"{tmpl} axolotl jinja, eot_tokens, turn", "data": "chat", "entry": chat,
                    "top": eot, "tf_jinja_of": tmpl})
        out.append({"name": f"{tmpl} axolotl jinja, eot_tokens, train_on_eos=all", "data": "chat",
                    "entry": {**chat, "train_on_eos": "all"}, "top": eot, "tf_jinja_of": tmpl})
    out.append({"name": "chatml sharegpt from/value", "data": "sharegpt",
                "entry": {"type": "chat_template", "field_messages": "conversations",
                          "message_property_mappings": {"role": "from", "content": "value"}},
                "top": {"chat_template": "chatml", "eot_tokens": ["<|im_end|>"]}})
    for tmpl in ("chatml", "llama3"):
        top = {"chat_template": tmpl, "eot_tokens": [EOT[tmpl]]}
        out.append({"name": f"{tmpl} edge whitespace, message_field_training", "data": "edge",
                    "entry": {"type": "chat_template", "message_field_training": "train"}, "top": top})
        out.append({"name": f"{tmpl} edge whitespace, drop_system_message", "data": "edge",
                    "entry": {"type": "chat_template", "drop_system_message": True}, "top": top})
        for key, entry in (("message_field_training", {"message_field_training": "train"}),
                           ("drop_system_message", {"drop_system_message": True})):
            out.append({"name": f"{tmpl} axolotl jinja, edge whitespace, {key}", "data": "edge",
                        "entry": {"type": "chat_template", **entry}, "top": top, "tf_jinja_of": tmpl})
    out.append({"name": "chatml default_system_message", "data": "chat", "entry": {"type": "chat_template"},
                "top": {"chat_template": "chatml", "eot_tokens": ["<|im_end|>"],
                        "default_system_message": "You are a helper."}})
    out.append({"name": "alpaca", "data": "alpaca", "entry": {"type": "alpaca"}, "top": {}})
    out.append({"name": "alpaca train_on_inputs", "data": "alpaca", "entry": {"type": "alpaca"},
                "top": {"train_on_inputs": True}})
    out.append({"name": "alpaca:chatml", "data": "alpaca", "entry": {"type": "alpaca:chatml"}, "top": {}})
    out.append({"name": "alpaca:phi", "data": "alpaca", "entry": {"type": "alpaca:phi"}, "top": {}})
    out.append({"name": "input_output",  "data": "io", "entry": {"type": "input_output"}, "top": {}})
    out.append({"name": "completion (sequence_len 16: chunks)", "data": "completion",
                "entry": {"type": "completion"}, "top": {"sequence_len": 16}})
    return out


def write_datasets(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    for name, rows in DATASETS.items():
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------- the Axolotl side (runs in Axolotl's venv)
def axolotl_side(spec_path: str, out_path: str) -> None:
    """Tokenize every case with Axolotl's dataset code path; write rows and Axolotl's named templates."""
    import logging

    logging.disable(logging.WARNING)
    from axolotl.loaders import load_tokenizer
    from axolotl.utils.chat_templates import get_chat_template
    from axolotl.utils.config import normalize_config, validate_config
    from axolotl.utils.data.sft import _load_and_process_single_dataset
    from axolotl.utils.dict import DictDefault

    spec = json.loads(Path(spec_path).read_text())
    result: dict[str, Any] = {"templates": {t: get_chat_template(t) for t in EOT}, "cases": {}}
    for case in spec["cases"]:
        raw = {
            "base_model": spec["model"], "sequence_len": 512, "micro_batch_size": 1, "num_epochs": 1,
            "learning_rate": 1e-4, "output_dir": str(Path(spec["work"]) / "axo-out"),
            "dataset_num_proc": 1,  # worker processes gain nothing on a few rows
            "datasets": [{**case["entry"], "path": str(Path(spec["work"]) / f"{case['data']}.jsonl"), "ds_type": "json"}],
            **case["top"],
        }
        try:
            cfg = validate_config(DictDefault(raw))
            normalize_config(cfg)
            tokenizer = load_tokenizer(cfg)
            ds, _ = _load_and_process_single_dataset(cfg.datasets[0], cfg, tokenizer, "train", cfg.seed)
            rows = [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in ds]
            result["cases"][case["name"]] = {"rows": rows}
        except Exception as exc:  # report it in the table rather than stopping the other cases
            result["cases"][case["name"]] = {"error": f"{type(exc).__name__}: {exc}"}
    Path(out_path).write_text(json.dumps(result))


# ---------------------------------------------------------------- the tuneforge side
def tuneforge_rows(case: dict[str, Any], work: Path, model: str, jinja: str | None) -> list[dict[str, Any]]:
    from tuneforge.config import load
    from tuneforge.data.pipeline import prepare
    from tuneforge.models.tokenizer import load_tokenizer

    top = dict(case["top"])
    if jinja is not None:
        top["chat_template"] = "jinja"
        top["chat_template_jinja"] = jinja
    data = {
        "base_model": model, "sequence_len": 512, "skip_prepare_dataset": True, "shuffle_merged_datasets": False,
        "output_dir": str(work / "tf-out"),
        "datasets": [{**case["entry"], "path": str(work / f"{case['data']}.jsonl")}],
        **top,
    }
    cfg = load(data=data)
    tokenizer = load_tokenizer(cfg)
    ds = prepare(cfg, tokenizer).train
    return [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"]), "row": r["_row"]} for r in ds]


# ---------------------------------------------------------------- comparison
def _runs(positions: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


def compare_row(tf: dict, ax: dict, decode) -> list[str]:
    """Differences between two tokenizations of one row, as readable lines (empty when they agree)."""
    a, b = tf["input_ids"], ax["input_ids"]
    if a != b:
        k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        return [f"input_ids differ from token {k} (tuneforge {len(a)} tokens, axolotl {len(b)}):",
                f"    tuneforge: ...{decode(a[max(0, k - 3):k + 8])!r}",
                f"    axolotl:   ...{decode(b[max(0, k - 3):k + 8])!r}"]
    ta = [x != IGNORE for x in tf["labels"]]
    tb = [x != IGNORE for x in ax["labels"]]
    lines = []
    for only, mask in (("tuneforge", [x and not y for x, y in zip(ta, tb, strict=True)]),
                       ("axolotl", [y and not x for x, y in zip(ta, tb, strict=True)])):
        for s, e in _runs([i for i, m in enumerate(mask) if m]):
            lines.append(f"trained only by {only}: tokens {s}..{e - 1} {decode(a[s:e])!r}")
    values = [i for i in range(len(a)) if ta[i] and tb[i] and tf["labels"][i] != ax["labels"][i]]
    if values:
        lines.append(f"label values differ at {values[:5]}")
    return lines


def pair_rows(tf_rows: list[dict], ax_rows: list[dict], n_source: int) -> tuple[list[tuple[str, dict, dict]], list[str]]:
    """Pair rows by source row when Axolotl made one per source row, else in order (chunked formats)."""
    notes = []
    if len(ax_rows) == n_source:
        pairs = [(str(t["row"]), t, ax_rows[t["row"]]) for t in tf_rows]
        dropped = sorted(set(range(n_source)) - {t["row"] for t in tf_rows})
        for i in dropped:
            trained = sum(x != IGNORE for x in ax_rows[i]["labels"][1:])
            notes.append(f"row {i}: dropped by tuneforge (no trained tokens); axolotl trains {trained} targets")
        return pairs, notes
    if len(ax_rows) != len(tf_rows):
        notes.append(f"row count differs: tuneforge {len(tf_rows)}, axolotl {len(ax_rows)}")
    return [(f"#{k}", t, x) for k, (t, x) in enumerate(zip(tf_rows, ax_rows, strict=False))], notes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--axolotl-python", default="/tmp/axo/bin/python", help="Python of a venv with axolotl")
    parser.add_argument("--model", default="/tmp/axo-tiny", help="local model folder (tokenizer + config)")
    parser.add_argument("--work", default="/tmp/tf-axo-compare", help="folder for the datasets and JSON files")
    parser.add_argument("--axolotl-side", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.axolotl_side:
        axolotl_side(*args.axolotl_side)
        return 0

    work = Path(args.work)
    write_datasets(work)
    all_cases = cases()
    spec, out = work / "spec.json", work / "axolotl.json"
    spec.write_text(json.dumps({"cases": all_cases, "model": args.model, "work": str(work)}))
    env = {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([args.axolotl_python, __file__, "--axolotl-side", str(spec), str(out)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return proc.returncode
    axo = json.loads(out.read_text())

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)

    def decode(ids):
        return tok.decode(ids, skip_special_tokens=False)

    table, details, n_diff = [], [], 0
    for case in all_cases:
        name, result = case["name"], axo["cases"][case["name"]]
        if "error" in result:
            table.append((name, "-", "axolotl error", "", ""))
            details.append(f"[{name}] axolotl: {result['error']}")
            continue
        jinja = axo["templates"][case["tf_jinja_of"]] if case.get("tf_jinja_of") else None
        try:
            tf_rows = tuneforge_rows(case, work, args.model, jinja)
        except Exception as exc:
            table.append((name, "-", "tuneforge error", "", ""))
            details.append(f"[{name}] tuneforge: {type(exc).__name__}: {exc}")
            continue
        pairs, notes = pair_rows(tf_rows, result["rows"], len(DATASETS[case["data"]]))
        ids_ok = labels_ok = 0
        trained = [sum(sum(v != IGNORE for v in r["labels"]) for r in rows) for rows in (tf_rows, result["rows"])]
        for key, t, x in pairs:
            lines = compare_row(t, x, decode)
            ids_ok += t["input_ids"] == x["input_ids"]
            labels_ok += not lines
            details += [f"[{name}] row {key}: {line}" for line in lines]
        details += [f"[{name}] {n}" for n in notes]
        n_diff += labels_ok < len(pairs) or bool(notes)
        table.append((name, str(len(pairs)), f"{ids_ok}/{len(pairs)}", f"{labels_ok}/{len(pairs)}",
                      f"{trained[0]}/{trained[1]}"))

    width = max(len(r[0]) for r in table)
    print(f"{'case':<{width}}  rows  same input_ids  same labels  trained tokens (tuneforge/axolotl)")
    for name, rows, ids, labels, trained in table:
        print(f"{name:<{width}}  {rows:>4}  {ids:>13}  {labels:>11}  {trained:>9}")
    print(f"\n{len(table) - n_diff} of {len(table)} cases agree exactly.")
    if details:
        print("\nDifferences:")
        print("\n".join(details))
    return 0


if __name__ == "__main__":
    sys.exit(main())
