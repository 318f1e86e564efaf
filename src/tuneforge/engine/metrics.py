"""What a run reports while it trains: metrics.jsonl (always), a live progress bar, trackers, and
the FLOP accounting behind MFU.

`output_dir/metrics.jsonl` gets one JSON object per logged training step (`"type": "train"`) and per
evaluation (`"type": "eval"`). On a terminal a rich progress bar shows step/total, epoch, loss, lr,
grad norm, tokens/s and the ETA; elsewhere (CI, log files) the same values are logged as lines.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("tuneforge")

# Dense (no sparsity) bf16 peak FLOP/s per GPU from the vendors' datasheets, for MFU. Unknown GPUs report no MFU.
_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
               "L40S": 362e12, "B200": 2250e12, "GH200": 989e12}


# ---------------------------------------------------------------- one step, and the steps of one log line
@dataclass
class StepResult:
    """What one optimizer step reports."""

    sums: dict[str, float]  # the objective's metric sums over the step, all processes
    num_items: int  # items the objective summed over (SFT: trained tokens), all processes
    grad_norm: float | None  # before clipping
    lr: float
    tokens: int  # real (non-padding) input tokens, this process
    flops: float  # model FLOPs, this process


class LogInterval:
    """Totals over the steps between two log lines."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.items = 0
        self.tokens = 0
        self.seconds = 0.0
        self.flops = 0.0
        self.steps = 0
        self.norms: list[float] = []
        self.lr = 0.0

    def add(self, result: StepResult, seconds: float) -> None:
        for k, v in result.sums.items():
            self.sums[k] += v
        self.items += result.num_items
        self.tokens += result.tokens
        self.flops += result.flops
        self.seconds += seconds
        self.steps += 1
        self.lr = result.lr
        if result.grad_norm is not None and math.isfinite(result.grad_norm):
            self.norms.append(result.grad_norm)

    def grad_norm(self) -> float | None:
        return sum(self.norms) / len(self.norms) if self.norms else None

    def train_record(self, summary: dict, *, step: int, epoch: float, total_tokens: int,
                     peak_flops: float | None) -> dict:
        """The `type: train` record of these steps; `summary` is the objective's summary of their sums."""
        record = {
            "type": "train",
            "step": step,
            "epoch": round(epoch, 4),
            **summary,
            "lr": self.lr,
            "grad_norm": self.grad_norm(),
            "tokens": self.tokens,
            "trained_tokens": self.items,
            "tokens_per_second": self.tokens / max(self.seconds, 1e-9),
            "total_tokens": total_tokens,
            "step_time": self.seconds / max(self.steps, 1),
        }
        if peak_flops:
            record["mfu"] = self.flops / (self.seconds * peak_flops)
        return record


# ---------------------------------------------------------------- FLOPs and MFU
class FlopCounter:
    """Model FLOPs of a step (the PaLM paper's convention, Chowdhery et al. 2022, appendix B: no causal discount):

    full fine-tune: 6 N_mm T + 12 L d_attn sum(l_i^2)
    adapters:       4 N_mm T + 6 N_ad T + 12 L d_attn sum(l_i^2)   (the frozen base gets no weight-gradient GEMM)

    N_mm counts every linear weight of the blocks plus the LM head (even when tied), and of a mixture of
    experts' fused expert weights (3-D parameters, experts first) the share a token uses
    (num_experts_per_tok / experts); T the real (non-padding) tokens and l_i the document lengths.
    """

    def __init__(self, model, adapter: bool):
        from tuneforge.models.losses import unwrap_peft

        base = unwrap_peft(model)
        head = base.get_output_embeddings()
        n_mm = 0
        for name, module in base.named_modules():
            if isinstance(module, torch.nn.Linear) and module is not head and "lora_" not in name:
                n_mm += module.in_features * module.out_features
        if head is not None:
            n_mm += head.weight.shape[0] * head.weight.shape[1]
        cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        active = getattr(cfg, "num_experts_per_tok", None)
        if active:
            n_mm += sum(p.numel() * active // p.shape[0] for name, p in base.named_parameters()
                        if p.dim() == 3 and "lora_" not in name)
        heads = getattr(cfg, "num_attention_heads", 0) or 0
        head_dim = getattr(cfg, "head_dim", None) or (getattr(cfg, "hidden_size", 0) // max(heads, 1))
        self.n_mm = n_mm
        self.layers = getattr(cfg, "num_hidden_layers", 0) or 0
        self.d_attn = heads * head_dim
        self.adapter = adapter
        self.n_adapter = sum(p.numel() for p in model.parameters() if p.requires_grad) if adapter else 0

    def step_flops(self, tokens: int, sum_sq_lengths: int) -> float:
        dense = (4 * self.n_mm + 6 * self.n_adapter) if self.adapter else 6 * self.n_mm
        return dense * tokens + 12 * self.layers * self.d_attn * sum_sq_lengths


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAK_FLOPS.items():
        if key in name:
            return value
    return None


# ---------------------------------------------------------------- the logger
class MetricsLogger:
    """Writes metrics.jsonl, drives the progress display and forwards values to the trackers."""

    def __init__(self, output_dir: Path, total_steps: int, *, enabled: bool, accelerator=None,
                 trackers: bool = False, progress: bool | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.total = total_steps
        self.enabled = enabled
        self.accelerator = accelerator
        self.trackers = trackers
        self.records: list[dict] = []
        self._progress = None
        self._task = None
        show = sys.stderr.isatty() if progress is None else progress
        if enabled and show:
            self._progress = _make_progress()

    # -- lifecycle
    def start(self, step: int, keep_until: int | None = None) -> None:
        """Open the log; on resume keep only the records up to the resumed step (later ones are stale)."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if keep_until is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= keep_until]
        self.records = kept
        with open(self.path, "w") as fh:
            for r in kept:
                fh.write(json.dumps(r) + "\n")
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task("train", total=self.total, completed=step, epoch=0.0, loss="-",
                                                 lr="-", gnorm="-", tps="-")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    # -- records
    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
        if self.trackers and self.accelerator is not None:
            values = {f"{record['type']}/{k}": v for k, v in record.items()
                      if isinstance(v, int | float) and k not in ("step", "type")}
            self.accelerator.log(values, step=record["step"])

    def train_step(self, record: dict) -> None:
        self.write(record)
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.update(self._task, completed=record["step"], epoch=record["epoch"],
                                  loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                  gnorm=_fmt(record.get("grad_norm")), tps=f"{record.get('tokens_per_second', 0):,.0f}")
        else:
            log.info("step %d/%d  epoch %.2f  loss %.4f  lr %.2e  grad_norm %s  tokens/s %s", record["step"],
                     self.total, record["epoch"], record["loss"], record["lr"], _fmt(record.get("grad_norm")),
                     f"{record.get('tokens_per_second', 0):,.0f}")

    def advance(self, step: int) -> None:
        """Move the bar on steps that are not logged."""
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def eval_result(self, record: dict) -> None:
        self.write(record)
        if self.enabled:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("eval_") and k != "eval_tokens")
            if self._progress is not None:
                self._progress.console.print(f"step {record['step']}: {shown}")
            else:
                log.info("step %d: %s", record["step"], shown)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _make_progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]train"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("epoch {task.fields[epoch]:.2f}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("lr {task.fields[lr]}"),
        TextColumn("gnorm {task.fields[gnorm]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeRemainingColumn(),
        transient=False,
    )


def read_metrics(path: Path) -> list[dict]:
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
    return out
