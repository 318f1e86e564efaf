"""Optimizers and their parameter groups.

Weight decay applies to matrices only: biases and norm scales (every parameter with fewer than two
dimensions) are in a group with weight_decay 0, as is standard for transformers.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable

import torch

from tuneforge.config.schema import Config
from tuneforge.errors import TuneforgeError

log = logging.getLogger("tuneforge")

_BNB = {
    "adamw_8bit": "AdamW8bit",
    "adamw_bnb_8bit": "AdamW8bit",
    "paged_adamw_8bit": "PagedAdamW8bit",
    "paged_adamw_32bit": "PagedAdamW32bit",
    "lion_8bit": "Lion8bit",
    "lion_32bit": "Lion32bit",
    "paged_lion_8bit": "PagedLion8bit",
}


def param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    if not decay and not no_decay:
        raise TuneforgeError("the model has no trainable parameters (check adapter / unfrozen_parameters).")
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def learning_rates(cfg: Config, model) -> Callable[[str, torch.Tensor], float] | None:
    """Each trainable parameter's learning rate from `lr_groups`, `embedding_lr(_scale)` and LoRA+, first
    match first; None when all train at learning_rate. A pattern that matches no trainable parameter is an
    error: it is almost always a typo. As in Axolotl, lr_groups apply to weight matrices (biases and norms
    keep learning_rate), and the embedding rate to embedding layers and any `embed_tokens` / `lm_head`.

    LoRA+ (Hayou et al., 2024): B matrices train at lr x loraplus_lr_ratio, A matrices at lr, adapters on
    embedding layers at loraplus_lr_embedding; 1-D parameters join the B matrices, as in PEFT's
    create_loraplus_optimizer (tested against it)."""
    lr, ratio = cfg.learning_rate, cfg.loraplus_lr_ratio
    embedding = cfg.embedding_lr if cfg.embedding_lr is not None else (
        lr * cfg.embedding_lr_scale if cfg.embedding_lr_scale is not None else None)
    if not cfg.lr_groups and embedding is None and ratio is None:
        return None
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    _check_lr_groups(cfg, trainable)
    embedded = {f"{m}.{n}" if m else n for m, module in model.named_modules()
                if isinstance(module, torch.nn.Embedding) for n, _ in module.named_parameters(recurse=False)}
    embedded |= {n for n in trainable if "embed_tokens" in n or "lm_head" in n}

    def rate(name: str, p: torch.Tensor) -> float:
        groups = (cfg.lr_groups or []) if p.ndim >= 2 and not name.endswith(".bias") else []
        for group in groups:
            if any(pattern in name for pattern in group.modules):
                return group.lr
        if ratio is not None:
            if ".lora_embedding_A." in name or ".lora_embedding_B." in name:
                return cfg.loraplus_lr_embedding
            if ".lora_B." in name or p.ndim == 1:
                return lr * ratio
        if embedding is not None and name in embedded:
            return embedding
        return lr

    return rate


def _check_lr_groups(cfg: Config, trainable: list[str]) -> None:
    for i, group in enumerate(cfg.lr_groups or []):
        for pattern in group.modules:
            if not any(pattern in n for n in trainable):
                raise TuneforgeError(f"lr_groups[{i}] ({group.name}): `{pattern}` matches no trainable parameter "
                                     f"(names look like `{trainable[0]}`)")


def split_by_rate(model, groups: list[dict], rate: Callable[[str, torch.Tensor], float], lr: float) -> list[dict]:
    """`groups` (weight decay) split further by learning rate; the base rate's part first, as the logged
    learning rate is the first group's."""
    names = {id(p): name for name, p in model.named_parameters()}
    split = []
    for group in groups:
        by_rate: dict[float, list] = {}
        for p in group["params"]:
            by_rate.setdefault(rate(names[id(p)], p), []).append(p)
        split += [{**group, "params": ps, "lr": r} for r, ps in sorted(by_rate.items(), key=lambda i: (i[0] != lr, i[0]))]
    return split


def build_optimizer(cfg: Config, model) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    rate = learning_rates(cfg, model)
    if rate is not None:
        groups = split_by_rate(model, groups, rate, cfg.learning_rate)
    name = cfg.optimizer
    extra = dict(cfg.optim_args or {})
    lr = cfg.learning_rate
    adam = {"lr": lr, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon}
    if name in ("adamw_torch", "adamw", "adamw_torch_fused"):
        on_cuda = next(model.parameters()).is_cuda or torch.cuda.is_available()
        fused = name == "adamw_torch_fused" and on_cuda
        if name == "adamw_torch_fused" and not on_cuda:
            log.info("optimizer adamw_torch_fused: the fused kernel is used on CUDA only; using adamw_torch on CPU")
        return torch.optim.AdamW(groups, **adam, fused=fused or None, **extra)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, **extra)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        options = {"scale_parameter": False, "relative_step": False, "warmup_init": False, **extra}
        return Adafactor(groups, lr=lr, **options)
    if name in _BNB:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise TuneforgeError(f"optimizer: {name} needs the bitsandbytes package (pip install bitsandbytes); "
                                 "or use adamw_torch.")
        import bitsandbytes as bnb

        cls = getattr(bnb.optim, _BNB[name])
        if "lion" in name:
            return cls(groups, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), **extra)
        return cls(groups, **adam, **extra)
    raise TuneforgeError(f"unknown optimizer `{name}`")
