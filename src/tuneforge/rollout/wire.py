"""What travels between the trainer and a generation server: tensors as base64 (TRL's
`/http_update_weights/` payload), the `/generate/` sampling fields, and the policy's weights under the
base model's names. Both sides import this module; neither imports the other."""

from __future__ import annotations

import base64

import torch

from .base import SamplingParams


def encode_tensor(name: str, t: torch.Tensor) -> dict:
    t = t.detach().to("cpu").contiguous()
    raw = t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
    return {"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "data": base64.b64encode(raw).decode()}


def decode_tensor(item: dict) -> tuple[str, torch.Tensor]:
    dtype = getattr(torch, item["dtype"])
    raw = bytearray(base64.b64decode(item["data"]))
    t = torch.frombuffer(raw, dtype=torch.uint8 if dtype == torch.bfloat16 else dtype)
    return item["name"], (t.view(torch.bfloat16) if dtype == torch.bfloat16 else t).reshape(item["shape"])


def sampling_params(p: dict) -> SamplingParams:
    """The /generate/ payload's sampling fields (TRL's names and defaults; top_k -1 = off); the other
    `generation_kwargs` travel on to vLLM's SamplingParams."""
    extra = dict(p.get("generation_kwargs") or {})
    stops = extra.pop("stop_token_ids", None) or []
    return SamplingParams(temperature=float(p.get("temperature", 1.0)), top_p=float(p.get("top_p", 1.0)),
                          top_k=max(int(p.get("top_k", -1)), 0), min_p=float(p.get("min_p", 0.0)),
                          repetition_penalty=float(p.get("repetition_penalty", 1.0)),
                          max_tokens=int(p.get("max_tokens", 16)), stop_token_ids=tuple(stops), extra=extra)


def merged_weights(model) -> dict[str, torch.Tensor]:
    """The policy's weights under the base model's parameter names, LoRA deltas folded in (W + s B A),
    computed as new tensors: the training model is never merged in place."""
    if not (hasattr(model, "peft_config") and hasattr(model, "get_base_model")):
        return {k: v for k, v in model.state_dict().items()}
    base = model.get_base_model()
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for mod_name, module in base.named_modules():
            if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):
                weight = module.base_layer.weight
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
                out[f"{mod_name}.weight"] = weight + delta
                if getattr(module.base_layer, "bias", None) is not None:
                    out[f"{mod_name}.bias"] = module.base_layer.bias
        for name, t in base.state_dict().items():
            if "lora_" in name or ".base_layer." in name:
                continue
            out.setdefault(name.replace(".modules_to_save.default", "").replace(".original_module", ""), t)
    return out
