"""Packed vs unpacked preference training (DPO), same engine, same data, same model.

Workload: a Llama-3.2-1B-shaped model with random weights (built from a config, no download) and
--pairs synthetic preference pairs of pre-tokenized random ids with a variable-length mix (seeded):
prompt lognormal(median 150, sigma 0.7) clipped to 16..1024 tokens, chosen and rejected answers each
lognormal(median 200, sigma 0.8) clipped to 8..1024 tokens. Full fine-tuning keeps a frozen reference
copy; `--mode lora` uses the adapter-disabled network as the reference.

- unpacked: --unpacked-batch pairs per micro-batch, i.e. 2x that many rows [chosen..., rejected...]
  padded to the longest sequence of the micro-batch (TRL's layout).
- packed: --packed-batch rows of --seq-len tokens per micro-batch, each holding whole pairs back to back
  with per-sequence position ids (the varlen kernel on CUDA, no cross-sequence attention).

Both run bf16 through `tuneforge train` with logging every step. Reported per layout: median pairs/s
and real (non-padding) tokens/s over the timed steps (after --warmup), the padding share of the token
slots, and peak allocated memory. The speed-up is packed / unpacked pairs per second. Prints one JSON
line per layout and writes them to --out.

    python bench/preference_packing.py --mode full --steps 30
    python bench/preference_packing.py --mode lora --steps 30
    python bench/preference_packing.py --shape tiny --pairs 256 --steps 6 --warmup 2 --seq-len 1024   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                     max_position_embeddings=8192),
    "tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False, max_position_embeddings=4096),
}


def lognormal(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return min(hi, max(lo, int(round(math.exp(rng.gauss(math.log(median), sigma))))))


def make_pairs(n: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(lognormal(rng, 150, 0.7, 16, 1024))]
        row = {}
        for side in ("chosen", "rejected"):
            answer = [rng.randrange(3, vocab) for _ in range(lognormal(rng, 200, 0.8, 8, 1024))]
            row[f"{side}_input_ids"] = prompt + answer
            row[f"{side}_labels"] = [-100] * len(prompt) + answer
        rows.append(row)
    return rows


def make_model_dir(root: Path, shape: str) -> Path:
    from transformers import LlamaConfig

    from tuneforge.tiny import build_tiny_tokenizer

    path = root / f"model-{shape}"
    build_tiny_tokenizer(path)
    LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(path)
    return path


def run(args, model_dir: Path, data: Path, work: Path, packed: bool) -> dict:
    import torch

    from tuneforge.config import load
    from tuneforge.engine.run import train

    name = "packed" if packed else "unpacked"
    cuda = torch.cuda.is_available()
    cfg = {
        "base_model": str(model_dir), "reinit_weights": True, "bf16": cuda, "rl": "dpo", "rl_beta": 0.1,
        "datasets": [{"path": str(data)}], "dataset_prepared_path": str(work / "prepared"),
        "sequence_len": args.seq_len, "sample_packing": packed,
        "micro_batch_size": args.packed_batch if packed else args.unpacked_batch,
        "gradient_accumulation_steps": 1, "max_steps": args.steps, "learning_rate": 1e-6,
        "optimizer": "adamw_torch_fused" if cuda else "adamw_torch", "lr_scheduler": "constant",
        "logging_steps": 1, "save_strategy": "no", "output_dir": str(work / f"out-{name}"),
    }
    if args.attn or cuda:
        cfg["attn_implementation"] = args.attn or "varlen"
    if args.mode == "lora":
        cfg.update(adapter="lora", lora_r=16, lora_alpha=32, lora_target_linear=True)
    if args.gc:
        cfg["gradient_checkpointing"] = True
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    train(load(data=cfg), show_progress=False)
    records = [json.loads(line) for line in (work / f"out-{name}" / "metrics.jsonl").open()]
    steps = [r for r in records if r.get("type") == "train"][args.warmup:]
    pairs_per_s = statistics.median(r["trained_tokens"] / r["step_time"] for r in steps)  # items = pairs
    tokens_per_s = statistics.median(r["tokens_per_second"] for r in steps)
    slots = args.seq_len * args.packed_batch if packed else None
    return {
        "layout": name, "pairs_per_s": pairs_per_s, "tokens_per_s": tokens_per_s,
        "pairs_per_step": statistics.mean(r["trained_tokens"] for r in steps),
        "tokens_per_step": statistics.mean(r["tokens"] for r in steps),
        "fill": statistics.mean(r["tokens"] for r in steps) / slots if slots else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "timed_steps": len(steps),
        "first_loss": next(r["loss"] for r in records if r.get("type") == "train"),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    p.add_argument("--mode", default="full", choices=["full", "lora"])
    p.add_argument("--pairs", type=int, default=4000)
    p.add_argument("--seq-len", type=int, default=4096, help="packed row length (and the per-sequence cap)")
    p.add_argument("--unpacked-batch", type=int, default=8, help="pairs per micro-batch, unpacked")
    p.add_argument("--packed-batch", type=int, default=2, help="packed rows per micro-batch")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--attn", default=None, help="attn_implementation (default: varlen on CUDA, sdpa on CPU)")
    p.add_argument("--gc", action="store_true", help="gradient checkpointing")
    p.add_argument("--layouts", default="unpacked,packed")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = make_model_dir(work, args.shape)
        data = work / "pairs.jsonl"
        with data.open("w") as f:
            for row in make_pairs(args.pairs, SHAPES[args.shape]["vocab_size"]):
                f.write(json.dumps(row) + "\n")
        for layout in args.layouts.split(","):
            res = run(args, model_dir, data, work, packed=layout == "packed")
            res.update(shape=args.shape, mode=args.mode, seq_len=args.seq_len, steps=args.steps)
            print(json.dumps(res), flush=True)
            results.append(res)
            import gc

            import torch

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    by = {r["layout"]: r for r in results}
    if "packed" in by and "unpacked" in by:
        speedup = by["packed"]["pairs_per_s"] / by["unpacked"]["pairs_per_s"]
        print(json.dumps({"speedup_pairs_per_s": speedup}), flush=True)
        results.append({"speedup_pairs_per_s": speedup})
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
