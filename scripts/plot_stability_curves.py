"""Regenerate the curves of docs/training-stability.md from our own short CPU runs.

    PYTHONPATH=src python scripts/plot_stability_curves.py            # runs, then plots (~5 min, 2 cores)
    PYTHONPATH=src python scripts/plot_stability_curves.py --plot-only  # re-plot the kept metrics

Each run is a shipped tiny example (examples/*.yaml: a random-init tiny Llama on a toy task) with a few
overrides, trained with `tuneforge train`; its metrics.jsonl is copied to docs/img/runs/<name>.jsonl so
the pictures can be redrawn without training again, then plotted into docs/img/stability-<name>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"
RUNS = IMG / "runs"

# name -> (example config, overrides). logging_steps 1 gives one point per optimizer step.
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "sft": ("sft-tiny.yaml", ["--logging-steps", "2"]),
    # the same run with a learning rate 30x too high: what an unstable run looks like
    "sft-high-lr": ("sft-tiny.yaml", ["--logging-steps", "2", "--learning-rate", "0.1", "--max-steps", "120"]),
    "dpo": ("dpo-tiny.yaml", ["--logging-steps", "2", "--eval-steps", "10"]),
    # beta > 0 logs the KL to the reference; two optimizer passes per generation make clipping possible
    "grpo": ("grpo-tiny.yaml", ["--logging-steps", "1", "--trl.beta", "0.04", "--trl.num-iterations", "2"]),
}


def train(name: str, work: Path) -> Path:
    config, overrides = CONFIGS[name]
    out = work / name
    cmd = [sys.executable, "-m", "tuneforge.cli", "train", str(ROOT / "examples" / config),
           "--output-dir", str(out), *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=work)
    RUNS.mkdir(parents=True, exist_ok=True)
    kept = RUNS / f"{name}.jsonl"
    shutil.copyfile(out / "metrics.jsonl", kept)
    return kept


def records(name: str) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (RUNS / f"{name}.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["type"] == "train"], [r for r in rows if r["type"] == "eval"]


def _panel(ax, rows: list[dict], keys: list[str], title: str) -> None:
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".", linewidth=1, label=key)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot(name: str, panels: list[tuple[str, list[str], str]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_rows, eval_rows = records(name)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2))
    for ax, (source, keys, title) in zip(axes, panels, strict=True):
        _panel(ax, eval_rows if source == "eval" else train_rows, keys, title)
    fig.suptitle(f"{name}: {CONFIGS[name][0]} {' '.join(CONFIGS[name][1])}", fontsize=9)
    fig.tight_layout()
    path = IMG / f"stability-{name}.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


PANELS = {
    "sft": [("train", ["loss"], "training loss"), ("train", ["grad_norm"], "gradient norm"),
            ("eval", ["eval_loss"], "held-out loss"), ("eval", ["eval_accuracy"], "held-out exact match")],
    "sft-high-lr": [("train", ["loss"], "training loss"), ("train", ["grad_norm"], "gradient norm"),
                    ("eval", ["eval_loss"], "held-out loss")],
    "dpo": [("train", ["loss"], "loss"), ("train", ["rewards/chosen", "rewards/rejected"], "implicit rewards"),
            ("train", ["rewards/margins"], "chosen - rejected margin"),
            ("eval", ["eval_rewards/accuracies"], "held-out pair accuracy")],
    "grpo": [("train", ["reward", "frac_reward_zero_std"], "reward"), ("train", ["kl"], "KL to the reference"),
             ("train", ["clip_ratio/region_mean"], "clipped-token share"),
             ("train", ["grad_norm"], "gradient norm")],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot-only", action="store_true", help="plot the kept docs/img/runs/*.jsonl")
    parser.add_argument("--only", nargs="*", default=list(CONFIGS), help="runs to (re)do")
    args = parser.parse_args()
    if not args.plot_only:
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.only:
                train(name, Path(tmp))
    for name in args.only:
        print(plot(name, PANELS[name]))


if __name__ == "__main__":
    main()
