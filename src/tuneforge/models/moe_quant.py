"""`quantize_moe_experts`: a mixture-of-experts model's fused expert weights stored in 4 (or 8) bits.

transformers keeps the experts of an MoE layer as 3-D parameters (`experts.gate_up_proj` [E, 2I, H],
`experts.down_proj` [E, H, I]), not nn.Linear, so bitsandbytes' 4-bit loading leaves them in 16 bits, and they
are most of the model's memory. Here each such parameter becomes a `torch.nn.utils.parametrize` parametrization:
`right_inverse` packs the weight once into one uint8 tensor (the only stored form), and `forward` dequantizes it
to the compute dtype whenever the experts module reads `self.gate_up_proj` — the eager per-expert loop and the
batched/grouped GEMM paths of transformers all read the weight through that attribute.

Codecs (blocks of 64 consecutive values of one expert, each with its fp32 absmax):
- NF4 (QLoRA, Dettmers et al. 2023, Appendix E): each value is the nearest of 16 normal-float levels, two codes a
  byte; 0.5625 bytes a value, 3.56x smaller than bf16. The codes equal torchao's `to_nf4` (tested).
- int8 (`load_in_8bit`): round(127 x / absmax); 1.0625 bytes a value.

Two hooks on each experts module keep the cost to one dequantization per layer and forward: while the module
runs, parametrizations are cached (`parametrize.cached()`), so the eager loop's `self.gate_up_proj[e]` per expert
dequantizes the stack once, not once per expert. Without gradient checkpointing, the tensors autograd saves for
the backward that are views of a dequantized weight are stored as a recipe instead (saved-tensor hooks), and the
backward dequantizes just the experts each one covers: the dequantized stacks of all layers are never held at
once. With gradient checkpointing the layer is recomputed in the backward anyway, one layer at a time.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

log = logging.getLogger("tuneforge")

BLOCK = 64
# The 16 NF4 levels: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero (QLoRA, Appendix E).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


@dataclass(frozen=True)
class Codec:
    """Blockwise absmax quantization of a stack [E, ...] into uint8 rows [E, row_bytes]: codes, then fp32 absmax."""

    bits: int  # 4 (NF4) or 8 (linear int8)

    def code_bytes(self, n: int) -> int:
        return n // 2 if self.bits == 4 else n

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        experts, n = w.shape[0], w[0].numel()
        rows = [self._quantize_one(w[e].reshape(n // BLOCK, BLOCK)) for e in range(experts)]  # one expert at a time
        return torch.stack(rows)

    def _quantize_one(self, blocks: torch.Tensor) -> torch.Tensor:
        blocks = blocks.float()
        absmax = blocks.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        scaled = (blocks / absmax).flatten()
        if self.bits == 4:
            levels = torch.tensor(NF4_LEVELS, device=blocks.device)
            codes = torch.bucketize(scaled, (levels[1:] + levels[:-1]) / 2).to(torch.uint8)  # the nearest level
            codes = (codes[0::2] << 4) | codes[1::2]
        else:
            codes = torch.round(scaled * 127).to(torch.int8).view(torch.uint8)
        return torch.cat([codes, absmax.flatten().view(torch.uint8)])

    def dequantize(self, packed: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """[k, row_bytes] uint8 -> [k, *shape[1:]] in dtype, a few experts at a time so that the temporaries
        (the index tensor, the looked-up values) stay small next to the result."""
        experts, n = packed.shape[0], _numel(shape[1:])
        out = torch.empty((experts, n), dtype=dtype, device=packed.device)
        table = self._table(packed.device, dtype)
        step = max(1, _CHUNK_VALUES // n)
        for first in range(0, experts, step):
            rows = packed[first:first + step]
            codes, absmax = rows[:, :self.code_bytes(n)], rows[:, self.code_bytes(n):].contiguous().view(torch.float32)
            values = table[codes.int()].view(len(rows), n // BLOCK, BLOCK)  # one byte -> its 2 (NF4) or 1 value(s)
            out[first:first + step].view(len(rows), n // BLOCK, BLOCK).copy_(values.mul_(absmax.to(dtype)[..., None]))
        return out.view(experts, *shape[1:])

    def _table(self, device, dtype) -> torch.Tensor:
        """The value(s) each byte stands for: [256, 2] for NF4 (high nibble first), [256] for int8."""
        if self.bits == 4:
            levels = torch.tensor(NF4_LEVELS, device=device, dtype=dtype)
            byte = torch.arange(256, device=device)
            return torch.stack([levels[byte >> 4], levels[byte & 15]], dim=-1)
        return torch.arange(256, device=device, dtype=torch.uint8).view(torch.int8).to(dtype) / 127


_CHUNK_VALUES = 1 << 22  # values dequantized per step (8 MiB in bf16)


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


class PackedExperts(nn.Module):
    """The parametrization: the stored tensor is the packed uint8 form, the module reads the dequantized one."""

    def __init__(self, codec: Codec, shape: tuple[int, ...], dtype: torch.dtype):
        super().__init__()
        self.codec, self.shape, self.dtype = codec, tuple(shape), dtype
        self.last_output: weakref.ref | None = None  # the latest dequantized stack (for the saved-tensor hooks)

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        out = self.codec.dequantize(packed, self.shape, self.dtype)
        self.last_output = weakref.ref(out)
        return out

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        # torch requires the stored tensor to keep its dtype, so the parameter is packed before registration
        # (uint8 passes through); assigning a float stack to the attribute later packs it here.
        return weight if weight.dtype == torch.uint8 else self.codec.quantize(weight.detach())


# ---------------------------------------------------------------- the saved-tensor recipe
@dataclass
class _Recipe:
    """A view of a dequantized stack that autograd saved: rebuilt from the packed experts it covers."""

    codec_param: PackedExperts
    packed: torch.Tensor
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    def rebuild(self) -> torch.Tensor:
        per_expert = _numel(self.codec_param.shape[1:])
        extent = sum((s - 1) * st for s, st in zip(self.size, self.stride, strict=True) if s > 0) + 1
        first, last = self.offset // per_expert, (self.offset + extent - 1) // per_expert
        part = self.codec_param.codec.dequantize(self.packed[first:last + 1], self.codec_param.shape,
                                                 self.dtype)
        return part.as_strided(self.size, self.stride, self.offset - first * per_expert)


def _pack_hook(module: nn.Module):
    def pack(t: torch.Tensor):
        for plist in module.parametrizations.values():
            p = plist[0]
            out = p.last_output() if isinstance(p, PackedExperts) and p.last_output else None
            if out is not None and t.device == out.device and t.dtype == out.dtype and \
                    t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
                return _Recipe(p, plist.original, t.dtype, tuple(t.size()), tuple(t.stride()), t.storage_offset())
        return t
    return pack


def _unpack(saved):
    return saved.rebuild() if isinstance(saved, _Recipe) else saved


class _ExpertsContext:
    """Entered before an experts module's forward, left after it (also on an exception): caches the dequantized
    stacks for the forward and, when asked, saves views of them for the backward as recipes."""

    def __init__(self, recompute: bool):
        self.recompute = recompute
        self.stack: list[list] = []  # one list of entered contexts per running forward (a module may nest)

    def enter(self, module, args):
        dtype = _compute_dtype(args[0]) if args and torch.is_tensor(args[0]) else None
        for plist in module.parametrizations.values():
            if isinstance(plist[0], PackedExperts) and dtype is not None:
                plist[0].dtype = dtype
        contexts = [parametrize.cached()]
        if self.recompute and torch.is_grad_enabled():
            contexts.append(torch.autograd.graph.saved_tensors_hooks(_pack_hook(module), _unpack))
        for c in contexts:
            c.__enter__()
        self.stack.append(contexts)

    def leave(self, module, args, output):
        for c in reversed(self.stack.pop()):
            c.__exit__(None, None, None)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the experts' matmuls run in: autocast's when it is on (the hidden states may be fp32 then, e.g.
    after PEFT's k-bit preparation upcast the norms), else the hidden states'."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype if hidden.is_floating_point() else torch.get_default_dtype()


# ---------------------------------------------------------------- the model
def expert_parameters(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, name) of every 3-D floating-point parameter of an experts module (transformers names each fused
    experts class `...Experts`; other 3-D weights, such as a Mamba layer's convolution, are left alone)."""
    found = []
    for module in model.modules():
        if "Expert" not in type(module).__name__:
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.dim() == 3 and param.is_floating_point():
                found.append((module, name))
    return found


