"""EBFT strided mode, the rollout of one document: generate every block, score it, compute advantages.

    generate_blocks   n samples of the document; all blocks generated together, one token per block per
                      step, with a KV cache (the document is encoded once, then each step feeds the
                      num_blocks new tokens of every sample, under the block mask's rows for them)
    score_blocks      the frozen feature network over the whole sequence (same mask): each feature layer
                      L2-normalised, then concatenated; block j's generated features pooled over its
                      tokens, its ground truth's over x[a_j : a_j + gen_len] (plain causal document
                      states); the rewards of eq. 7 per block across the n samples (reward.batch_rewards)
    advantages        across the n samples of each block: rloo, group_norm or reinforce

Masks: `attention_mask` picks the form the model's attention implementation takes (blocks.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tuneforge.models.losses import unwrap_peft
from tuneforge.rollout.base import SamplingParams
from tuneforge.rollout.sampling import sample_next

from .blocks import StridedLayout
from .features import body_of, hidden_features
from .reward import batch_rewards

GROUP_NORM_EPS = 1e-8


def attention_mask(model, layout: StridedLayout, device, length: int | None = None, queries: slice | None = None):
    """The block mask in the form the model's attention takes: a flex BlockMask for a whole-sequence
    forward with flex_attention, a boolean [1, 1, q, k] mask for sdpa, an additive fp32 one otherwise
    (eager adds it to the scores; flex with a KV cache adds it as a score modifier)."""
    impl = getattr(unwrap_peft(model).config, "_attn_implementation", None)
    if impl == "flex_attention" and length is None and queries is None:
        return layout.block_mask(device)
    if impl == "sdpa":
        return layout.allowed(length, queries).to(device)[None, None]
    return layout.additive_mask(torch.float32, device, length, queries)


@contextlib.contextmanager
def cached_decoding(model) -> Iterator[None]:
    """sdpa instead of flex attention while generating: each decode step has another key length, which
    would compile another flex kernel (and its tensor-mask path indexes the mask per batch row)."""
    net = unwrap_peft(model)
    impl = getattr(net.config, "_attn_implementation", None)
    if impl != "flex_attention":
        yield
        return
    net.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        net.set_attn_implementation(impl)


def hidden_states(model, layout: StridedLayout, tokens: torch.Tensor) -> torch.Tensor:
    """Final hidden states [n, T, H] of the transformer body over whole strided sequences (gradients
    flow when enabled: the policy's loss forward)."""
    out = body_of(model)(input_ids=tokens, attention_mask=attention_mask(model, layout, tokens.device),
                         position_ids=layout.position_ids.to(tokens.device).expand(tokens.shape[0], -1),
                         use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@torch.no_grad()
def generate_blocks(model, head, layout: StridedLayout, doc: torch.Tensor, n: int,
                    params: SamplingParams) -> torch.Tensor:
    """[n, T]: the document repeated n times followed by its sampled blocks (step-major, blocks.py).

    `head` maps hidden states to fp32 logits (models.losses.LogitHead). Call with the model in eval mode
    (gradient checkpointing would turn the KV cache off)."""
    with cached_decoding(model):
        return _generate(model, head, layout, doc, n, params)


def _generate(model, head, layout: StridedLayout, doc: torch.Tensor, n: int, params: SamplingParams) -> torch.Tensor:
    from transformers import DynamicCache

    from tuneforge.rollout.embedded import cache_kwargs

    device, S, nb = doc.device, layout.doc_len, layout.num_blocks
    body = body_of(model)
    cache = cache_kwargs(body, DynamicCache())  # this transformers release's keyword for it
    positions = layout.position_ids.to(device)
    seq = doc.unsqueeze(0).expand(n, -1)
    out = body(input_ids=seq, attention_mask=attention_mask(model, layout, device, length=S, queries=slice(0, S)),
               position_ids=positions[:S].expand(n, -1), **cache, use_cache=True)
    # step 0 of block j continues the document from its anchor: the logits at a_j - 1
    last = out.last_hidden_state[:, layout.predictors[:, 0].to(device)]  # [n, nb, H]
    steps = []
    for s in range(layout.gen_len):
        token, _ = sample_next(head(last.reshape(n * nb, -1)), params)
        steps.append(token.view(n, nb))
        if s == layout.gen_len - 1:
            break
        start = S + s * nb  # this step's tokens sit at [start, start + nb)
        rows = slice(start, start + nb)
        out = body(input_ids=steps[-1], attention_mask=attention_mask(model, layout, device, start + nb, rows),
                   position_ids=positions[rows].expand(n, -1), **cache, use_cache=True)
        last = out.last_hidden_state
    return torch.cat([seq, *steps], dim=1)


def per_layer_normalised(features: torch.Tensor, num_layers: int) -> torch.Tensor:
    """[..., k*H] -> each of the k layers' H-slices L2-normalised, concatenated back (so that no layer's
    scale dominates the feature vector)."""
    parts = features.unflatten(-1, (num_layers, -1))
    return torch.nn.functional.normalize(parts, dim=-1, eps=1e-12).flatten(-2)


def pool_blocks(features: torch.Tensor, method: str) -> torch.Tensor:
    """[..., gen_len, D] -> [..., D]: the last token's features, or the mean over the block's tokens."""
    return features.mean(dim=-2) if method == "mean_pooling" else features[..., -1, :]


@dataclass
class BlockScores:
    rewards: torch.Tensor  # [n, num_blocks]
    alignment: torch.Tensor  # [n, num_blocks]
    diversity: torch.Tensor  # [n, num_blocks]
    cfm_sum: float  # sum over the blocks of ||mean_j phi_j - phi*||^2


@torch.no_grad()
def score_blocks(feature_net, layout: StridedLayout, tokens: torch.Tensor, layers: list[int], pooling: str,
                 **coefs) -> BlockScores:
    """Rewards of every sample's every block (reward.batch_rewards, one group per block)."""
    device = tokens.device
    feats = hidden_features(feature_net, tokens, attention_mask(feature_net, layout, device), layers,
                            position_ids=layout.position_ids.to(device).expand(tokens.shape[0], -1))
    feats = per_layer_normalised(feats, len(layers))
    n, nb = tokens.shape[0], layout.num_blocks
    generated = pool_blocks(feats[:, layout.slots.to(device)], pooling)  # [n, nb, D]
    truth = pool_blocks(feats[0, layout.truth.to(device)], pooling)  # [nb, D]: the document's own states
    scores = batch_rewards(generated.transpose(0, 1).reshape(nb * n, -1), truth, n, **coefs)

    def per_sample(x: torch.Tensor) -> torch.Tensor:
        return x.view(nb, n).T.to(device)

    return BlockScores(per_sample(scores.rewards), per_sample(scores.alignment), per_sample(scores.diversity),
                       float(scores.cfm_loss) * nb)


def advantages(rewards: torch.Tensor, estimator: str) -> torch.Tensor:
    """[n, num_blocks] advantages across the n samples (dim 0) of each block.

    rloo: r_j - mean of the other samples' rewards; group_norm: (r - mean) / (unbiased std + 1e-8);
    reinforce: r itself (the only choice with one sample)."""
    n = rewards.shape[0]
    if estimator == "reinforce" or n == 1:
        return rewards
    mean = rewards.mean(dim=0, keepdim=True)
    if estimator == "rloo":
        return (rewards * n - rewards.sum(dim=0, keepdim=True)) / (n - 1)
    if estimator == "group_norm":
        return (rewards - mean) / (rewards.std(dim=0, keepdim=True) + GROUP_NORM_EPS)
    raise ValueError(f"unknown advantage estimator {estimator!r}")
