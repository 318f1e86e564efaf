"""Training objectives and the registry that picks one from the config.

`rl:` names a preference or RL method, `reward_model: true` / `process_reward_model: true` select
reward modelling, and nothing selects supervised fine-tuning. `get_objective(cfg)` is called before
any model is loaded, so an unimplemented method fails immediately with a clear message.
A new method registers a subclass of `Objective` under its name; the training loop never changes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from tuneforge.config.schema import Config
from tuneforge.errors import NotSupportedYet

from .base import Batch, Objective
from .sft import SFTObjective

_REGISTRY: dict[str, type[Objective]] = {}

# Methods the config accepts whose objectives are not written yet.
PLANNED = {
    "dpo": "DPO", "ipo": "IPO", "simpo": "SimPO", "kto": "KTO", "orpo": "ORPO", "grpo": "GRPO",
    "gdpo": "GDPO", "ebft": "EBFT", "reward_model": "outcome reward modelling",
    "process_reward_model": "process reward modelling",
}


def register(name: str) -> Callable[[type[Objective]], type[Objective]]:
    def deco(cls: type[Objective]) -> type[Objective]:
        _REGISTRY[name] = cls
        return cls

    return deco


register("sft")(SFTObjective)

# Objectives in their own modules, imported only when selected (a method's dependencies never load for SFT).
_LAZY = {
    "dpo": "dpo:DPOObjective", "ipo": "dpo:DPOObjective", "simpo": "simpo:SimPOObjective",
    "orpo": "orpo:ORPOObjective", "kto": "kto:KTOObjective", "grpo": "grpo:GRPOObjective",
    "gdpo": "grpo:GDPOObjective", "reward_model": "reward_model:RewardModelObjective",
    "process_reward_model": "process_reward_model:ProcessRewardModelObjective",
}


def _lazy(name: str) -> type[Objective] | None:
    spec = _LAZY.get(name)
    if spec is None:
        return None
    module_name, _, cls_name = spec.partition(":")
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__name__}.{module_name}":
            return None  # not written yet
        raise
    return getattr(module, cls_name, None)


def _register_preference() -> None:
    # Offline preference methods and reward models (methods/preference.py and the modules it serves).
    from .dpo import DPOObjective
    from .kto import KTOObjective
    from .orpo import ORPOObjective
    from .process_reward_model import ProcessRewardModelObjective
    from .reward_model import RewardModelObjective
    from .simpo import SimPOObjective

    for name, cls in (("dpo", DPOObjective), ("ipo", DPOObjective), ("simpo", SimPOObjective),
                      ("kto", KTOObjective), ("orpo", ORPOObjective), ("reward_model", RewardModelObjective),
                      ("process_reward_model", ProcessRewardModelObjective)):
        register(name)(cls)


_register_preference()


def _register_online() -> None:
    # Online RL (methods/grpo.py): GRPO and GDPO share one objective.
    from .grpo import GDPOObjective, GRPOObjective

    register("grpo")(GRPOObjective)
    register("gdpo")(GDPOObjective)


_register_online()


def objective_name(cfg: Config) -> str:
    if cfg.rl:
        return cfg.rl
    if cfg.reward_model:
        return "reward_model"
    if cfg.process_reward_model:
        return "process_reward_model"
    return "sft"


def get_objective(cfg: Config) -> Objective:
    name = objective_name(cfg)
    cls = _REGISTRY.get(name) or _lazy(name)
    if cls is None:
        what = PLANNED.get(name, name)
        key = f"rl: {name}" if cfg.rl else f"{name}: true"
        raise NotSupportedYet(
            f"`{key}` ({what}) is not implemented in this version of tuneforge yet; supervised fine-tuning "
            "(no `rl:` key) is. Remove the key to run SFT."
        )
    return cls(cfg)


__all__ = ["Batch", "Objective", "SFTObjective", "get_objective", "objective_name", "register"]
