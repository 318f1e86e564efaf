"""`tuneforge preprocess`: rebuild the prepared-data cache, print what it holds, and show label masks.

The summary gives, per split and per dataset, rows in and out, why rows were dropped or truncated,
tokens, the share of tokens that are trained, and, with sample_packing, how full the packed rows are.

`--debug` prints decoded samples so a user sees at a glance what the model is trained on:
  - the text, with trained text in green and masked (untrained) text dimmed red and wrapped in
    [[ ]] so it stays readable without colour (logs, CI, `| less`);
  - unless --debug-text-only, every token as `token(label, id)`: label -100 means not trained.
A token is "trained" when its own label is not -100 and it is not the first token: it is then the
target of the previous position (the first token of a row has no previous position, so it never is).
"""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tuneforge.config.schema import Config

from .formats import IGNORE_INDEX
from .pipeline import PreparedData, Stats

TRAINED_STYLE = "bold green"
MASKED_STYLE = "red dim"
OPEN, CLOSE = "[[", "]]"


def run(cfg: Config, debug: bool = False, num_examples: int = 1, text_only: bool = False, *,
        objective=None) -> PreparedData:
    """Prepare the data exactly as `train` does, through the method's own `prepare_data` (the cli passes
    the objective; without one it is built from the config), rebuilding the cache, and print it."""
    from tuneforge.config.methods import method_facts
    from tuneforge.models.tokenizer import load_tokenizer

    console = Console(highlight=False, markup=False)  # data and paths may hold [brackets]
    if not console.is_terminal:  # logs and pipes: keep table rows on one line
        console.width = max(console.width, 140)
    tokenizer = load_tokenizer(cfg)
    owned = objective is None
    if owned:
        from tuneforge.methods import (
            get_objective,  # the command's entry point; data never imports it at load
        )

        objective = get_objective(cfg)
    try:
        data = objective.prepare_data(tokenizer, rebuild=True)
    finally:
        if owned:
            objective.close()
    if data.stream is not None:
        return _preview_stream(console, cfg, data, tokenizer, num_examples if debug else 0, text_only)
    if method_facts(cfg).rows == "prompts":
        return _preview_prompts(console, data, tokenizer, num_examples if debug else 0)
    print_summary(console, cfg, data)
    if debug:
        print_samples(console, data.train, tokenizer, num_examples, text_only, data.by_dataset.get("train"))
    return data


def _preview_prompts(console: Console, data: PreparedData, tokenizer, num_examples: int) -> PreparedData:
    """Online RL trains on generated completions: show the prompt rows (nothing is cached or masked)."""
    for split, stats in data.stats.items():
        console.print(f"{split}: {stats.rows_out} prompts (from {stats.rows_in} rows), {stats.tokens:,} prompt tokens")
    for i in range(min(num_examples, len(data.train))):
        row = data.train[i]
        console.print(f"--- prompt {i} ({row['length']} tokens)")
        console.print(tokenizer.decode(row["input_ids"]) if "input_ids" in row else str(row.get("prompt")))
    return data


def _preview_stream(console: Console, cfg: Config, data: PreparedData, tokenizer, num_examples: int,
                    text_only: bool) -> PreparedData:
    """Streamed training data is read while training (nothing is cached): say so, and show its first rows."""
    sources = ", ".join(s.entry.path for s in data.stream.sources)
    console.print(Text(f"train: streamed while training from {sources} (nothing cached); rows of "
                       f"{cfg.sequence_len} tokens are packed as documents are read", style="bold"), soft_wrap=True)
    if data.eval is not None:
        console.print(_split_table("eval split", data.by_dataset.get("eval") or [data.stats["eval"]],
                                   data.stats["eval"]))
    stream = data.stream.open()
    for k in range(num_examples):
        row = stream.next_row()
        console.print(Text(f"\n--- packed row {k}: {len(row)} document(s), {sum(len(d['input_ids']) for d in row)} "
                           "tokens ---", style="bold"), soft_wrap=True)
        for doc in row:
            console.print(render_masked_text(tokenizer, doc["input_ids"], doc["labels"]), soft_wrap=True)
            if not text_only:
                console.print(render_token_triples(tokenizer, doc["input_ids"], doc["labels"]), soft_wrap=True)
    return data


# ---------------------------------------------------------------- summary
def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _split_table(title: str, parts: list[Stats], total: Stats) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD)
    show_held = any(s.held_out for s in parts)
    columns = ["dataset", "rows in", "rows out", "dropped", "truncated", *(["held out"] if show_held else []),
               "tokens", "trained tokens"]
    for name in columns:
        table.add_column(name, justify="left" if name == "dataset" else "right", overflow="fold")
    for s in [*parts, total] if len(parts) > 1 else parts:
        cells = [s.name, f"{s.rows_in:,}", f"{s.rows_out:,}", f"{sum(s.dropped.values()):,}", f"{s.truncated:,}",
                 *([f"{s.held_out:,}"] if show_held else []), f"{s.tokens:,}",
                 f"{s.trained_tokens:,} ({_share(s.trained_tokens, s.tokens)})"]
        table.add_row(*cells, style="bold" if s is total else None)
    return table


def _notes(parts: list[Stats], seq_len: int) -> list[str]:
    """One line per dataset that lost or changed rows, saying why."""
    lines = []
    for s in parts:
        why = [f"{n:,} {reason}" for reason, n in sorted(s.dropped.items(), key=lambda kv: -kv[1])]
        if why:
            lines.append(f"  {s.name}: dropped {'; '.join(why)}")
        if s.truncated:
            lines.append(f"  {s.name}: truncated {s.truncated:,} rows to {seq_len} tokens (excess_length_strategy)")
        if s.held_out:
            lines.append(f"  {s.name}: held out {s.held_out:,} rows for evaluation (val_set_size)")
    return lines