def quantize_moe_experts(model: nn.Module, bits: int = 4, recompute_in_backward: bool = True) -> int:
    """Store every fused expert stack of `model` packed (NF4 for bits=4, int8 for bits=8); returns how many.

    The stacks are frozen (a packed weight cannot take gradient updates); LoRA on them goes through
    `lora_target_parameters`. `recompute_in_backward` (off under gradient checkpointing, which recomputes the
    layer itself) saves dequantized views for the backward as recipes, see the module docstring."""
    codec, done, modules = Codec(bits), 0, {}
    for module, name in expert_parameters(model):
        param = getattr(module, name)
        if param[0].numel() % BLOCK:
            log.warning("quantize_moe_experts: %s.%s has %d values per expert, not a multiple of %d; kept in %s",
                        type(module).__name__, name, param[0].numel(), BLOCK, param.dtype)
            continue
        packed = nn.Parameter(codec.quantize(param.detach()), requires_grad=False)
        shape, dtype = tuple(param.shape), param.dtype
        setattr(module, name, packed)  # the 16-bit stack is freed here
        del param
        parametrize.register_parametrization(module, name, PackedExperts(codec, shape, dtype), unsafe=True)
        done += 1
        modules[id(module)] = module
    for module in modules.values():
        context = _ExpertsContext(recompute_in_backward)
        module.register_forward_pre_hook(context.enter)
        module.register_forward_hook(context.leave, always_call=True)
    log.info("quantize_moe_experts: %d expert weight stacks stored in %s", done, "NF4" if bits == 4 else "int8")
    return done


def quantize_for_config(cfg, model: nn.Module) -> int:
    """`quantize_moe_experts: true`: NF4 experts (int8 with load_in_8bit); the load path's one call."""
    from tuneforge.errors import ModelError

    done = quantize_moe_experts(model, bits=8 if cfg.load_in_8bit else 4,
                                recompute_in_backward=not cfg.gradient_checkpointing)
    if not done:
        raise ModelError(f"quantize_moe_experts: true, but {type(model).__name__} has no fused expert weights (3-D "
                         "parameters of a mixture-of-experts layer) to quantize; remove quantize_moe_experts.")
    return done


def round_trip_experts(model: nn.Module, bits: int = 4) -> int:
    """Replace every fused expert stack by its quantized-then-dequantized values, in its own dtype (merge-lora of
    a quantize_moe_experts run: the values the adapter was trained against); returns how many."""
    codec, done = Codec(bits), 0
    for module, name in expert_parameters(model):
        param = getattr(module, name)
        if param[0].numel() % BLOCK == 0:
            with torch.no_grad():
                param.copy_(codec.dequantize(codec.quantize(param), tuple(param.shape), param.dtype))
            done += 1
    return done


def storage_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (packed stacks counted as stored)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
