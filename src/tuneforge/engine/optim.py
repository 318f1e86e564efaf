"""Optimizers and their parameter groups.

Weight decay applies to matrices only: biases and norm scales (every parameter with fewer than two
dimensions) are in a group with weight_decay 0, as is standard for transformers.
"""

from __future__ import annotations

import importlib.util
import logging

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


def loraplus_groups(model, groups: list[dict], lr: float, ratio: float, embedding_lr: float) -> list[dict]:
    """LoRA+ (Hayou et al., 2024): `groups` split by learning rate. B matrices train at lr x ratio, A matrices
    at lr, adapters on embedding layers at `embedding_lr`; 1-D parameters join the B matrices, as in PEFT's
    create_loraplus_optimizer (tested against it). Weight decay stays as `param_groups` set it."""
    names = {id(p): name for name, p in model.named_parameters()}

    def rate(p) -> float:
        name = names[id(p)]
        if ".lora_embedding_A." in name or ".lora_embedding_B." in name:
            return embedding_lr
        return lr * ratio if ".lora_B." in name or p.ndim == 1 else lr

    split = []
    for group in groups:
        by_rate: dict[float, list] = {}
        for p in group["params"]:
            by_rate.setdefault(rate(p), []).append(p)
        # the base rate's group first: the logged learning rate is the first group's
        split += [{**group, "params": ps, "lr": r} for r, ps in sorted(by_rate.items(), key=lambda i: (i[0] != lr, i[0]))]
    return split


def build_optimizer(cfg: Config, model) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.loraplus_lr_ratio is not None:
        groups = loraplus_groups(model, groups, cfg.learning_rate, cfg.loraplus_lr_ratio, cfg.loraplus_lr_embedding)
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
