"""Time to first step: from the `train` call to the end of the first optimizer step.

Workload: a Llama-3.1-8B-shaped model (random weights), LoRA r=16 on all linear layers by default, packed
rows of --seq-len tokens, a few hundred synthetic rows (so data preparation is small but counted). Phases
reported, in seconds since the `train` call:

- model_start / model_built: load_model's start and end (random init with --reinit, or loading the bf16
  safetensors shards written beforehand to a temporary folder, the default: the time a saved model takes
  from disk to its first optimizer step);
- step_1: the first optimizer step's end (includes the compile warm-up with --compile);
- step_2: the second step's end (so first_step_s - steady_step_s is the one-off cost of step 1).

--compile-cache measures what inductor's on-disk caches save: the same compiled run (random init, so
loading is not in it) twice, each in a fresh process, both with one TORCHINDUCTOR_CACHE_DIR that starts
empty (--cache-dir to keep it). The first run compiles cold and fills the cache; the second finds its
graphs there (dynamo still traces each block again: only inductor's and AOTAutograd's work is cached).
Each run reports its first_step_s and the files the cache held when it started.

    python bench/first_step.py                                   # 8B, LoRA, weights loaded from disk
    python bench/first_step.py --reinit --compile                # random init on the GPU, compiled blocks
    python bench/first_step.py --compile-cache                   # compiled first step, cold then warm cache
    python bench/first_step.py --tiny                            # CPU smoke run (tiny shape, 2 steps)
    python bench/first_step.py --tiny --compile-cache            # CPU smoke run of the two-process mode
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import SHAPES, alpaca_lengths, make_model_dir, make_rows  # noqa: E402


def write_weights(model_dir: Path, shard_size: str) -> float:
    """Random bf16 weights saved as safetensors shards next to the config (built on the GPU when there is
    one); returns the seconds it took (not part of the measurement)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.bfloat16)
    model.save_pretrained(model_dir, max_shard_size=shard_size)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - t0