def packing_summary(lengths: list[int], cfg: Config, capacity: int) -> tuple[int, float]:
    """(packed rows, efficiency) of the first epoch's packing plan, as training will build it."""
    from .batches import plan_epoch

    plan = plan_epoch(lengths, epoch=0, seed=cfg.seed, micro_batch_size=1, packed=True, capacity=capacity,
                      group_size=cfg.sample_packing_group_size, max_docs=cfg.sample_packing_bin_size,
                      sequential=cfg.sample_packing_sequentially)
    rows = [row for mb in plan for row in mb]
    used = sum(lengths[i] for row in rows for i in row)
    return len(rows), used / (len(rows) * capacity) if rows else 0.0


def print_summary(console: Console, cfg: Config, data: PreparedData) -> None:
    where = f"reused from {data.cache_dir}" if data.reused_cache else (
        f"saved to {data.cache_dir}" if data.cache_dir else "not cached (skip_prepare_dataset: true)")
    console.print(Text(f"Prepared data {where}", style="bold"), soft_wrap=True)
    splits = [("train", data.train, cfg.sequence_len, cfg.sample_packing)]
    if data.eval is not None:
        splits.append(("eval", data.eval, cfg.eval_sequence_len or cfg.sequence_len, cfg.packing_for_eval))
    for name, ds, seq_len, packed in splits:
        total = data.stats[name]
        parts = data.by_dataset.get(name) or [total]
        console.print(_split_table(f"{name} split", parts, total))
        for line in _notes(parts, seq_len):
            console.print(line, soft_wrap=True)
        if packed and len(ds):
            n_rows, eff = packing_summary(list(ds["length"]), cfg, cfg.sequence_len)
            console.print(
                f"  packing: {len(ds):,} rows -> {n_rows:,} packed rows of {cfg.sequence_len} tokens, "
                f"efficiency {100 * eff:.1f}% (real tokens / token slots)", soft_wrap=True,
            )


# ---------------------------------------------------------------- --debug
def _piece(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _trained_mask(labels: list[int]) -> list[bool]:
    return [i > 0 and t != IGNORE_INDEX for i, t in enumerate(labels)]


def render_masked_text(tokenizer, input_ids: list[int], labels: list[int]) -> Text:
    """The decoded row: trained spans green, masked spans dimmed red inside [[ ]].

    Spans are decoded whole (not token by token) so multi-byte characters split across tokens decode right.
    """
    trained = _trained_mask(labels)
    text = Text()
    start = 0
    for i in range(1, len(input_ids) + 1):
        if i < len(input_ids) and trained[i] == trained[start]:
            continue
        span = tokenizer.decode(input_ids[start:i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if trained[start]:
            text.append(span, style=TRAINED_STYLE)
        else:
            text.append(OPEN + span + CLOSE, style=MASKED_STYLE)
        start = i
    return text


def render_token_triples(tokenizer, input_ids: list[int], labels: list[int]) -> Text:
    """Every token as `token(label, id)`, escaped so whitespace is visible."""
    text = Text()
    for tid, lab, on in zip(input_ids, labels, _trained_mask(labels), strict=True):
        piece = _piece(tokenizer, tid).replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
        text.append(f"{piece}({lab}, {tid})", style=TRAINED_STYLE if on else MASKED_STYLE)
        text.append(" ")
    return text


def sequences(row: dict[str, Any]) -> list[tuple[str, list[int], list[int]]]:
    """(name, input_ids, labels) of each token sequence of a row: one for SFT/KTO rows, two for pairs
    (`chosen_*`, `rejected_*`). A sequence without labels trains every token."""
    names = sorted((k for k in row if k.endswith("input_ids") and isinstance(row[k], list)),
                   key=lambda k: (k != "input_ids", k))
    out = []
    for name in names:
        prefix = name[: -len("input_ids")]
        labels = row.get(f"{prefix}labels")
        out.append((prefix.rstrip("_") or "tokens", row[name], labels if labels is not None else row[name]))
    return out


def _extras(row: dict[str, Any]) -> str:
    """Scalar fields a format adds (e.g. KTO's `label`), shown in the sample header."""
    skip = {"length", "_source", "_row", "_trained"}
    items = [f"{k}={v}" for k, v in row.items() if k not in skip and not isinstance(v, list | dict)]
    return f" | {', '.join(items)}" if items else ""


def print_samples(console: Console, ds, tokenizer, n: int, text_only: bool, parts: list[Stats] | None) -> None:
    console.print(Text.assemble(
        "\nLegend: ", ("trained text", TRAINED_STYLE), ", ", (f"{OPEN}masked text{CLOSE}", MASKED_STYLE),
        "" if text_only else "; tokens as token(label, id), label -100 = not trained",
    ))
    for k in range(min(n, len(ds))):
        row: dict[str, Any] = ds[k]
        src = parts[row["_source"]].name if parts and row["_source"] < len(parts) else f"source {row['_source']}"
        console.print(Text(f"\n--- sample {k}: {src}, row {row['_row']}{_extras(row)} ---", style="bold"),
                      soft_wrap=True)
        seqs = sequences(row)
        for name, ids, labels in seqs:
            trained = sum(_trained_mask(labels))
            label = f"{name}: " if len(seqs) > 1 else ""
            console.print(Text(f"{label}{len(ids)} tokens, {trained} trained ({_share(trained, len(ids))})",
                               style="bold"), soft_wrap=True)
            console.print(render_masked_text(tokenizer, ids, labels), soft_wrap=True)
            if not text_only:
                console.print(Text("tokens:", style="bold"))
                console.print(render_token_triples(tokenizer, ids, labels), soft_wrap=True)
