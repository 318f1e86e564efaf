"""The GRPO family's arithmetic, free of models and data: advantages, the per-token objective, loss
aggregation and importance-sampling weights. Formulas: docs/grpo.md (GRPO: Shao et al. 2024, DeepSeekMath;
DAPO: Yu et al. 2025; Dr. GRPO: Liu et al. 2025; GSPO: Zheng et al. 2025; GDPO's per-reward normalisation);
every function is checked against closed-form values and TRL in tests/test_grpo_*.py.

Shapes: one row per completion, completion tokens on the second axis, `mask` [N, C] marks real tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

STD_EPS = 1e-4  # added to the std (not under the square root), as TRL does


def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Unbiased (n-1) standard deviation ignoring NaNs; NaN where fewer than two values are present."""
    mean = torch.nanmean(x, dim=dim, keepdim=True) if dim is not None else torch.nanmean(x)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True) if dim is not None else (~torch.isnan(x)).sum()
    sq = torch.nansum((x - mean) ** 2, dim=dim, keepdim=True) if dim is not None else torch.nansum((x - mean) ** 2)
    var = torch.where(count > 1, sq / (count - 1).clamp(min=1), torch.full_like(sq, math.nan))
    std = var.sqrt()
    return std if keepdim or dim is None else std.squeeze(dim)


# ---------------------------------------------------------------- rewards -> advantages
@dataclass
class Advantages:
    advantages: torch.Tensor  # [N] one scalar per completion, broadcast over its tokens
    rewards: torch.Tensor  # [N] the combined reward (NaN for unscorable completions)
    std_is_zero: torch.Tensor  # [N] bool: the std used for this completion is 0 (no signal in its group)


def combine_rewards(per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """R_i = nansum_k w_k r_ik; NaN where every reward function returned None for completion i."""
    combined = (per_func * weights.unsqueeze(0)).nansum(dim=1)
    return combined.masked_fill(torch.isnan(per_func).all(dim=1), math.nan)


def group_advantages(per_func: torch.Tensor, weights: torch.Tensor, num_generations: int, *,
                     scale_rewards: str = "group", aggregation: str = "sum_then_normalize",
                     batch_stats: tuple[float, float] | None = None) -> Advantages:
    """Advantages of completions laid out group by group ([N, K] rewards, N = groups x G).

    sum_then_normalize: A = (R - mean_group R) / (std + 1e-4), std per group ("group"), over the
    batch ("batch") or no division ("none"). normalize_then_sum (GDPO): each reward is z-scored in its
    group, the weighted sum is z-scored over the batch. Unscorable completions (all rewards NaN) leave
    the group statistics and get advantage 0. `batch_stats` = (mean, std) of the batch when the batch
    spans several calls or processes (see `batch_mean_std`); otherwise the batch is `per_func` itself.
    """
    n, k = per_func.shape
    if n % num_generations:
        raise ValueError(f"{n} completions do not form whole groups of {num_generations}")
    unscorable = torch.isnan(per_func).all(dim=1)
    if aggregation == "normalize_then_sum":
        grouped = per_func.view(-1, num_generations, k)
        z = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)) / (nanstd(grouped, dim=1, keepdim=True) + STD_EPS)
        rewards = (z.reshape(n, k) * weights.unsqueeze(0)).nansum(dim=1).masked_fill(unscorable, math.nan)
        mean, std = batch_stats or (torch.nanmean(rewards), nanstd(rewards))
        mean, std = torch.as_tensor(mean, dtype=rewards.dtype), torch.as_tensor(std, dtype=rewards.dtype)
        adv = (rewards - mean) / (std + STD_EPS)
        std_vec = std.expand(n)
    elif aggregation == "sum_then_normalize":
        rewards = combine_rewards(per_func, weights)
        grouped = rewards.view(-1, num_generations)
        adv = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).reshape(n)
        if scale_rewards == "batch":
            std = torch.as_tensor(batch_stats[1] if batch_stats else nanstd(rewards), dtype=rewards.dtype)
            std_vec = std.expand(n)
        else:
            std_vec = nanstd(grouped, dim=1, keepdim=True).expand(-1, num_generations).reshape(n)
        if scale_rewards != "none":
            adv = adv / (std_vec + STD_EPS)
    else:
        raise ValueError(f"unknown multi_objective_aggregation {aggregation!r}")
    adv = torch.nan_to_num(adv, nan=0.0)
    std_is_zero = torch.isclose(std_vec, torch.zeros_like(std_vec)) | torch.isnan(std_vec)
    return Advantages(adv, rewards, std_is_zero)


def batch_mean_std(rewards: torch.Tensor, all_reduce=None) -> tuple[float, float]:
    """(mean, unbiased std) of the non-NaN rewards of the whole generation batch, over every process.

    `all_reduce(t)` sums a float64 tensor over the data-parallel processes (None: one process). Two
    passes (the mean, then the squared deviations from it), as nanmean / nanstd compute on one process.
    """
    def reduced(t: torch.Tensor) -> torch.Tensor:
        return all_reduce(t) if all_reduce is not None else t

    ok = ~torch.isnan(rewards)
    r = rewards[ok].double()
    count, total = reduced(torch.stack([r.new_tensor(float(r.numel())), r.sum()])).tolist()
    if count == 0:
        return math.nan, math.nan
    mean = total / count
    sq = reduced(((r - mean) ** 2).sum().reshape(1)).item()
    return mean, (math.sqrt(sq / (count - 1)) if count > 1 else math.nan)


def needs_batch_stats(scale_rewards: str, aggregation: str) -> bool:
    """Whether advantages depend on statistics of the whole generation batch, not only of each group."""
    return aggregation == "normalize_then_sum" or scale_rewards == "batch"


