"""Training objectives and the registry that picks one from the config.

`rl:` names a preference or RL method, `reward_model: true` / `process_reward_model: true` select
reward modelling, and nothing selects supervised fine-tuning (`config.methods.method_name`). A method is
a subclass of `Objective` in its own module, registered below with one line; the training loop never
changes (docs/objectives.md). `get_objective(cfg)` runs before any model is loaded, so a method's own
checks (and an unimplemented method) fail immediately with a clear message.
"""

from __future__ import annotations

from collections.abc import Callable

from tuneforge.config.methods import method_key, method_name
from tuneforge.config.schema import Config
from tuneforge.errors import NotSupportedYet

from .base import Batch, Objective, StepShape
from .dpo import DPOObjective
from .ebft.mode import ebft_objective
from .grpo import GDPOObjective, GRPOObjective
from .kto import KTOObjective
from .orpo import ORPOObjective
from .process_reward_model import ProcessRewardModelObjective
from .reward_model import RewardModelObjective
from .sft import SFTObjective
from .simpo import SimPOObjective

# An objective class, or a function of the config returning one (`rl: ebft` picks its class by ebft.mode).
ObjectiveFactory = Callable[[Config], Objective]
_REGISTRY: dict[str, ObjectiveFactory] = {}


def register(name: str, cls: ObjectiveFactory) -> ObjectiveFactory:
    """Make `cls` the objective of method `name` (the value of `rl:`, or sft / reward_model / ...)."""
    _REGISTRY[name] = cls
    return cls


register("sft", SFTObjective)
register("dpo", DPOObjective)
register("ipo", DPOObjective)
register("simpo", SimPOObjective)
register("kto", KTOObjective)
register("orpo", ORPOObjective)
register("reward_model", RewardModelObjective)
register("process_reward_model", ProcessRewardModelObjective)
register("grpo", GRPOObjective)
register("gdpo", GDPOObjective)
register("ebft", ebft_objective)


def get_objective(cfg: Config) -> Objective:
    cls = _REGISTRY.get(method_name(cfg))
    if cls is None:
        raise NotSupportedYet(
            f"`{method_key(cfg)}` is not implemented in this version of tuneforge yet; supervised fine-tuning "
            "(no `rl:` key) is. Remove the key to run SFT."
        )
    return cls(cfg)


__all__ = ["Batch", "Objective", "SFTObjective", "StepShape", "get_objective", "register"]
