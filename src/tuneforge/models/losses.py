"""Token cross-entropy for causal LMs without materialising the [B, T, V] logits tensor.

The decoder runs once and returns hidden states. Logits are then computed only at the positions that
are trained (`target_ids != -100`), a chunk of positions at a time; under autograd each chunk is
checkpointed, so its logits are recomputed in the backward pass instead of being kept. Peak memory is
one chunk of fp32 logits instead of B*T*V floats, and untrained positions (prompts, padding) cost no
head FLOPs at all.

For a plain linear head (the common case) the chunks go through `LinearCrossEntropy` instead: each
chunk's logits are turned into the loss *and* the gradients of the hidden states and the head weight
right away, in the forward pass, and the logits are dropped. Backward then only scales the stored
gradients. That saves the recomputed head matmul (a quarter of the head's FLOPs, and the head is a
fifth of a 1B model's) and several passes over fp32 logits. With `torch_compile` the per-chunk
softmax-and-gradient step is compiled into a couple of fused kernels (`compile_loss`).

The model gets `position_ids` and no `attention_mask`: transformers (>= 5.0, checked on 5.17 and 5.24)
derives a per-document causal mask from position ids that restart at 0 for every packed document
(`masking_utils.find_packed_sequence_indices`), for the eager, sdpa and flex implementations. That
only happens without a KV cache, so the decoder is always called with `use_cache=False`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from tuneforge.errors import NotSupportedYet
from tuneforge.models import attention
from tuneforge.models.logprobs import chunk_rows, token_logps

log = logging.getLogger("tuneforge")

IGNORE_INDEX = -100


def _chunk_rows(head: LogitHead, hidden: torch.Tensor) -> int:
    return chunk_rows(head.vocab, hidden)


def unwrap_peft(model):
    """The transformers model inside a PEFT wrapper (LoRA layers stay injected in it)."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def decoder_hidden_states(model, batch: dict) -> torch.Tensor:
    """Final hidden states [B, T, H] of the decoder stack, with per-document attention from position_ids."""
    return decoder_forward(model, batch)[0]


def decoder_forward(model, batch: dict, router_logits: bool = False) -> tuple[torch.Tensor, tuple | None]:
    """(final hidden states [B, T, H], and with `router_logits` each MoE layer's router logits [B*T, experts])."""
    base = unwrap_peft(model)
    extra = {"output_router_logits": True} if router_logits else {}
    if getattr(base.config, "_attn_implementation", None) == attention.NAME and "cu_seqlens" in batch:
        extra |= attention.varlen_kwargs(batch)  # the packed documents' boundaries, for the varlen kernel
    decoder = base.get_decoder()
    if decoder is base and isinstance(getattr(base, "model", None), torch.nn.Module):
        decoder = base.model  # Llama4ForCausalLM's get_decoder() returns the model itself (transformers 5)
    outputs = decoder(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        use_cache=False,
        **extra,
    )
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    return hidden, outputs.router_logits if router_logits else None


class RouterBalance:
    """The auxiliary load-balancing loss of a mixture-of-experts model whose config sets output_router_logits
    (Switch Transformer's, eqs. 4-6), computed by the model module's own `load_balancing_loss_func` as its
    forward does; transformers adds it to the loss there, weighted by `router_aux_loss_coef`."""

    def __init__(self, model):
        import sys

        base = unwrap_peft(model)
        cfg = base.config
        self.loss = getattr(sys.modules[type(base).__module__], "load_balancing_loss_func", None)
        if self.loss is None:
            raise NotSupportedYet(f"{type(base).__name__} has no load_balancing_loss_func for output_router_logits; "
                                  "set `model_config: {output_router_logits: false}`.")
        self.coef = float(cfg.router_aux_loss_coef)
        self.experts = getattr(cfg, "num_experts", None) or cfg.num_local_experts
        self.top_k = cfg.num_experts_per_tok

    @staticmethod
    def wanted(model) -> bool:
        return bool(getattr(unwrap_peft(model).config, "output_router_logits", False))

    def __call__(self, router_logits: tuple, real: torch.Tensor | None) -> torch.Tensor:
        """The loss over the tokens where `real` [B, T] is True (not padding)."""
        return self.loss(router_logits, self.experts, self.top_k, real)


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

    @property
    def fusable(self) -> bool:
        """A plain bias-free linear layer with no output transform: `LinearCrossEntropy` applies."""
        plain = type(self.head) is torch.nn.Linear and self.head.bias is None
        return plain and self.scale is None and not self.divide and not self.softcap

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).float()
        if self.scale is not None:
            logits = logits * self.scale
        if self.divide:
            logits = logits / self.divide
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _ce_and_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cross-entropy, d loss / d logits in the logits' dtype) for logits [n, V], in fp32 inside."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    loss = (lse.squeeze(-1) - x.gather(-1, targets.unsqueeze(-1)).squeeze(-1)).sum()
    grad = torch.exp(x - lse)
    grad = grad.scatter_add(-1, targets.unsqueeze(-1), -torch.ones_like(lse))
    return loss, grad.to(logits.dtype)