# ---------------------------------------------------------------- the per-token objective
def k3(ref_logps: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: e^d - d - 1 with d = log ref - log pi (>= 0)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


@dataclass
class TokenTerms:
    loss: torch.Tensor  # [N, C] per-token loss (surrogate x IS weight x OPSM mask + beta k3)
    ratio: torch.Tensor  # [N, C] or [N, 1] (sequence level) rho
    low_clipped: torch.Tensor  # bool, same shape as ratio broadcast with the advantages
    high_clipped: torch.Tensor
    kl: torch.Tensor | None  # [N, C] k3, None when beta == 0


def token_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor, *,
               epsilon_low: float = 0.2, epsilon_high: float | None = None, delta: float | None = None,
               level: str = "token", beta: float = 0.0, ref_logps: torch.Tensor | None = None,
               is_weights: torch.Tensor | None = None, keep: torch.Tensor | None = None,
               bias_corrected_kl: bool = False) -> TokenTerms:
    """-min(rho A, clip(rho, 1-eps_low, 1+eps_high) A), then x OPSM keep mask, x IS weight, + beta k3.

    `old_logps` None means on-policy (pi_old = pi.detach(), so rho == 1 and the loss is REINFORCE with
    the group baseline). `level="sequence"` (GSPO) uses one ratio per sequence, exp(mean_t log-ratio).
    """
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    old = logps.detach() if old_logps is None else old_logps
    log_ratio = logps - old
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)
    elif level != "token":
        raise ValueError(f"unknown importance_sampling_level {level!r}")
    ratio = torch.exp(log_ratio)
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + eps_high)
    unclipped = torch.clamp(ratio, max=delta) if delta is not None else ratio
    loss = -torch.min(unclipped * adv, clipped * adv)
    if keep is not None:
        loss = loss * keep.unsqueeze(-1).to(loss.dtype)
    if is_weights is not None:
        loss = loss * is_weights
    kl = None
    if beta != 0.0:
        kl = k3(ref_logps, logps)
        if bias_corrected_kl:
            kl = kl * ratio
        loss = loss + beta * kl
    if loss.shape != mask.shape:  # sequence level without a per-token term: broadcast to tokens
        loss = loss.expand_as(mask)
    low = (ratio < 1 - epsilon_low) & (adv < 0)
    high = (ratio > 1 + eps_high) & (adv > 0)
    return TokenTerms(loss, ratio, low, high, kl)


# ---------------------------------------------------------------- aggregation
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def loss_items(loss_type: str, mask: torch.Tensor) -> int:
    """What the loss of one micro-batch is a mean over, counted so that the step mean is exact:
    dapo - completion tokens (of the whole step); grpo, dr_grpo - sequences; bnpo - micro-batches."""
    if loss_type == "dapo":
        return int(mask.sum())
    if loss_type in ("grpo", "dr_grpo"):
        return int(mask.shape[0])
    if loss_type == "bnpo":
        return 1
    raise ValueError(f"unknown loss_type {loss_type!r}")


def loss_sum(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int) -> torch.Tensor:
    """The micro-batch's sum in the units of `loss_items`; the engine divides by the step's total items.

    grpo:    sum_i (sum_t M L / sum_t M)              / (sequences of the step)
    bnpo:    (sum_{i,t} M L / sum_{i,t} M)            / (micro-batches of the step)
    dr_grpo: sum_{i,t} M L / L_max                    / (sequences of the step)
    dapo:    sum_{i,t} M L                            / (completion tokens of the step)
    """
    m = mask.to(per_token.dtype)
    masked = per_token * m
    if loss_type == "grpo":
        return (masked.sum(-1) / m.sum(-1).clamp(min=1)).sum()
    if loss_type == "bnpo":
        return masked.sum() / m.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return masked.sum() / max_completion_length
    if loss_type == "dapo":
        return masked.sum()
    raise ValueError(f"unknown loss_type {loss_type!r}")


# ---------------------------------------------------------------- off-policy corrections
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def importance_weights(old_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, mode: str, *,
                       cap: float = 3.0, floor: float | None = None) -> torch.Tensor:
    """Truncated / masked importance weights pi_old / pi_sampler, [N, C] (token) or [N, 1] (sequence).

    d = (log pi_old - log pi_samp) * m (NaN sampler log-probs count as 0); token modes w = e^d,
    sequence modes w = e^(sum_t d). truncate: clamp to [floor, cap]; mask: w = 0 outside [floor, cap]
    (a masked token or sequence gets weight 0, as TRL does). `floor` None = no lower bound.
    """
    if mode not in IS_MODES:
        raise ValueError(f"unknown importance sampling mode {mode!r}; one of {', '.join(IS_MODES)}")
    d = torch.nan_to_num((old_logps - sampler_logps) * mask.to(old_logps.dtype), nan=0.0)
    if mode.startswith("sequence"):
        d = d.sum(-1, keepdim=True)
    w = torch.exp(d)
    lo = -math.inf if floor is None else floor
    if mode.endswith("truncate"):
        return torch.clamp(w, min=floor, max=cap)
    return w.masked_fill((w < lo) | (w > cap), 0.0)


def off_policy_keep(advantages: torch.Tensor, logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor,
                    threshold: float) -> torch.Tensor:
    """OPSM (DeepSeek-V3.2): keep a sequence if A >= 0 or mean_t(log pi_samp - log pi) <= threshold. [N] bool."""
    diff = torch.nan_to_num(sampler_logps - logps.detach(), nan=0.0) * mask.to(logps.dtype)
    mean = diff.sum(-1) / mask.sum(-1).clamp(min=1)
    adv = advantages if advantages.dim() == 1 else advantages.squeeze(-1)
    return (adv >= 0) | (mean <= threshold)
