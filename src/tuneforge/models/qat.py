"""Quantization-aware training (`qat:`) through torchao's QAT API.

`prepare` swaps the linear layers for torchao's fake-quantized ones (the output head and the input embedding only
with quantize_embedding, as transformers' torchao quantization keeps them 16-bit otherwise): the forward rounds
the weights (and activations) to the target format and back, so the training loss sees the quantization error,
while the weights themselves stay 16-bit and train as usual (the rounding passes the gradient straight through). `remove` swaps the plain layers back with the trained weights, so the saved model is a
normal transformers model, ready for post-training quantization with the same settings (`tuneforge.models.ptq`,
whose int formats give exactly the fake-quantized forward).

Int formats follow torchao's int8-dynamic-activation / int4-weight scheme: weights symmetric per group of
`group_size` (scale = max|w| of the group / 7.5 for int4, / 127.5 for int8; zero point 0), activations asymmetric
per token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import torch

from tuneforge.config.quantization import FIXED_GROUP, QATBlock
from tuneforge.errors import NotSupportedYet

log = logging.getLogger("tuneforge")

_INT = {"int4": torch.int4, "int8": torch.int8}


def _qat_api():
    """torchao's QAT module, or one message saying what to install."""
    try:
        import torchao.quantization.qat as qat_api
    except ImportError:
        raise NotSupportedYet("qat: needs torchao, which is not installed: pip install 'tuneforge[torchao]'") from None
    if not hasattr(qat_api, "QATConfig") or not hasattr(qat_api, "IntxFakeQuantizeConfig"):
        import torchao

        raise NotSupportedYet(f"qat: torchao {getattr(torchao, '__version__', '?')} predates its QATConfig API; "
                              "upgrade it: pip install -U 'tuneforge[torchao]'")
    return qat_api


def _newer_api(module: str, name: str):
    """A class of a recent torchao, or the message to upgrade."""
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        import torchao

        raise NotSupportedYet(f"qat: torchao {getattr(torchao, '__version__', '?')} has no {name} (this scheme needs "
                              "a newer torchao): pip install -U 'tuneforge[torchao]'") from None


def fake_quantize_configs(block: QATBlock) -> tuple[object, object | None]:
    """(weight config, activation config) of torchao's fake quantizers for the `qat:` block."""
    api = _qat_api()
    w, a = block.weight_dtype, block.activation_dtype
    if w == "nvfp4":
        config = _newer_api("torchao.prototype.qat", "NVFP4FakeQuantizeConfig")()
        return config, config
    if w == "mxfp4":
        config = _newer_api("torchao.prototype.qat", "MXFakeQuantizeConfig")(dtype=torch.float4_e2m1fn_x2,
                                                                             block_size=32)
        return config, config
    if a == "float8":
        act = api.Float8FakeQuantizeConfig()  # e4m3, one scale per row
        if w == "float8":
            return api.Float8FakeQuantizeConfig(), act
        int4 = _newer_api("torchao.quantization.qat.fake_quantize_config", "Int4WeightFakeQuantizeConfig")
        return int4(group_size=block.group_size or 128, activation_dtype=torch.float8_e4m3fn), act
    weight = api.IntxFakeQuantizeConfig(_INT[w], group_size=block.group_size, is_symmetric=True)
    act = api.IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False) if a == "int8" else None
    return weight, act


