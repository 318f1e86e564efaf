"""A DeepSpeed JSON made concrete for one run: its `"auto"` values filled from the tuneforge config.

Axolotl's `deepspeed_configs/*.json` leave the batch shape, clipping and precision as `"auto"`: the trainer
that reads them fills them in (as Hugging Face's and Axolotl's do). Here they come from the same keys the
loop itself uses, so DeepSpeed and the step plan agree:

    train_micro_batch_size_per_gpu  <- micro_batch_size
    gradient_accumulation_steps     <- gradient_accumulation_steps
    train_batch_size                <- micro_batch_size x gradient_accumulation_steps x processes
    gradient_clipping               <- max_grad_norm (0: none)
    bf16.enabled / fp16.enabled     <- the run's mixed precision (bf16 / fp16 / none)
    optimizer.params (if present)   <- learning_rate, adam_beta1/2, adam_epsilon, weight_decay
    scheduler.params (if present)   <- learning_rate, the warmup steps, the run's total steps
    zero_optimization bucket sizes  <- from the model's hidden size h, as Hugging Face's integration fills them:
                                       reduce_bucket_size h*h, stage3_prefetch_bucket_size 0.9*h*h,
                                       stage3_param_persistence_threshold 10*h

A number the JSON sets that contradicts the config is an error naming both (the run would otherwise train
another batch or precision than the config says).
"""

from __future__ import annotations

import copy
import importlib.util
import os

from tuneforge.errors import TuneforgeError


class DeepSpeedConfigError(TuneforgeError):
    """The DeepSpeed JSON contradicts the tuneforge config."""


AUTO = "auto"


def unavailable_reason() -> str | None:
    """Why DeepSpeed cannot train here (None: it can). Without a GPU it runs on its CPU accelerator."""
    if importlib.util.find_spec("deepspeed") is None:
        return "DeepSpeed is not installed (pip install 'tuneforge[deepspeed]')"
    return None


def select_accelerator(cuda: bool) -> None:
    """Without CUDA, DeepSpeed's CPU accelerator (gloo); its own detection would try other devices first."""
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")




def fill(settings: dict, *, micro_batch_size: int, grad_accum: int, world_size: int, max_grad_norm: float | None,
         precision: str, optimizer: dict | None = None, scheduler: dict | None = None,
         hidden_size: int | None = None) -> dict:
    """A copy of `settings` with every "auto" replaced (see the module docstring); `optimizer` / `scheduler`
    are the values for those sections' "auto" params. Raises DeepSpeedConfigError on a contradiction."""
    out = copy.deepcopy(settings)
    batch = {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": grad_accum,
             "train_batch_size": micro_batch_size * grad_accum * world_size,
             "gradient_clipping": float(max_grad_norm or 0.0)}
    for key, value in batch.items():
        _set(out, key, value, _OURS[key])
    for kind in ("bf16", "fp16"):
        section = out.get(kind)
        if isinstance(section, dict) and "enabled" in section:
            _set(section, "enabled", precision == kind, "bf16/fp16", where=f"{kind}.enabled")
        elif precision == kind:
            out[kind] = {**(section or {}), "enabled": True}
    zero = out.get("zero_optimization")
    if isinstance(zero, dict) and hidden_size:
        for key, value in _buckets(hidden_size).items():
            if zero.get(key) == AUTO:
                zero[key] = value
    for name, values in (("optimizer", optimizer), ("scheduler", scheduler)):
        params = (out.get(name) or {}).get("params")
        if isinstance(params, dict) and values:
            for key, value in params.items():
                if value == AUTO and key in values:
                    params[key] = values[key]
            left = [k for k, v in params.items() if v == AUTO]
            if left:
                raise DeepSpeedConfigError(f"deepspeed: {name}.params {', '.join(left)} are \"auto\", which tuneforge "
                                           f"cannot fill; give numbers (it fills {', '.join(sorted(values))})")
    left = [k for k, v in _flat(out) if v == AUTO]
    if left:
        raise DeepSpeedConfigError(f"deepspeed: {', '.join(left)} {'is' if len(left) == 1 else 'are'} \"auto\", which "
                                   "tuneforge does not fill; give a number")
    return out


def _buckets(h: int) -> dict:
    return {"reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
            "stage3_param_persistence_threshold": 10 * h}


def _flat(settings: dict, prefix: str = ""):
    for key, value in settings.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


_OURS = {"train_micro_batch_size_per_gpu": "micro_batch_size", "gradient_accumulation_steps":
         "gradient_accumulation_steps", "train_batch_size": "micro_batch_size x gradient_accumulation_steps x processes",
         "gradient_clipping": "max_grad_norm"}


def _set(section: dict, key: str, value, ours: str, where: str | None = None) -> None:
    given = section.get(key, AUTO)
    if given == AUTO or given is None:
        section[key] = value
    elif _differs(given, value):
        raise DeepSpeedConfigError(
            f"deepspeed: {where or key} is {given!r} in the JSON but {value!r} from the config's {ours}; set it to "
            f"\"auto\" in the JSON (tuneforge fills it in) or make the two agree")


def _differs(given, value) -> bool:
    if isinstance(value, bool) or isinstance(given, bool):
        return bool(given) != bool(value)
    try:
        return abs(float(given) - float(value)) > 1e-12
    except (TypeError, ValueError):
        return True


def optimizer_values(cfg) -> dict:
    """What an optimizer section's "auto" params become."""
    return {"lr": cfg.learning_rate, "betas": [cfg.adam_beta1, cfg.adam_beta2], "eps": cfg.adam_epsilon,
            "weight_decay": cfg.weight_decay}


def scheduler_values(cfg, warmup: int, total_steps: int) -> dict:
    """What a scheduler section's "auto" params become (DeepSpeed's WarmupLR / WarmupDecayLR / cosine names)."""
    return {"warmup_min_lr": 0.0, "warmup_max_lr": cfg.learning_rate, "warmup_num_steps": warmup,
            "total_num_steps": total_steps, "warmup_min_ratio": 0.0, "cos_min_ratio": 0.0}


def run_settings(settings: dict, *, own_optimizer: bool) -> dict:
    """What tuneforge adds to every run: torch optimizers are allowed under ZeRO (and with offload, where
    DeepSpeed would otherwise insist on its compiled CPU Adam); DeepSpeed's own step printing is off."""
    out = dict(settings)
    if own_optimizer:
        out.setdefault("zero_allow_untested_optimizer", True)
        out.setdefault("zero_force_ds_cpu_optimizer", False)
    out.setdefault("steps_per_print", 2**31 - 1)
    return out
