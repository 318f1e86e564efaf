"""Experiment trackers through accelerate: TensorBoard, Weights & Biases, MLflow, SwanLab.

A tracker is imported only when the config asks for it; a missing package is one clear message.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from tuneforge.config.schema import Config
from tuneforge.errors import TuneforgeError

_PACKAGES = {"tensorboard": ("tensorboard", "use_tensorboard"), "wandb": ("wandb", "wandb_project"),
             "mlflow": ("mlflow", "use_mlflow"), "swanlab": ("swanlab", "use_swanlab")}


def requested(cfg: Config) -> list[str]:
    names = []
    if cfg.use_tensorboard:
        names.append("tensorboard")
    if cfg.wandb_project and cfg.wandb_mode != "disabled":
        names.append("wandb")
    if cfg.use_mlflow:
        names.append("mlflow")
    if cfg.use_swanlab and cfg.swanlab_mode != "disabled":
        names.append("swanlab")
    return names


def check_installed(names: list[str]) -> None:
    for name in names:
        package, key = _PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise TuneforgeError(f"`{key}` is set but the {package} package is not installed: "
                                 f"pip install {package} (or remove `{key}`).")


def log_with(cfg: Config, names: list[str], output_dir: Path) -> list:
    """accelerate's `log_with`: tracker names, and our own tracker objects (engine/swanlab_tracker.py)."""
    if "swanlab" not in names:
        return names
    from .swanlab_tracker import SwanLabTracker

    return [n for n in names if n != "swanlab"] + [SwanLabTracker(cfg, output_dir)]


def start(cfg: Config, accelerator, names: list[str], run_config: dict) -> None:
    """Initialise the configured trackers (main process only; accelerate handles the rest)."""
    if not names:
        return
    if cfg.wandb_mode:
        os.environ["WANDB_MODE"] = cfg.wandb_mode
    if cfg.mlflow_tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = cfg.mlflow_tracking_uri
    init_kwargs: dict = {}
    if "wandb" in names:
        init_kwargs["wandb"] = {k: v for k, v in {"entity": cfg.wandb_entity, "name": cfg.wandb_name,
                                                  "id": cfg.wandb_run_id,
                                                  "resume": "allow" if cfg.wandb_run_id else None}.items() if v}
    if "mlflow" in names and cfg.mlflow_run_name:
        init_kwargs["mlflow"] = {"run_name": cfg.mlflow_run_name}
    project = cfg.wandb_project or cfg.mlflow_experiment_name or Path(cfg.output_dir).name or "tuneforge"
    accelerator.init_trackers(project, config=_flat(run_config), init_kwargs=init_kwargs)


def _flat(data: dict, prefix: str = "") -> dict:
    """Trackers take flat scalar hyperparameters."""
    out = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, int | float | str | bool):
            out[key] = v
        elif v is not None:
            out[key] = str(v)
    return out
