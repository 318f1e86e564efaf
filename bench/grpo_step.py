"""GRPO steps end to end (generation + scoring + training) through `tuneforge train`, variants in one run.

Workload: a Qwen2.5-0.5B-shaped model with random weights (built from a config, no download; the tiny
byte-level tokenizer renders prompts, the model's vocabulary stays 151,936), 16 prompts of ~100 tokens per
optimizer step x 8 generations = 128 completions of up to --new-tokens tokens at temperature 1.0, a reward
computed from the completion ids (share of even token ids, so every group has reward variance), full
fine-tuning in bf16 autocast over fp32 weights (or --mode lora).

Variants (same data, same seed, one after the other):
- half-copy:  the default: generation from a half-precision copy of the fp32 weights
- fp32:       `generation_kwargs: {half_precision_copy: false}`: generation in fp32 from the fp32 weights
              (no copy; autocast generation cannot use a static cache with fp32 embeddings)
Both with `torch_compile: true` unless --no-compile.

Reported per variant: the median over the timed steps (after --warmup) of generated tokens/s
(`sampling/tokens_per_second`), whole-step tokens/s and step seconds, and the peak allocated memory.

    python bench/grpo_step.py --steps 8 --warmup 3
    python bench/grpo_step.py --tiny          # CPU smoke check
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
                         max_position_embeddings=32768),
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096),
}
REWARD = '''
def even_ids(completion_ids, **kwargs):
    return [sum(1 for t in c if t % 2 == 0) / max(len(c), 1) for c in completion_ids]
'''


def make_work(root: Path, shape: str, prompts: int) -> Path:
    from transformers import Qwen2Config

    from tuneforge.tiny import build_tiny_tokenizer

    model = root / "model"
    build_tiny_tokenizer(model)
    Qwen2Config(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(model)
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "theta", "kappa"]
    with (root / "prompts.jsonl").open("w") as f:
        for i in range(prompts):
            f.write(json.dumps({"prompt": f"{i}: " + " ".join(rng.choice(words) for _ in range(40))}) + "\n")
    (root / "bench_rewards.py").write_text(REWARD)
    return model


def run_variant(args, root: Path, model: Path, name: str, extra: dict) -> dict:
    import torch

    from tuneforge.config import load
    from tuneforge.engine.run import train

    out = root / f"out-{name}"
    cfg = {
        "base_model": str(model), "reinit_weights": True, "bf16": "auto", "rl": "grpo",
        "datasets": [{"path": str(root / "prompts.jsonl"), "type": "prompt"}],
        "dataset_prepared_path": str(root / "prepared"),
        "trl": {"num_generations": 8, "max_completion_length": args.new_tokens, "reward_funcs": ["bench_rewards.even_ids"],
                "loss_type": "dapo", "beta": 0.0, **extra.get("trl", {})},
        "micro_batch_size": args.micro_batch, "gradient_accumulation_steps": 128 // args.micro_batch,
        "max_steps": args.steps, "learning_rate": 1e-6, "lr_scheduler": "constant", "optimizer": "adamw_torch_fused"
        if torch.cuda.is_available() else "adamw_torch", "logging_steps": 1, "save_strategy": "no",
        "output_dir": str(out), "torch_compile": not args.no_compile,
    }
    if args.mode == "lora":
        cfg.update(adapter="lora", lora_r=16, lora_alpha=32, lora_target_linear=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train(load(data=cfg), show_progress=False)
    wall = time.perf_counter() - start
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["type"] == "train"][args.warmup:]

    def median(key):
        values = [r[key] for r in steps if r.get(key) is not None]
        return round(statistics.median(values), 1) if values else None

    rec = {"variant": name, "mode": args.mode, "shape": args.shape, "new_tokens": args.new_tokens,
           "generated_tokens_per_s": median("sampling/tokens_per_second"), "step_tokens_per_s": median("tokens_per_second"),
           "completion_mean_length": median("completions/mean_length"), "timed_steps": len(steps), "wall_s": round(wall, 1)}
    if torch.cuda.is_available():
        rec["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    p.add_argument("--mode", default="full", choices=["full", "lora"])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the medians (compilation, capture)")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=32, help="completions per micro-batch (128 per step)")
    p.add_argument("--variants", default="half-copy,fp32")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--tiny", action="store_true", help="CPU smoke check: tiny shape, 3 steps, 8 new tokens")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.tiny:
        args.shape, args.steps, args.warmup, args.new_tokens, args.no_compile = "tiny", 3, 1, 8, True
    variants = {"half-copy": {}, "fp32": {"trl": {"generation_kwargs": {"half_precision_copy": False}}}}
    root = Path(tempfile.mkdtemp(prefix="tf-grpo-bench-"))
    sys.path.insert(0, str(root))  # the reward module
    model = make_work(root, args.shape, prompts=16 * (args.steps + 1))
    for name in args.variants.split(","):
        rec = run_variant(args, root, model, name, variants[name])
        print(json.dumps(rec), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
