"""QLoRA's 4-bit base under FSDP2: the frozen linear weights of the decoder layers become torchao NF4 tensors.

bitsandbytes' 4-bit parameters (Params4bit and their quant_state) do not survive FSDP2's `fully_shard`, which
turns every parameter into a DTensor. torchao's NF4Tensor is made for it: it implements FSDP2's
`fsdp_pre_all_gather` / `fsdp_post_all_gather` (the shards stay 4-bit, also while gathered) and `F.linear`
(dequantize, then matmul), so a plain `nn.Linear` whose weight is `nn.Parameter(to_nf4(w),
requires_grad=False)` keeps working, PEFT's LoRA layers included. Quantization follows the QLoRA paper: NF4
in blocks of 64 values, their scales quantized again in blocks of 256.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import nn

from tuneforge.errors import ModelError

log = logging.getLogger("tuneforge")

BLOCK = 64  # values per NF4 scale (QLoRA)
SCALER_BLOCK = 256  # scales per second-level (double quantization) scale
INSTALL = "pip install 'tuneforge[torchao]'"


def torchao_nf4():
    """(NF4Tensor, to_nf4) from torchao (0.18's module path, or older torchao's `torchao.dtypes.nf4tensor`)."""
    if importlib.util.find_spec("torchao") is None:
        raise ModelError("load_in_4bit with FSDP2 (fsdp_version: 2) holds the base weights as torchao NF4 tensors, "
                         f"and torchao is not installed: {INSTALL}")
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor, to_nf4
    except ImportError:
        try:
            from torchao.dtypes.nf4tensor import NF4Tensor, to_nf4
        except ImportError as exc:
            raise ModelError(f"load_in_4bit with FSDP2 needs torchao's NF4 tensors, which this torchao lacks "
                             f"({exc}); upgrade it: {INSTALL}") from None
    return NF4Tensor, to_nf4


def is_nf4(t) -> bool:
    """Whether `t` (a tensor, a Parameter or an FSDP2 DTensor shard) holds an NF4 tensor. By class name, so
    that asking never imports torchao."""
    t = getattr(t, "_local_tensor", t)
    return type(t).__name__ == "NF4Tensor" or type(getattr(t, "data", None)).__name__ == "NF4Tensor"


def nf4_bytes(t) -> int:
    """Memory an NF4 tensor (or its FSDP2 shard) takes: its packed 4-bit values and their scales."""
    t = getattr(t, "_local_tensor", t)
    inner, _ = t.__tensor_flatten__()
    return sum(getattr(t, name).untyped_storage().nbytes() for name in inner)


def quantizable(weight: torch.Tensor, shards: int) -> bool:
    """NF4 needs whole blocks of 64 values and whole blocks of 256 scales, and FSDP2 splits the rows over
    `shards` processes: each shard must hold whole blocks of both."""
    rows = weight.shape[0]
    return weight.dim() == 2 and rows % shards == 0 and weight.numel() % (BLOCK * SCALER_BLOCK * shards) == 0


def decoder_layers(model: nn.Module, names: list[str] | None) -> list[nn.Module]:
    """The decoder layers (`names`, else the model's `_no_split_modules`) whose linear layers are quantized."""
    wanted = set(names or getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in wanted]
    if not layers:
        raise ModelError("load_in_4bit with FSDP2 quantizes the linear layers of each decoder layer, and this model "
                         "does not name its decoder layer class; set fsdp_config.transformer_layer_cls_to_wrap")
    return layers


@torch.no_grad()
def quantize_decoder_linears(model: nn.Module, names: list[str] | None = None, shards: int = 1) -> int:
    """Replace the weight of every nn.Linear inside the decoder layers by a frozen NF4 tensor (embeddings and
    the LM head stay 16-bit, as in bitsandbytes' QLoRA). Returns how many were quantized; a weight whose size
    does not split into whole blocks per shard stays 16-bit (logged). Quantization runs on the GPU when there
    is one (torchao's rounding compares every value with the 16 NF4 levels: slow on CPU), the result goes back
    where the weight was."""
    _, to_nf4 = torchao_nf4()
    work = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    done, kept = 0, []
    for layer in decoder_layers(model, names):
        for name, module in layer.named_modules():
            if type(module) is not nn.Linear or is_nf4(module.weight):
                continue
            weight = module.weight
            if not quantizable(weight, shards):
                kept.append(f"{type(layer).__name__}.{name} {tuple(weight.shape)}")
                continue
            nf4 = to_nf4(weight.detach().to(work or weight.device).contiguous(), BLOCK, SCALER_BLOCK)
            module.weight = nn.Parameter(nf4.to(weight.device), requires_grad=False)
            done += 1
    if kept:
        log.debug("NF4: %d linear weight(s) stay 16-bit: their size is not a multiple of %d x %d values per "
                  "process (%d processes): %s", len(kept), BLOCK, SCALER_BLOCK, shards, ", ".join(kept))
    log.info("QLoRA under FSDP2: %d linear weights of the decoder layers held as NF4 (torchao), %d kept 16-bit",
             done, len(kept))
    return done
