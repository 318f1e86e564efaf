"""EBFT's feature-matching reward (Jelassi et al. 2026, "Matching Features, Not Tokens", eq. 7).

For one prompt with n sampled completions whose features are phi_1..phi_n and the ground truth's phi*:

    r_j = 2 * alignment_coef * cos(phi_j, phi*) - 2 * diversity_coef * 1/(n-1) * sum_{j' != j} phi_j . phi_j'

The first term pulls each sample's features toward the reference's; the second pushes the samples of a
group apart, so the group matches the reference's feature *distribution*, not one mode of it. Both are
computed on normalised features: L2-normalised by default, or whitened with the group's own SVD
(`use_whitening`), which makes the samples' features orthonormal when they are linearly independent.
The logged diagnostic is the conditional feature-matching loss ||mean_j phi_j - phi*||^2.
Everything here is plain tensor arithmetic on features, so it is tested in closed form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Singular values below this fraction of the largest are treated as zero when whitening (their inverse
# would amplify noise without bound).
_RANK_TOLERANCE = 1e-6


@dataclass
class GroupRewards:
    rewards: torch.Tensor  # [n]
    alignment: torch.Tensor  # [n] cos(phi_j, phi*)
    diversity: torch.Tensor  # [n] mean dot product with the other samples (0 when n = 1)
    cfm_loss: torch.Tensor  # scalar


def whiten(generated: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Map both through W = V diag(1/S) V^T, from the SVD generated = U S V^T of the group's features.

    Directions the samples do not span are dropped (W is zero there), so whitening compares the ground
    truth with the samples only inside the subspace the samples occupy."""
    _, s, vh = torch.linalg.svd(generated, full_matrices=False)
    keep = s > s.max() * _RANK_TOLERANCE
    v, inv = vh[keep].T, 1.0 / s[keep]
    w = (v * inv) @ v.T
    return generated @ w, truth @ w


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def group_rewards(generated: torch.Tensor, truth: torch.Tensor, *, alignment_coef: float = 1.0,
                  diversity_coef: float = 1.0, whitening: bool = False) -> GroupRewards:
    """Rewards of the n samples of one prompt: `generated` [n, d] features, `truth` [d]."""
    gen, ref = generated.double(), truth.double()
    gen, ref = whiten(gen, ref) if whitening else (l2_normalise(gen), l2_normalise(ref))
    n = gen.shape[0]
    alignment = torch.nn.functional.cosine_similarity(gen, ref.unsqueeze(0), dim=-1, eps=1e-12)
    if n > 1:
        dots = gen @ gen.T
        diversity = (dots.sum(dim=1) - dots.diagonal()) / (n - 1)
    else:
        diversity = torch.zeros(1, dtype=gen.dtype)
    rewards = 2.0 * alignment_coef * alignment - 2.0 * diversity_coef * diversity
    cfm = (gen.mean(dim=0) - ref).pow(2).sum()
    return GroupRewards(rewards.float(), alignment.float(), diversity.float(), cfm.float())


def batch_rewards(generated: torch.Tensor, truth: torch.Tensor, group_size: int, **coefs) -> GroupRewards:
    """`generated` [P * n, d] (each prompt's n samples together), `truth` [P, d]: one GroupRewards over all."""
    groups = [group_rewards(generated[i * group_size:(i + 1) * group_size], truth[i], **coefs)
              for i in range(truth.shape[0])]
    return GroupRewards(rewards=torch.cat([g.rewards for g in groups]),
                        alignment=torch.cat([g.alignment for g in groups]),
                        diversity=torch.cat([g.diversity for g in groups]),
                        cfm_loss=torch.stack([g.cfm_loss for g in groups]).mean())