_ce_step = _ce_and_grad  # replaced by a compiled version through compile_loss()


def compile_loss(**compile_kwargs) -> None:
    """Use a torch.compile'd softmax-and-gradient step in `LinearCrossEntropy` (CUDA, `torch_compile`)."""
    global _ce_step
    _ce_step = torch.compile(_ce_and_grad, dynamic=True, **compile_kwargs)


_fp32_out_gemm: dict[torch.device, bool] = {}  # per device: addmm with out_dtype works in place (probed once)


def accumulate_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, with acc fp32 and a, b 16-bit. On CUDA one GEMM does it (cuBLAS with beta=1 and an fp32
    output: `addmm(..., out_dtype=float32)`), accumulating in fp32 throughout, where `acc += a @ b` rounds
    each product to 16 bits and then reads and writes the fp32 sum again (for the LM head's weight gradient,
    vocabulary x hidden: a gigabyte-sized pass per loss chunk)."""
    if acc.is_cuda and a.dtype != acc.dtype and _in_place_fp32_gemm(acc.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc += a @ b


def _in_place_fp32_gemm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch's addmm takes out_dtype with its output aliasing its input, checked on small
    matrices against the two-pass result (an older torch raises; a wrong result would be caught here)."""
    if device not in _fp32_out_gemm:
        gen = torch.Generator(device=device).manual_seed(0)
        acc = torch.randn(64, 32, device=device, generator=gen)
        a = torch.randn(64, 48, device=device, generator=gen).to(dtype)
        b = torch.randn(48, 32, device=device, generator=gen).to(dtype)
        want = acc + a.float() @ b.float()
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            works = torch.allclose(acc, want, rtol=1e-4, atol=1e-3)
        except (TypeError, RuntimeError, NotImplementedError) as exc:
            log.debug("addmm with out_dtype is unavailable here (%s): two passes", exc)
            works = False
        _fp32_out_gemm[device] = works
    return _fp32_out_gemm[device]


class LinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy of `hidden @ weight.T` against `targets`, gradients computed in forward.

    Under autocast the matmuls run in the autocast dtype (as `nn.Linear` would) and the softmax in
    fp32; the weight gradient is accumulated in fp32 across chunks.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            total = hidden.new_zeros((), dtype=torch.float32)
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start : start + chunk].to(dtype)
                loss, g = _ce_step(h @ w.T, targets[start : start + chunk])
                total += loss
                if need_h:
                    grad_h[start : start + chunk] = g @ w
                if need_w:
                    accumulate_matmul(grad_w, g.T, h)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need_w else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_out if grad_h is not None else None,
                grad_w * grad_out if grad_w is not None else None, None, None)


def chunked_cross_entropy(head: LogitHead, hidden: torch.Tensor, targets: torch.Tensor,
                          chunk: int | None = None) -> torch.Tensor:
    """Sum of cross-entropy over rows of `hidden` [N, H] against `targets` [N] (all trained)."""
    chunk = chunk or _chunk_rows(head, hidden)
    if getattr(head, "fusable", False) and torch.is_grad_enabled() and (hidden.requires_grad or head.head.weight.requires_grad):
        return LinearCrossEntropy.apply(hidden, head.head.weight, targets, chunk)
    # Other heads (soft-capping, scaled logits, biases): the shared checkpointed log-prob chunks.
    return -token_logps(head, hidden, targets, chunk=chunk).sum()


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
    router: torch.Tensor | None = None  # MoE with output_router_logits: the load-balancing loss of this batch
    router_coef: float = 0.0  # its weight in the loss (router_aux_loss_coef)


def causal_lm_token_loss(model, batch: dict, chunk: int | None = None, loss_fn=None) -> TokenLoss:
    """Cross-entropy summed over `batch['target_ids'] != -100` (next-token targets, shifted per document),
    and the router's load-balancing loss where the model's config asks for it. `loss_fn` replaces
    `chunked_cross_entropy` (same arguments), e.g. EAFT's weighted cross-entropy (models/eaft.py)."""
    balance = RouterBalance(model) if RouterBalance.wanted(model) else None
    hidden, routers = decoder_forward(model, batch, router_logits=balance is not None)
    targets = batch["target_ids"]
    mask = targets != IGNORE_INDEX
    selected = hidden[mask]
    head = LogitHead(model)
    loss_sum = (loss_fn or chunked_cross_entropy)(head, selected, targets[mask], chunk)
    if balance is None:
        return TokenLoss(loss_sum, int(mask.sum()), mask, selected, head)
    router = balance(routers, batch.get("real_tokens"))
    return TokenLoss(loss_sum, int(mask.sum()), mask, selected, head, router, balance.coef)
