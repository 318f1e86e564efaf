"""The reference model pi_ref of the preference methods (and of GRPO with beta != 0), and reference
log-probs precomputed once over the data.

With an adapter, pi_ref is the same network with the adapter disabled (PEFT's `disable_adapter()`): no
second copy in memory. With full fine-tuning it is a frozen copy, loaded the way the policy was loaded
(same seed, so `reinit_weights` gives the same random init); it is loaded on first use, from the model
source rather than copied from the live model, so that a resumed run still compares against the initial
policy. Reference passes run without gradients and in eval mode.
`precompute_ref_log_probs: true` runs the reference once over the data before training and stores the
log-probs as dataset columns (cached in the prepared-data cache entry, written with its atomic publish);
then no reference is held at all. Reference-free methods (SimPO, ORPO, reward models) never build one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tuneforge.config.schema import Config

from .base import Batch
from .pairs import sequence_logps

log = logging.getLogger("tuneforge")


def disable_dropout(model) -> None:
    """Zero every dropout layer, as TRL does for its preference trainers (`disable_dropout=True`)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


# ---------------------------------------------------------------- the reference model
def load_reference(cfg: Config, tokenizer, device=None):
    """A frozen copy of the policy's starting point, loaded as `engine.run` loads the policy.

    The seed is reset first (inside a forked RNG, so training randomness is untouched): a random init
    (`reinit_weights`) or resized embeddings come out identical to the policy's.
    """
    from tuneforge.models.load import load_model

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        if devices:
            torch.cuda.manual_seed_all(cfg.seed)
        ref = load_model(cfg, tokenizer)
    ref.requires_grad_(False)
    ref.eval()
    return ref.to(device) if device is not None else ref


class Reference:
    """pi_ref for the on-the-fly case: `with reference.network(model) as net:` runs net under no_grad."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.tokenizer = None  # set by the objective's prepare_data
        self.copy = None

    @contextlib.contextmanager
    def network(self, model) -> Iterator[Any]:
        with torch.no_grad():
            if is_peft_model(model):
                with model.disable_adapter(), eval_mode(model):
                    yield model
                return
            if self.copy is None:
                device = next(model.parameters()).device
                log.info("loading a frozen copy of the model as the reference (full fine-tuning)")
                self.copy = load_reference(self.cfg, self.tokenizer, device)
            yield self.copy

    def sequence_logps(self, model, batch: Batch, cached: torch.Tensor | None) -> torch.Tensor:
        """Per-sequence reference log-probs of `batch`: the precomputed `cached` when given, else a pass."""
        if cached is not None:
            return cached
        with self.network(model) as net:
            return sequence_logps(net, batch).logps


# ---------------------------------------------------------------- precomputed reference log-probs
def _reference_key(cfg: Config, family: str, extra: dict[str, Any]) -> str:
    """What decides the reference log-probs besides the tokens: the model source, its init and precision."""
    from tuneforge.models.load import mixed_precision, weights_dtype
    from tuneforge.models.tokenizer import model_source

    src = model_source(cfg)
    files = {}
    if Path(src).is_dir():
        for f in sorted(Path(src).glob("*")):
            if f.suffix in (".safetensors", ".bin", ".json"):
                st = f.stat()
                files[f.name] = [st.st_size, st.st_mtime_ns]
    material = {
        "family": family, "source": src, "revision": cfg.model_revision, "files": files,
        "overrides": cfg.model_config_overrides, "reinit": cfg.reinit_weights, "seed": cfg.seed,
        "dtype": str(weights_dtype(cfg)), "precision": mixed_precision(cfg), "attn": cfg.attn_implementation,
        "model_type": cfg.model_type, **extra,
    }
    blob = json.dumps(material, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def precompute_columns(cfg: Config, tokenizer, splits: dict[str, Any], columns: tuple[str, ...],
                       collate_fn: Callable[[list[list[dict]]], Batch],
                       compute_fn: Callable[[Any, Batch], dict[str, torch.Tensor]],
                       cache_dir: Path | None, family: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the reference once over every split and add its outputs as float columns.

    `collate_fn` builds an unpacked batch from rows of one document; `compute_fn(net, batch)` returns
    per-document tensors named like the new columns. Results are stored as `ref_logps-<key>-<split>.npz`
    in the prepared-data cache entry and reused when the data and the reference are unchanged.
    """
    from accelerate import PartialState

    from tuneforge.data.batches import gather
    from tuneforge.models.load import mixed_precision

    key = _reference_key(cfg, family, extra or {})
    prepared, net = dict(splits), None
    device = PartialState().device
    precision = mixed_precision(cfg)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                if precision != "no" else contextlib.nullcontext())
    size = max(1, cfg.eval_batch_size or cfg.micro_batch_size)
    for name, ds in splits.items():
        if ds is None:
            continue
        path = Path(cache_dir) / f"ref_logps-{key}-{name}.npz" if cache_dir else None
        values = _load_npz(path, len(ds))
        if values is None:
            if net is None:
                log.info("precomputing reference log-probs (precompute_ref_log_probs)")
                net = load_reference(cfg, tokenizer, device)
            ds_cols = ds.select_columns([c for c in columns if c in ds.column_names])
            parts: dict[str, list[np.ndarray]] = {}
            with torch.no_grad(), autocast:
                for start in range(0, len(ds), size):
                    mb = [[i] for i in range(start, min(start + size, len(ds)))]
                    batch = collate_fn(gather(ds_cols, mb, columns))
                    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    for k, v in compute_fn(net, batch).items():
                        parts.setdefault(k, []).append(v.float().cpu().numpy())
            values = {k: np.concatenate(v) for k, v in parts.items()}
            if path is not None:
                _save_npz(path, values)
        for k, v in values.items():
            if k in ds.column_names:
                ds = ds.remove_columns(k)
            ds = ds.add_column(k, v.astype(np.float64).tolist())
        prepared[name] = ds
    if net is not None:
        del net
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return prepared


def _load_npz(path: Path | None, rows: int) -> dict[str, np.ndarray] | None:
    if path is None or not path.exists():
        return None
    try:
        with np.load(path) as f:
            values = {k: f[k] for k in f.files}
    except (OSError, ValueError):
        return None
    if not values or any(len(v) != rows for v in values.values()):
        return None
    log.info("reusing precomputed reference log-probs from %s", path)
    return values


def _save_npz(path: Path, values: dict[str, np.ndarray]) -> None:
    from tuneforge.data.cache import publish_file

    # The prepared-data cache's atomic write: a reader never sees a half-written file, and the temporary
    # name does not come from torch's RNG (drawing from it here would change the training run's randomness).
    publish_file(path, lambda f: np.savez(f, **values))
