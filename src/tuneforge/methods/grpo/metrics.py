"""GRPO's logged values: additive sums of one micro-batch's rollout (rewards, advantages, lengths,
generation speed), which the trainer adds over micro-batches and processes, and the step's summary."""

from __future__ import annotations

import math

import torch

from ..base import Batch


def rollout_sums(batch: Batch, reward_names: list[str], train_seconds: float) -> dict[str, float]:
    """Additive statistics of the rollout behind this micro-batch."""
    per_func, adv = batch["rewards_per_func"], batch["advantages"].double().cpu()
    R = batch["combined_rewards"]
    ok = ~torch.isnan(R)
    lengths = batch["token_valid"].sum(1).double().cpu()
    sums = {
        "completions": float(len(R)), "reward_sum": float(R[ok].sum()), "reward_sq": float((R[ok] ** 2).sum()),
        "reward_count": float(ok.sum()), "adv_sum": float(adv.sum()), "adv_sq": float((adv ** 2).sum()),
        "zero_std": float(batch["std_is_zero"].double().sum()), "length_sum": float(lengths.sum()),
        "truncated": float(batch["truncated"].double().sum()), "gen_seconds": float(batch["gen_seconds"]),
        "gen_tokens": float(batch["gen_tokens"]), "train_seconds": train_seconds, "micro_batches": 1.0,
    }
    for k, name in enumerate(reward_names):
        col = per_func[:, k]
        good = ~torch.isnan(col)
        sums[f"r/{name}/sum"] = float(col[good].sum())
        sums[f"r/{name}/sq"] = float((col[good] ** 2).sum())
        sums[f"r/{name}/n"] = float(good.sum())
    if "is_weights" in batch:
        w = batch["is_weights"].expand_as(batch["mask"]).double()
        m = batch["mask"].double()
        sums["is_sum"], sums["is_n"] = float((w * m).sum()), float(m.sum())
    return sums


def loss_sums(total: torch.Tensor, terms, mask: torch.Tensor) -> dict[str, float]:
    """The surrogate's additive statistics: loss, clipped-token counts and the KL, over completion tokens."""
    m = mask.float()
    low, high = terms.low_clipped.expand_as(m).float(), terms.high_clipped.expand_as(m).float()
    sums = {
        "loss_sum": float(total.detach()), "tokens_in_loss": float(m.sum()),
        "clip_low_sum": float((low * m).sum()), "clip_high_sum": float((high * m).sum()),
        "clip_region_sum": float((((low + high) > 0).float() * m).sum()),
    }
    if terms.kl is not None:
        sums["kl_sum"] = float((terms.kl.detach() * m).sum())
    return sums


def summarize(sums: dict[str, float], num_items: int) -> dict[str, float]:
    n = max(sums.get("completions", 0.0), 1.0)
    logged = {"loss": sums.get("loss_sum", 0.0) / max(num_items, 1)}
    logged.update(mean_std("reward", sums.get("reward_sum", 0.0), sums.get("reward_sq", 0.0),
                           sums.get("reward_count", 0.0)))
    for key in [k for k in sums if k.startswith("r/") and k.endswith("/sum")]:
        name = key[2:-4]
        logged.update(mean_std(f"rewards/{name}", sums[key], sums[f"r/{name}/sq"], sums[f"r/{name}/n"]))
    logged.update(mean_std("advantages", sums.get("adv_sum", 0.0), sums.get("adv_sq", 0.0), n))
    logged["frac_reward_zero_std"] = sums.get("zero_std", 0.0) / n
    logged["completions/count"] = sums.get("completions", 0.0)  # over every process
    logged["completions/mean_length"] = sums.get("length_sum", 0.0) / n
    logged["completions/clipped_ratio"] = sums.get("truncated", 0.0) / n
    tokens = max(sums.get("tokens_in_loss", 0.0), 1.0)
    for key, name in (("clip_low_sum", "clip_ratio/low_mean"), ("clip_high_sum", "clip_ratio/high_mean"),
                      ("clip_region_sum", "clip_ratio/region_mean"), ("kl_sum", "kl")):
        if key in sums:
            logged[name] = sums[key] / tokens
    if sums.get("is_n"):
        logged["sampling/importance_sampling_ratio/mean"] = sums["is_sum"] / sums["is_n"]
    if sums.get("gen_seconds"):
        logged["sampling/tokens_per_second"] = sums.get("gen_tokens", 0.0) / sums["gen_seconds"]
    if sums.get("skipped_batches"):
        logged["skipped_batches"] = sums["skipped_batches"]
    return logged


def mean_std(name: str, total: float, sq: float, n: float) -> dict[str, float]:
    """{name: mean, name_std: unbiased std} from a sum, a sum of squares and a count (nothing for n = 0)."""
    if n <= 0:
        return {}
    mean = total / n
    var = max(sq / n - mean * mean, 0.0) * (n / (n - 1) if n > 1 else 0.0)
    return {name: mean, f"{name}_std": math.sqrt(var)}


def finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None
