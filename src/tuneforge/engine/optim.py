"""Optimizers and their parameter groups.

Weight decay applies to matrices only: biases and norm scales (every parameter with fewer than two
dimensions) are in a group with weight_decay 0, as is standard for transformers.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass

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
    "ademamix_8bit": "AdEMAMix8bit",
    "paged_ademamix_8bit": "PagedAdEMAMix8bit",
    "paged_ademamix_32bit": "PagedAdEMAMix32bit",
}
_TORCH = {"sgd": "SGD", "rmsprop": "RMSprop", "adagrad": "Adagrad"}


@dataclass(frozen=True)
class _Family:
    """Optimizers from one optional package: config name -> class name in `module`."""

    package: str  # import name
    pip: str  # what to install
    module: str
    names: dict[str, str]

    def load(self, name: str):
        if importlib.util.find_spec(self.package) is None:
            instead = "lion (lion-pytorch)" if "lion" in name else "adamw_torch"
            raise TuneforgeError(f"optimizer: {name} needs the {self.package} package (pip install {self.pip}); "
                                 f"or use {instead}.")
        return importlib.import_module(self.module)


_FAMILIES = (
    _Family("bitsandbytes", "bitsandbytes", "bitsandbytes.optim", _BNB),
    _Family("torchao", "torchao", "torchao.optim", {
        "adamw_torch_8bit": "AdamW8bit", "ao_adamw_8bit": "AdamW8bit", "adamw_torch_4bit": "AdamW4bit",
        "ao_adamw_4bit": "AdamW4bit", "ao_adamw_fp8": "AdamWFp8"}),
    _Family("schedulefree", "schedulefree", "schedulefree", {
        "schedule_free_adamw": "AdamWScheduleFree", "schedule_free_radam": "RAdamScheduleFree",
        "schedule_free_sgd": "SGDScheduleFree"}),
    _Family("optimi", "torch-optimi", "optimi", {
        "optimi_adamw": "AdamW", "optimi_adam": "Adam", "optimi_lion": "Lion", "optimi_radam": "RAdam",
        "optimi_ranger": "Ranger", "optimi_sgd": "SGD", "optimi_stableadamw": "StableAdamW",
        "optimi_adan": "Adan", "stable_adamw": "StableAdamW"}),
    _Family("lion_pytorch", "lion-pytorch", "lion_pytorch", {"lion": "Lion"}),
)


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
    if cfg.bf16_master_weights == "kahan":
        return _kahan_adamw(groups, adam, extra)
    if name in ("adamw_torch", "adamw", "adamw_torch_fused"):
        on_cuda = next(model.parameters()).is_cuda or torch.cuda.is_available()
        fused = name == "adamw_torch_fused" and on_cuda
        if name == "adamw_torch_fused" and not on_cuda:
            log.info("optimizer adamw_torch_fused: the fused kernel is used on CUDA only; using adamw_torch on CPU")
        return torch.optim.AdamW(groups, **adam, fused=fused or None, **extra)
    if name in _TORCH:
        return getattr(torch.optim, _TORCH[name])(groups, lr=lr, **extra)
    if name == "adafactor":
        return _adafactor(groups, lr, extra)
    if name == "ademamix":
        return _ademamix(cfg, groups, extra)
    if name == "muon":
        return _muon(cfg, model, groups, extra)
    family = next((f for f in _FAMILIES if name in f.names), None)
    if family is None:
        raise TuneforgeError(f"unknown optimizer `{name}`")
    module = family.load(name)
    cls = getattr(module, family.names[name])
    if family.package == "bitsandbytes":
        if "lion" in name:
            return cls(groups, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), **extra)
        if "ademamix" in name:
            return cls(groups, **_ademamix_args(cfg, extra), **extra)
        return cls(groups, **adam, **extra)
    if family.package == "schedulefree":
        return _schedule_free(cls, cfg, model, groups, extra)
    if family.package == "lion_pytorch" or name == "optimi_lion":
        return cls(groups, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), **extra)
    if name == "optimi_sgd":
        return cls(groups, lr=lr, **extra)
    if name == "optimi_adan":  # three betas of its own (optim_args `betas` to change them)
        return cls(groups, lr=lr, eps=cfg.adam_epsilon, **extra)
    return cls(groups, **adam, **extra)


def _kahan_adamw(groups, adam: dict, extra: dict):
    """bf16_master_weights: kahan: torch-optimi's AdamW with Kahan summation (Triton kernel on CUDA) over the
    bf16 weights; optimi's own implementation rather than ours (its tests cover the compensation)."""
    module = next(f for f in _FAMILIES if f.package == "optimi").load("optimi_adamw")
    log.info("bf16_master_weights: kahan: bf16 weights with optimi.AdamW(kahan_sum=True)")
    return module.AdamW(groups, **adam, **{"kahan_sum": True, **extra})


