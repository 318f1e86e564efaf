"""FP8 training (`fp8: true`) through torchao's float8 training (`convert_to_float8_training`).

The chosen linear layers become torchao `Float8Linear`s: their matmuls (forward and both backward ones) run in
float8 with dynamic per-tensor scales, on GPUs with float8 tensor cores (compute capability 8.9: Ada, Hopper,
Blackwell). The weights stay in their 16/32-bit dtype, so checkpoints and the saved model are the usual ones.
"""

from __future__ import annotations

import logging

import torch

from tuneforge.errors import NotSupportedYet

log = logging.getLogger("tuneforge")

MIN_CAPABILITY = (8, 9)
# float8 matmuls (torch._scaled_mm) need both dimensions of the weight to be multiples of 16.
MULTIPLE = 16


def check_device() -> None:
    """FP8 matmuls need a CUDA GPU of compute capability 8.9 or newer: a property of the machine, not of the
    config, so `validate` accepts the config and training refuses here."""
    cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    if cap is None or cap < MIN_CAPABILITY:
        where = f"a GPU of compute capability {cap[0]}.{cap[1]}" if cap else "no CUDA GPU"
        raise NotSupportedYet(f"fp8: FP8 training needs an NVIDIA GPU of compute capability 8.9 or newer (Ada, "
                              f"Hopper, Blackwell); this machine has {where}. Train here with bf16: true instead of "
                              "fp8: true.")


def convertible(module: torch.nn.Module, head: torch.nn.Module | None, frozen_only: bool = False) -> bool:
    """A linear layer float8 can run: not the output head (its logits are sensitive to the rounding, and it is
    the layer torchao's recipes keep in high precision), both weight dimensions multiples of 16. With
    `frozen_only` (an adapter), only layers that train nothing: the base layers an adapter wraps, whose matmuls
    are nearly all of a LoRA step's work, while the small trained factors keep their 16-bit precision."""
    return (isinstance(module, torch.nn.Linear) and not (head is not None and _within(module, head))
            and module.in_features % MULTIPLE == 0 and module.out_features % MULTIPLE == 0
            and not (frozen_only and any(p.requires_grad for p in module.parameters())))


def _within(module: torch.nn.Module, head: torch.nn.Module) -> bool:
    """`module` is the head or part of it (the base layer of a LoRA-wrapped head)."""
    return any(module is m for m in head.modules())


def convert(model, *, fsdp_float8_all_gather: bool = False, frozen_only: bool = False) -> list[str]:
    """Swap `model`'s convertible linear layers for torchao's Float8Linear in place; returns their names. Does not
    look at the device (see `check_device`), so the swap itself can be checked anywhere. A frozen layer's float8
    backward still computes its weight gradient, which autograd then drops; compiled, that matmul is removed
    from the graph, so fp8 with an adapter pays with torch_compile."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise NotSupportedYet("fp8: needs torchao, which is not installed: pip install 'tuneforge[torchao]'") from None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    converted: list[str] = []

    def keep(module: torch.nn.Module, name: str) -> bool:
        if convertible(module, head, frozen_only):
            converted.append(name)
            return True
        return False

    config = Float8LinearConfig(enable_fsdp_float8_all_gather=fsdp_float8_all_gather)
    convert_to_float8_training(model, config=config, module_filter_fn=keep)
    return converted


def store_frozen_weights(model, names: list[str]) -> int:
    """Replace the weights of the converted frozen layers `names` by their float8 form (`fp8_frozen_weights`):
    torchao's training tensor holding the e4m3 data and the per-tensor scale, the same cast Float8Linear makes
    at every call (a frozen weight's cast never changes), made once. Float8Linear's matmuls take an
    already-cast weight as it is, so the numbers are unchanged and the 16-bit copy is freed. Returns the bytes
    saved. torchao's float8 inference weights (`quantize_`) would do the storing, but cannot be differentiated
    through, which the input's gradient needs."""
    from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import GemmInputRole

    saved = 0
    for name in names:
        layer = model.get_submodule(name)
        weight, cast = layer.weight.detach(), layer.config.cast_config_weight
        stored = hp_tensor_to_float8_dynamic(weight, cast.target_dtype, layer.linear_mm_config,
                                             gemm_input_role=GemmInputRole.WEIGHT,
                                             round_scales_to_power_of_2=layer.config.round_scales_to_power_of_2)
        saved += weight.numel() * (weight.element_size() - 1)  # float8: one byte per weight
        layer.weight = torch.nn.Parameter(stored, requires_grad=False)
    return saved


def prepare(model, *, fsdp_float8_all_gather: bool = False, compiled: bool = False,
            frozen_only: bool = False, store_frozen: bool = False) -> list[str]:
    """`fp8: true` at train time: the device check, then the conversion (`frozen_only` with an adapter; with
    `store_frozen` their weights kept in float8)."""
    check_device()
    converted = convert(model, fsdp_float8_all_gather=fsdp_float8_all_gather, frozen_only=frozen_only)
    if store_frozen:
        log.info("fp8_frozen_weights: the frozen base weights are kept in float8 (%.2f GiB less)",
                 store_frozen_weights(model, converted) / 2**30)
    log.info("fp8: %d %s with float8 matmuls%s", len(converted),
             "frozen base layers run (the adapter trains in 16 bits)" if frozen_only else "linear layers train",
             "" if compiled else " (set torch_compile: true: without it the casts cost more than float8 saves)")
    return converted
