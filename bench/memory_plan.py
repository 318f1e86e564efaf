"""The memory planner against measured peak GPU memory: planned vs measured, one JSON line per configuration.

Each configuration builds a Llama-shaped model with random weights from a shape shipped with the planner
(`src/tuneforge/planner/shapes/`; no download), trains 3 optimizer steps through tuneforge's own
`engine.run.train` on synthetic packed rows (every token trained), and reads torch's peak counters.
Every configuration runs in its own process, so that the peak counters and the process group start clean.

    PYTHONPATH=src python bench/memory_plan.py                      # the three configurations below
    PYTHONPATH=src python bench/memory_plan.py --only 8b-lora-gc --micro-batch 2

Configurations (sequence_len 4096, sample_packing, bf16 autocast, adamw_torch_fused, eager blocks):
- 1b-full:          Llama-3.2-1B shape, full fine-tuning;
- 1b-full-offload:  the same under FSDP2 with offload_params, one process;
- 8b-lora-gc:       Llama-3.1-8B shape, LoRA r=16 on every linear layer, gradient checkpointing.

Printed per configuration: planned_gib (the planner's per-GPU total less the CUDA context, i.e. what torch
reserves) vs measured_gib (torch.cuda.max_memory_reserved) and their ratio; the same for torch's allocated
peak (max_memory_allocated); planned and measured host memory (peak resident set of the process); and the
planner's parts. docs/planner.md keeps the table of results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

GiB = 2**30
CONFIGS = {
    "1b-full": {"shape": "llama-3.2-1b", "keys": {}},
    "1b-full-offload": {"shape": "llama-3.2-1b",
                        "keys": {"fsdp_version": 2, "fsdp_config": {"offload_params": True}}},
    "8b-lora-gc": {"shape": "llama-3.1-8b",
                   "keys": {"adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_target_linear": True,
                            "gradient_checkpointing": True}},
}


def model_dir(root: Path, shape: str) -> Path:
    """The shipped shape's config.json beside a small local tokenizer (token ids stay below its size)."""
    from tuneforge.planner.model import SHAPES_DIR
    from tuneforge.tiny import build_tiny_tokenizer

    path = root / f"model-{shape}"
    build_tiny_tokenizer(path)
    config = json.loads((SHAPES_DIR / f"{shape}.json").read_text())
    config.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def write_rows(path: Path, rows: int, seed: int = 0) -> None:
    """Alpaca-like lengths (lognormal, median 150), ids from the tokenizer's range; packed by tuneforge."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(rows):
            n = min(2048, max(16, int(round(math.exp(rng.gauss(math.log(150), 0.7))))))
            f.write(json.dumps({"input_ids": [rng.randrange(3, 1000) for _ in range(n)]}) + "\n")


def config(name: str, work: Path, args) -> dict:
    spec = CONFIGS[name]
    data = work / "rows.jsonl"
    if not data.exists():
        write_rows(data, rows=max(400, 40 * args.micro_batch * args.steps))
    cfg = {
        "base_model": str(model_dir(work, spec["shape"])), "reinit_weights": True, "bf16": True,
        "datasets": [{"path": str(data)}], "dataset_prepared_path": str(work / "prepared"),
        "sequence_len": args.seq_len, "sample_packing": True, "micro_batch_size": args.micro_batch,
        "gradient_accumulation_steps": 1, "max_steps": args.steps, "learning_rate": 1e-5,
        "optimizer": "adamw_torch_fused", "lr_scheduler": "constant", "logging_steps": 1, "save_strategy": "no",
        "output_dir": str(work / f"out-{name}"), **spec["keys"],
    }
    if args.compile:
        cfg["torch_compile"] = True
    return cfg


def measure(name: str, args) -> dict:
    import torch

    from tuneforge.config import load
    from tuneforge.engine.run import train
    from tuneforge.planner import coefficients, plan

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load(data=config(name, Path(tmp), args))
        total = torch.cuda.get_device_properties(0).total_memory
        report = plan(cfg, gpus=1, gpu_memory=total, with_suggestions=False).estimate
        torch.cuda.reset_peak_memory_stats()
        train(cfg, show_progress=False)
        reserved, allocated = torch.cuda.max_memory_reserved(), torch.cuda.max_memory_allocated()
    planned = report.total - int(coefficients.CUDA_CONTEXT_GIB * GiB)
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "config": name, "micro_batch_size": args.micro_batch, "seq_len": args.seq_len, "compile": args.compile,
        "planned_gib": round(planned / GiB, 3), "measured_gib": round(reserved / GiB, 3),
        "ratio": round(planned / reserved, 4),
        "planned_allocated_gib": round(report.allocated / GiB, 3), "measured_allocated_gib": round(allocated / GiB, 3),
        "allocated_ratio": round(report.allocated / allocated, 4), "planned_peak_phase": report.peak_phase,
        "planned_host_gib": round(report.host / GiB, 3), "measured_host_peak_gib": round(host / GiB, 3),
        "parts_gib": {p.name: round(p.bytes / GiB, 3) for p in report.parts},
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=sorted(CONFIGS), action="append", help="run these (default: all)")
    p.add_argument("--micro-batch", type=int, default=1, help="packed rows per micro-batch (1 or 2)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch_compile: true")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = args.only or list(CONFIGS)
    if args.in_process:
        line = json.dumps(measure(names[0], args))
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
        return 0
    failed = 0
    for name in names:  # one process each: clean peak counters and process group
        forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--only" and a not in CONFIGS]
        cmd = [sys.executable, __file__, "--in-process", "--only", name, *forwarded]
        failed |= subprocess.call(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}) != 0
    return int(failed)


if __name__ == "__main__":
    raise SystemExit(main())