def run(args, model_dir: Path, work: Path) -> dict:
    import torch

    import tuneforge.models.load as model_load
    from tuneforge.config import load
    from tuneforge.engine.run import train

    data = work / "rows.jsonl"
    rows = make_rows(alpaca_lengths(args.rows), 1000)
    data.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    cfg = {
        "base_model": str(model_dir), "reinit_weights": args.reinit, "bf16": "auto",
        "datasets": [{"path": str(data)}], "dataset_prepared_path": str(work / "prepared"),
        "sequence_len": args.seq_len, "sample_packing": True, "micro_batch_size": args.micro_batch,
        "max_steps": args.steps, "learning_rate": 1e-5, "optimizer": "adamw_torch_fused", "logging_steps": 1,
        "save_strategy": "no", "output_dir": str(work / "out"), "gradient_checkpointing": args.gc,
    }
    if args.mode == "lora":
        cfg.update(adapter="lora", lora_r=16, lora_alpha=32, lora_target_linear=True)
        if args.kernels:
            cfg.update(lora_mlp_kernel=True, lora_qkv_kernel=True, lora_o_kernel=True)
    if args.compile:
        cfg["torch_compile"] = True
    marks: dict[str, float] = {}
    real_load = model_load.load_model

    def timed_load(*a, **kw):
        marks.setdefault("model_start", time.perf_counter())
        model = real_load(*a, **kw)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        marks.setdefault("model_built", time.perf_counter())
        return model

    steps: list[float] = []

    def after_step(optimizer, *_):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        steps.append(time.perf_counter())

    model_load.load_model = timed_load
    from torch.optim.optimizer import register_optimizer_step_post_hook

    hook = register_optimizer_step_post_hook(after_step)
    t0 = time.perf_counter()
    try:
        train(load(data=cfg), show_progress=False)
    finally:
        hook.remove()
        model_load.load_model = real_load
    out = {k: round(v - t0, 2) for k, v in marks.items()}
    out.update({f"step_{i + 1}": round(t - t0, 2) for i, t in enumerate(steps[:3])})
    if len(steps) >= 2:
        out["first_step_s"] = round(steps[0] - marks.get("model_built", t0), 2)
        out["steady_step_s"] = round(steps[1] - steps[0], 2)
    out["host_peak_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    if torch.cuda.is_available():
        out["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["device"] = torch.cuda.get_device_name()
    return out


def cache_files(folder: str | None) -> int:
    return sum(1 for f in Path(folder).rglob("*") if f.is_file()) if folder and Path(folder).is_dir() else 0


def child_argv(args) -> list[str]:
    """This script's arguments for one compiled, randomly initialised run with the same workload."""
    argv = ["--shape", args.shape, "--mode", args.mode, "--seq-len", str(args.seq_len), "--micro-batch",
            str(args.micro_batch), "--steps", str(args.steps), "--rows", str(args.rows), "--compile", "--reinit"]
    return argv + (["--kernels"] if args.kernels else []) + ([] if args.gc else ["--no-gc"])


def compile_cache_runs(args, cache_dir: Path) -> dict:
    """The compiled run twice, each in a fresh process sharing `cache_dir` (cold, then warm)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    child = [sys.executable, str(Path(__file__).resolve()), *child_argv(args)]
    runs = {}
    for name in ("cold", "warm"):
        done = subprocess.run(child, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the {name} run failed:\n{done.stderr[-4000:]}")
        runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
    out = {"cache_dir": str(cache_dir), **runs}
    if "first_step_s" in runs["cold"] and "first_step_s" in runs["warm"]:
        out["first_step_saved_s"] = round(runs["cold"]["first_step_s"] - runs["warm"]["first_step_s"], 2)
    return out


def one_run(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = make_model_dir(work, args.shape)
        result = {"shape": args.shape, "mode": args.mode, "reinit": args.reinit, "compile": args.compile,
                  "kernels": args.kernels}
        if not args.reinit:
            result["weights_written_s"] = round(write_weights(model_dir, args.shard_size), 1)
            result["weight_shards"] = len(list(model_dir.glob("*.safetensors")))
        cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        result["cache_files_before"] = cache_files(cache)
        result.update(run(args, model_dir, work))
        result["compile_cache_dir"] = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # as the run left it
        result["cache_files_after"] = cache_files(result["compile_cache_dir"])
    return result


TINY = {"shape": "tiny", "seq_len": 128, "rows": 40, "steps": 2, "shard_size": "2MB"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-8b", choices=sorted(SHAPES))
    p.add_argument("--mode", default="lora", choices=["lora", "full"])
    p.add_argument("--reinit", action="store_true", help="random init (reinit_weights) instead of loading shards")
    p.add_argument("--compile", action="store_true", help="torch_compile: true (its warm-up is in step 1)")
    p.add_argument("--compile-cache", action="store_true",
                   help="two compiled runs in fresh processes sharing one compile cache: cold, then warm")
    p.add_argument("--cache-dir", default=None, help="--compile-cache: this cache folder (default: a new "
                   "temporary one, removed afterwards; give an empty folder for a cold first run)")
    p.add_argument("--kernels", action="store_true", help="lora_mlp/qkv/o_kernel: true")
    p.add_argument("--gc", action="store_true", default=True, help="gradient checkpointing (default on)")
    p.add_argument("--no-gc", dest="gc", action="store_false")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--shard-size", default="5GB", help="max_shard_size of the weights written for loading")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: " + ", ".join(f"{k}={v}" for k, v in
                                                                                      TINY.items()))
    p.add_argument("--out", default=None)
    if "--tiny" in (argv if argv is not None else sys.argv[1:]):
        p.set_defaults(**TINY)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.compile_cache and args.cache_dir:
        result = compile_cache_runs(args, Path(args.cache_dir))
    elif args.compile_cache:
        with tempfile.TemporaryDirectory() as tmp:
            result = compile_cache_runs(args, Path(tmp) / "inductor")
    else:
        result = one_run(args)
    print(json.dumps(result), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
