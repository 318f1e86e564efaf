"""Token cross-entropy for causal LMs without materialising the [B, T, V] logits tensor.

The decoder runs once and returns hidden states. Logits are then computed only at the positions that
are trained (`target_ids != -100`), a chunk of positions at a time; under autograd each chunk is
checkpointed, so its logits are recomputed in the backward pass instead of being kept. Peak memory is
one chunk of fp32 logits instead of B*T*V floats, and untrained positions (prompts, padding) cost no
head FLOPs at all.

The model gets `position_ids` and no `attention_mask`: transformers (>= 5.0, checked on 5.17 and 5.24)
derives a per-document causal mask from position ids that restart at 0 for every packed document
(`masking_utils.find_packed_sequence_indices`), for the eager, sdpa and flex implementations. That
only happens without a KV cache, so the decoder is always called with `use_cache=False`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tuneforge.models import attention

IGNORE_INDEX = -100
# Elements of fp32 logits per chunk. CPU: 64 Mi floats (256 MiB, 512 positions at a 128K vocabulary).
# CUDA: 256 Mi floats (1 GiB): every chunk adds a full-size LM-head weight gradient, so few large
# chunks cost far less memory traffic than many small ones (measured on an H200: see benchmarks.md).
_CHUNK_ELEMENTS = 1 << 26
_CHUNK_ELEMENTS_CUDA = 1 << 28


def _chunk_rows(head: LogitHead, hidden: torch.Tensor) -> int:
    elements = _CHUNK_ELEMENTS_CUDA if hidden.is_cuda else _CHUNK_ELEMENTS
    return max(256, elements // head.vocab)


def unwrap_peft(model):
    """The transformers model inside a PEFT wrapper (LoRA layers stay injected in it)."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def decoder_hidden_states(model, batch: dict) -> torch.Tensor:
    """Final hidden states [B, T, H] of the decoder stack, with per-document attention from position_ids."""
    base = unwrap_peft(model)
    extra = {}
    if getattr(base.config, "_attn_implementation", None) == attention.NAME and "cu_seqlens" in batch:
        extra = attention.varlen_kwargs(batch)  # the packed documents' boundaries, for the varlen kernel
    out = base.get_decoder()(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        use_cache=False,
        **extra,
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


class LogitHead:
    """The LM head plus the output transforms some architectures apply after it.

    transformers' *ForCausalLM.forward applies these right after `lm_head`; calling the head directly
    must reproduce them: Gemma 2/3 soft-capping, Cohere's `logit_scale`, Granite's `logits_scaling`.
    """

    def __init__(self, model):
        base = unwrap_peft(model)
        self.head = base.get_output_embeddings()
        cfg = base.config
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.softcap = getattr(text_cfg, "final_logit_softcapping", None)
        self.scale = getattr(text_cfg, "logit_scale", None)
        self.divide = getattr(text_cfg, "logits_scaling", None)
        self.vocab = self.head.weight.shape[0]

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).float()
        if self.scale is not None:
            logits = logits * self.scale
        if self.divide:
            logits = logits / self.divide
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _chunk_loss(head: LogitHead, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden), targets, reduction="sum")


def chunked_cross_entropy(head: LogitHead, hidden: torch.Tensor, targets: torch.Tensor,
                          chunk: int | None = None) -> torch.Tensor:
    """Sum of cross-entropy over rows of `hidden` [N, H] against `targets` [N] (all trained)."""
    chunk = chunk or _chunk_rows(head, hidden)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled():
            # Recompute this chunk's logits in backward instead of storing them.
            total = total + checkpoint(_chunk_loss, head, h, t, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, t)
    return total


def chunked_predictions(head: LogitHead, hidden: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """argmax token id for each row of `hidden` [N, H], chunk by chunk (no gradients)."""
    chunk = chunk or _chunk_rows(head, hidden)
    with torch.no_grad():
        parts = [head(hidden[s : s + chunk]).argmax(-1) for s in range(0, hidden.shape[0], chunk)]
    return torch.cat(parts) if parts else hidden.new_zeros((0,), dtype=torch.long)


@dataclass
class TokenLoss:
    loss_sum: torch.Tensor  # scalar fp32: sum of token cross-entropy over trained positions
    num_tokens: int  # trained positions in this batch
    mask: torch.Tensor  # [B, T] bool, trained positions
    hidden: torch.Tensor  # [N, H] hidden states at the trained positions
    head: LogitHead


def causal_lm_token_loss(model, batch: dict, chunk: int | None = None) -> TokenLoss:
    """Cross-entropy summed over `batch['target_ids'] != -100` (next-token targets, shifted per document)."""
    hidden = decoder_hidden_states(model, batch)
    targets = batch["target_ids"]
    mask = targets != IGNORE_INDEX
    selected = hidden[mask]
    head = LogitHead(model)
    loss_sum = chunked_cross_entropy(head, selected, targets[mask], chunk)
    return TokenLoss(loss_sum, int(mask.sum()), mask, selected, head)


def reference_token_loss(model, batch: dict) -> torch.Tensor:
    """The same sum computed the plain way, from the full logits of model(...): for tests only."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return F.cross_entropy(
        logits.float().flatten(0, 1), batch["target_ids"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
