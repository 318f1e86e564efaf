"""A PNG of the run's curves (training loss, eval loss, learning rate) from metrics.jsonl."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

log = logging.getLogger("tuneforge")

PLOT_FILE = "training_curves.png"


def plot_metrics(records: list[dict], output_dir: Path) -> Path | None:
    """Write output_dir/training_curves.png; returns None (with a note) when matplotlib is missing."""
    train = [r for r in records if r.get("type") == "train" and "loss" in r]
    if not train:
        return None
    if importlib.util.find_spec("matplotlib") is None:
        log.info("matplotlib is not installed; skipping the loss plot (pip install matplotlib)")
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    evals = [r for r in records if r.get("type") == "eval" and "eval_loss" in r]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", linewidth=1)
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(output_dir) / PLOT_FILE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