def _adafactor(groups, lr: float, extra: dict):
    """transformers' Adafactor. Default: a fixed learning rate (scale_parameter, relative_step and warmup_init
    off, so the schedule drives it); optim_args select the variants, e.g. `relative_step: true` for the
    paper's own 1/sqrt(t) rate (then learning_rate is not used)."""
    from transformers.optimization import Adafactor

    options = {"scale_parameter": False, "relative_step": False, "warmup_init": False, **extra}
    if options["warmup_init"] and not options["relative_step"]:
        raise TuneforgeError("optim_args: Adafactor's warmup_init needs relative_step: true.")
    return Adafactor(groups, lr=None if options["relative_step"] else lr, **options)


def _ademamix_args(cfg: Config, extra: dict) -> dict:
    """Keyword arguments of AdEMAMix from the Adam keys plus optim_args beta3, alpha, t_alpha, t_beta3
    (the names transformers' `optim_args` use)."""
    betas = (cfg.adam_beta1, cfg.adam_beta2, extra.pop("beta3", 0.9999))
    return {"lr": cfg.learning_rate, "betas": betas, "alpha": extra.pop("alpha", 5.0), "eps": cfg.adam_epsilon,
            "t_alpha": extra.pop("t_alpha", None), "t_beta3": extra.pop("t_beta3", None)}


def _ademamix(cfg: Config, groups, extra: dict):
    from .optimizers import AdEMAMix

    return AdEMAMix(groups, **_ademamix_args(cfg, extra), **extra)


def _muon(cfg: Config, model, groups, extra: dict):
    """torch's Muon for the hidden weight matrices; AdamW for embeddings, the output head and every 1-D
    parameter, as Muon's authors prescribe (it orthogonalizes 2-D updates only)."""
    if not hasattr(torch.optim, "Muon"):
        raise TuneforgeError("optimizer: muon needs torch.optim.Muon, which this torch lacks (torch >= 2.9 has it); "
                             "upgrade torch or use adamw_torch.")
    from .optimizers import OptimizerPair

    names = {id(p): n for n, p in model.named_parameters()}
    embedded = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    out_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedded |= {id(p) for p in (out_head.parameters() if out_head is not None else [])}

    def hidden(p) -> bool:
        n = names[id(p)]
        return p.ndim == 2 and id(p) not in embedded and "embed" not in n and "lm_head" not in n

    muon_groups, adam_groups = [], []
    for group in groups:
        for target, keep in ((muon_groups, True), (adam_groups, False)):
            ps = [p for p in group["params"] if hidden(p) == keep]
            if ps:
                target.append({**group, "params": ps})
    adam = torch.optim.AdamW(adam_groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon) if adam_groups else None
    if not muon_groups:
        raise TuneforgeError("optimizer: muon found no hidden weight matrix to train (it trains 2-D weights other "
                             "than embeddings and the output head); use adamw_torch.")
    muon = torch.optim.Muon(muon_groups, lr=cfg.learning_rate, **extra)
    return muon if adam is None else OptimizerPair(muon, adam)


def _schedule_free(cls, cfg: Config, model, groups, extra: dict):
    from .optimizers import ScheduleFreeBridge

    if "sgd" in cls.__name__.lower():
        optimizer = cls(groups, lr=cfg.learning_rate, **extra)
    else:
        optimizer = cls(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                        **extra)
    ScheduleFreeBridge(optimizer, model)
    return optimizer
