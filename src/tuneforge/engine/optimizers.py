"""Optimizer classes tuneforge provides itself: AdEMAMix, a Muon + AdamW pair, and the bridge that keeps a
schedule-free optimizer's weights at their evaluation point whenever the model is not training.

Everything here is pure torch; optional packages are imported by `tuneforge.engine.optim`.
"""

from __future__ import annotations

import math

import torch


class AdEMAMix(torch.optim.Optimizer):
    """AdEMAMix (Pagliardini, Ablin and Grangier, 2024, "The AdEMAMix Optimizer: Better, Faster, Older", Alg. 1).

    Adam's update plus a slow EMA of the gradients (beta3) weighted by alpha:
        m1 <- b1 m1 + (1 - b1) g,  m2 <- b3 m2 + (1 - b3) g,  nu <- b2 nu + (1 - b2) g^2
        p  <- p - lr * ((m1 / (1 - b1^t) + alpha m2) / (sqrt(nu / (1 - b2^t)) + eps) + wd p)
    With `t_alpha` / `t_beta3`, alpha grows linearly and beta3 follows the paper's schedule from b1 to b3
    over that many steps (both help early stability). Weight decay is decoupled, applied to p before the step.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
                 alpha: float = 5.0, t_alpha: int | None = None, t_beta3: int | None = None, eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if not (min(betas) >= 0.0 and max(betas) < 1.0):
            raise ValueError(f"AdEMAMix betas must be in [0, 1): {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3, eps=eps,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)

    @staticmethod
    def _beta3(t: int, b1: float, b3: float, t_beta3: int | None) -> float:
        if not t_beta3 or t >= t_beta3:
            return b3
        # The paper's scheduler: log-linear interpolation of the half-life from b1 to b3.
        frac = t / t_beta3
        log_b1, log_b3 = math.log(b1), math.log(b3)
        return min(math.exp(log_b1 * log_b3 / ((1 - frac) * log_b3 + frac * log_b1)), b3)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2, b3_final = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m1"] = torch.zeros_like(p)
                    state["m2"] = torch.zeros_like(p)
                    state["nu"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                alpha = group["alpha"]
                if group["t_alpha"]:
                    alpha = min(t * alpha / group["t_alpha"], alpha)
                b3 = self._beta3(t, b1, b3_final, group["t_beta3"])
                m1, m2, nu = state["m1"], state["m2"], state["nu"]
                m1.lerp_(g, 1 - b1)
                m2.lerp_(g, 1 - b3)
                nu.mul_(b2).addcmul_(g, g, value=1 - b2)
                if wd:
                    p.mul_(1 - lr * wd)
                denom = (nu / (1 - b2**t)).sqrt_().add_(eps)
                p.addcdiv_(m1 / (1 - b1**t) + alpha * m2, denom, value=-lr)
        return loss


class OptimizerPair(torch.optim.Optimizer):
    """Two optimizers over disjoint parameters, stepped together (Muon for hidden matrices, AdamW for the rest).

    `param_groups` lists both optimizers' groups (the same dicts), so a learning-rate scheduler scales both,
    and the first group is the first optimizer's (the logged rate).
    """

    def __init__(self, first: torch.optim.Optimizer, second: torch.optim.Optimizer):
        self.parts = (first, second)
        # Not Optimizer.__init__: the parameters already belong to the two parts.
        self.defaults = dict(first.defaults)
        self.param_groups = first.param_groups + second.param_groups
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}

    @property
    def state(self):
        return {**self.parts[0].state, **self.parts[1].state}

    @state.setter
    def state(self, value):  # Optimizer internals assign it; the parts own their state
        pass

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict: dict) -> None:
        for part, saved in zip(self.parts, state_dict["parts"], strict=True):
            part.load_state_dict(saved)


class ScheduleFreeBridge:
    """Keeps a schedule-free optimizer (Defazio et al., 2024) in the mode the model is in.

    Schedule-free methods compute gradients at one point (y) and evaluate/save another (x). The optimizer is
    put in eval mode (weights = x) right after every step, and a forward pre-hook switches it to train mode
    (weights = y) when a training forward pass starts, and back to eval mode for an evaluation pass; so
    checkpoints, evaluations and the final weights are all x, with no call needed from the training loop.
    """

    def __init__(self, optimizer, model: torch.nn.Module):
        self.optimizer = optimizer
        self.training = False
        optimizer.eval()
        # Optimizer step hooks (not a replaced `step`, which LR schedulers wrap in turn).
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.set(True))
        optimizer.register_step_post_hook(lambda opt, args, kwargs: self.set(False))
        optimizer.tuneforge_schedule_free = True
        self.handle = model.register_forward_pre_hook(lambda module, args: self.set(module.training))

    def set(self, training: bool) -> None:
        if training != self.training:
            (self.optimizer.train if training else self.optimizer.eval)()
            self.training = training
