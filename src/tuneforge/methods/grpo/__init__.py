"""GRPO and GDPO: the objective (objective.py), its settings (settings.py), the generation buffer that
carries rollouts across steps and checkpoints (buffer.py), the batch layout and completion log-probs
(layout.py), the arithmetic of advantages and the surrogate (loss.py) and the logged values (metrics.py).
The samplers it generates with are built by `tuneforge.rollout.factory`."""

from .layout import completion_logps, training_layout
from .objective import GDPOObjective, GRPOObjective
from .settings import GRPOSettings

__all__ = ["GDPOObjective", "GRPOObjective", "GRPOSettings", "completion_logps", "training_layout"]
