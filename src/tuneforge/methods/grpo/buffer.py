"""GRPO's generation buffer: what one generation carries across optimizer steps and checkpoints.

A step either samples a new generation or, with `trl.num_iterations: mu`, replays the last one (mu
optimizer steps per generation, pi_old fixed at generation time). The rollouts of a new generation wait
in `pending` until the whole step has been sampled, because their advantages may use statistics of the
whole generation (scale_rewards: batch, GDPO). A checkpoint saves the generation still to be replayed,
so a resumed run trains on exactly the completions an uninterrupted run would.
"""

from __future__ import annotations

import torch

from ..base import Batch


class GenerationBuffer:
    def __init__(self, num_iterations: int):
        self.num_iterations = num_iterations
        self.generation: list[Batch] = []  # the last generation's scored rollouts, replayed num_iterations times
        self.uses = 0  # optimizer steps trained on `generation` so far
        self.pending: list[Batch] = []  # rolled out this step, advantages not set yet
        self.rollouts = 0  # generations sampled by this process so far (the reward functions' global_step)

    def start_step(self) -> bool:
        """Begin an optimizer step: True when it replays the last generation, else the buffer is emptied."""
        if self.generation and self.uses < self.num_iterations:
            return True
        self.generation, self.uses = [], 0
        return False

    def replayed(self, index: int) -> Batch:
        return self.generation[index % len(self.generation)]

    def add(self, rollout: Batch) -> None:
        """A newly sampled and scored rollout of this step."""
        self.generation.append(rollout)
        self.pending.append(rollout)

    def end_step(self) -> list[Batch]:
        """Count the step as one use of the generation; the rollouts whose advantages are still to be set."""
        self.uses += 1
        pending, self.pending = self.pending, []
        return pending

    def to(self, device: torch.device) -> None:
        """Move a generation restored from a checkpoint (it comes back on the CPU) to the model's device."""
        self.generation = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
                           for b in self.generation]

    def state_dict(self) -> dict:
        state: dict = {"rollouts": self.rollouts}
        if self.generation and self.uses < self.num_iterations:  # replays left
            state["generation"], state["uses"] = self.generation, self.uses
        return state

    def load_state_dict(self, state: dict) -> None:
        self.rollouts = state.get("rollouts", 0)
        self.generation, self.uses = state.get("generation", []), state.get("uses", 0)
