"""Write the model-size x GPU-memory table of docs/choosing-method.md from the memory planner.

    PYTHONPATH=src python scripts/gen_memory_table.py           # rewrite the table in place
    PYTHONPATH=src python scripts/gen_memory_table.py --check   # exit 1 when the page is stale

Every number is `tuneforge plan` (tuneforge.planner.plan) for one SFT setting on the shipped model shapes
(src/tuneforge/planner/shapes/), so the table follows the planner when its formulas change;
tests/test_docs_snippets.py fails when the page is out of date.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "choosing-method.md"
START, END = "<!-- memory-table:start -->", "<!-- memory-table:end -->"
GiB = 2**30

SHAPES = [("llama-3.2-1b", "Llama-3.2-1B"), ("qwen2.5-7b", "Qwen2.5-7B"), ("llama-3.1-8b", "Llama-3.1-8B"),
          ("llama-3.1-70b", "Llama-3.1-70B")]
# (label, config keys, GPUs)
SETUPS = [
    ("full fine-tuning", {}, 1),
    ("full fine-tuning, FSDP2 on 8 GPUs", {"fsdp_version": 2}, 8),
    ("LoRA r=16, every linear layer", {"adapter": "lora", "lora_r": 16, "lora_target_linear": True}, 1),
    ("QLoRA r=16 (4-bit base)", {"adapter": "qlora", "load_in_4bit": True, "lora_r": 16,
                                  "lora_target_linear": True}, 1),
]
GPU_SIZES = [16, 24, 48, 80]
BASE = {
    "base_model": "examples/tiny-llama",  # replaced by each shape; only its tokenizer folder is named
    "datasets": [{"path": "train.jsonl", "type": "chat_template"}],
    "sequence_len": 2048, "micro_batch_size": 1, "gradient_checkpointing": True, "bf16": True,
    "output_dir": "outputs/plan",  # the default optimizer, adamw_torch_fused
}


def estimate_gib(shape: str, keys: dict, gpus: int) -> float:
    from tuneforge.config import load
    from tuneforge.planner import plan

    cfg = load(data={**BASE, **keys})
    return plan(cfg, gpus=gpus, model=shape, with_suggestions=False).estimate.total / GiB


def render() -> str:
    head = "| model | method | GiB per GPU | " + " | ".join(f"{g} GiB" for g in GPU_SIZES) + " |"
    lines = [head, "|" + "---|" * (3 + len(GPU_SIZES))]
    for shape, name in SHAPES:
        for label, keys, gpus in SETUPS:
            gib = estimate_gib(shape, keys, gpus)
            fits = " | ".join("yes" if gib <= g else "no" for g in GPU_SIZES)
            lines.append(f"| {name} | {label} | {gib:.1f} | {fits} |")
    return "\n".join(lines)


def updated(page: str) -> str:
    before, rest = page.split(START, 1)
    _, after = rest.split(END, 1)
    return f"{before}{START}\n{render()}\n{END}{after}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the page is up to date")
    args = parser.parse_args()
    page = PAGE.read_text()
    new = updated(page)
    if args.check:
        sys.exit(0 if new == page else "docs/choosing-method.md is stale: run scripts/gen_memory_table.py")
    PAGE.write_text(new)


if __name__ == "__main__":
    main()