def prepare(block: QATBlock, model) -> list[str]:
    """Swap `model`'s linear layers (with quantize_embedding the output head and input embedding too) for
    fake-quantized ones, in place; returns the names of the linear layers left as they are because their input
    size is not a multiple of the group."""
    api = _qat_api()
    from torchao.quantization import quantize_

    _check_device(block)
    weight, act = fake_quantize_configs(block)
    group = FIXED_GROUP.get(block.weight_dtype, block.group_size if block.weight_dtype in _INT else None)
    skipped: list[str] = []
    head = None if block.quantize_embedding or not hasattr(model, "get_output_embeddings") else (
        model.get_output_embeddings())

    def linear(module, name: str) -> bool:
        if not isinstance(module, torch.nn.Linear) or module is head:
            return False
        if group and module.in_features % group:
            skipped.append(name)
            return False
        return True

    # torchao builds each new layer with freshly initialised weights before taking the trained ones over: that
    # must not move the random stream, or dropout and sampling would differ from the same run without qat.
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        quantize_(model, api.QATConfig(activation_config=act, weight_config=weight, step="prepare"), filter_fn=linear)
        if block.quantize_embedding:
            embedding = model.get_input_embeddings()
            quantize_(model, api.QATConfig(weight_config=weight, step="prepare"),
                      filter_fn=lambda module, _: module is embedding)
    if skipped:
        log.warning("qat: %d linear layer(s) keep full precision (input size not a multiple of group_size %d): %s",
                    len(skipped), group, ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    log.info("qat: fake quantization of %s weights%s", block.weight_dtype,
             f" and {block.activation_dtype} activations" if block.activation_dtype else " (weights only)")
    return skipped


def _check_device(block: QATBlock) -> None:
    if block.weight_dtype != "nvfp4":
        return
    cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    if cap is None or cap < (10, 0):
        where = f"a GPU of compute capability {cap[0]}.{cap[1]}" if cap else "no CUDA GPU"
        raise NotSupportedYet(f"qat: nvfp4 training runs torchao's NVFP4 kernels, which need an NVIDIA Blackwell GPU "
                              f"(compute capability 10.0 or newer); this machine has {where}. Use weight_dtype int4 "
                              "with activation_dtype int8 here, or mxfp4 (emulated).")


def quantizers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The switchable fake quantizers of `module` and its children (int and float8 formats; torchao's nvfp4/mxfp4
    layers have none)."""
    found = []
    for child in module.modules():
        for attr in ("weight_fake_quantizer", "activation_fake_quantizer"):
            quantizer = getattr(child, attr, None)
            if quantizer is not None and hasattr(quantizer, "enabled"):
                found.append(quantizer)
    return found


def switch_on_at(model, step: int, steps_done: Callable[[], int]) -> list[torch.utils.hooks.RemovableHandle]:
    """Fake quantization off until `steps_done()` (optimizer steps completed) reaches `step`, on from then. Each
    fake-quantized layer reads the count before its forward (objectives may call parts of the model, such as the
    output head, directly), so a run resumed from any checkpoint is in the state of one that never stopped."""

    def set_state(own: list[torch.nn.Module], module=None, args=None):
        on = steps_done() >= step
        for quantizer in own:
            quantizer.enabled = on

    handles = []
    for module in model.modules():
        own = [q for q in (getattr(module, a, None) for a in ("weight_fake_quantizer", "activation_fake_quantizer"))
               if q is not None and hasattr(q, "enabled")]
        if own:
            set_state(own)
            handles.append(module.register_forward_pre_hook(partial(set_state, own)))
    return handles


def remove(model) -> int:
    """Swap every fake-quantized layer back to the plain torch layer with the same (trained) weights; returns how
    many were swapped."""
    api = _qat_api()
    from torchao.quantization import quantize_

    fake = tuple(_fake_types(api))
    count = sum(isinstance(m, fake) for m in model.modules())
    quantize_(model, api.QATConfig(step="convert"), filter_fn=lambda module, _: isinstance(module, fake))
    return count


def _fake_types(api):
    yield api.FakeQuantizedLinear
    yield api.FakeQuantizedEmbedding
    try:
        from torchao.prototype.qat import MXFakeQuantizedLinear, NVFP4FakeQuantizedLinear
    except ImportError:  # an older torchao without the prototype formats
        return
    yield MXFakeQuantizedLinear
    yield NVFP4FakeQuantizedLinear
