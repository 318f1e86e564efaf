"""Exact parameter counts without loading weights: the model is built from its config on the meta device
(no memory, no download), and the LoRA adapter is applied the way the trainer applies it
(`models.adapters.lora_config`, then PEFT). Parameter dtypes are those the trainer would give them."""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.config.schema import Config
from tuneforge.errors import ModelError

from .coefficients import BITSANDBYTES

SHAPES_DIR = Path(__file__).parent / "shapes"


def shape_names() -> list[str]:
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json"))


@dataclass
class Architecture:
    """The numbers of the decoder that decide activation and cache sizes."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim


@dataclass
class ParamGroup:
    """Parameters of one kind: element count and bytes as stored."""

    count: int = 0
    bytes: int = 0

    def add(self, n: int, size: float) -> None:
        self.count += n
        self.bytes += int(n * size)


@dataclass
class ModelFacts:
    arch: Architecture
    trainable: ParamGroup
    frozen: ParamGroup
    layer_bytes: int  # one decoder layer's parameters as stored (what FSDP gathers for it)
    root_bytes: int  # parameters outside the decoder layers (embeddings, final norm, head)
    matmul_params: int  # weights of the decoder layers' linear layers: autocast casts these
    head_trainable: bool
    head_bytes_per_element: int
    trainable_bytes_per_element: float  # gradients and optimizer states follow this
    # (name, in_features, rank) of the adapted linear layers of the most-adapted decoder layer
    adapted: list[tuple[str, int, int]] = field(default_factory=list)
    quantized: str | None = None  # "nf4" / "int8" / "float8"
    lm_head: bool = True  # False for classification heads (reward models): no logits over the vocabulary

    @property
    def total(self) -> int:
        return self.trainable.count + self.frozen.count

    @property
    def weight_bytes(self) -> int:
        return self.trainable.bytes + self.frozen.bytes


# ---------------------------------------------------------------- the model config
def model_config(cfg: Config, override: str | None = None):
    """The transformers config: from `override` (a shipped shape name or a config.json path), else from
    base_model / base_model_config like training does (local folder or the local HF cache)."""
    if override is None:
        from tuneforge.models.load import load_config

        return load_config(cfg)
    path = SHAPES_DIR / f"{override}.json" if (SHAPES_DIR / f"{override}.json").is_file() else Path(override)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ModelError(f"--model-config {override}: neither a config.json file nor a shipped shape "
                         f"({', '.join(shape_names())})")
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise ModelError(f"--model-config {path}: not valid JSON ({exc})") from None
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(raw.pop("model_type", "llama"), **raw)
    except Exception as exc:
        raise ModelError(f"--model-config {path}: not a transformers model config ({exc})") from None


def architecture(config) -> Architecture:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return Architecture(
        hidden=hidden, intermediate=getattr(text, "intermediate_size", None) or 4 * hidden,
        layers=text.num_hidden_layers, heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=head_dim, vocab=text.vocab_size, tied=bool(getattr(config, "tie_word_embeddings", False)))


# ---------------------------------------------------------------- counting
def build_meta(cfg: Config, config, dtype):
    """The model on the meta device, with the LoRA adapter when the config asks for one."""
    import torch
    import transformers

    from tuneforge.models.load import auto_class

    transformers.logging.set_verbosity_error()
    with _quiet(), torch.device("meta"):
        model = auto_class(cfg).from_config(config, dtype=dtype, attn_implementation="sdpa",
                                            trust_remote_code=cfg.trust_remote_code)
        if cfg.unfrozen_parameters and not cfg.adapter:
            from tuneforge.models.load import freeze_except

            freeze_except(model, cfg.unfrozen_parameters)
        if cfg.adapter:
            import peft

            from tuneforge.models.adapters import lora_config

            model = peft.get_peft_model(model, lora_config(cfg, model))
    return model


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _decoder_layers(model):
    from tuneforge.models.losses import unwrap_peft

    base = unwrap_peft(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    layers = getattr(decoder, "layers", None)
    if layers is None:
        layers = getattr(getattr(base, "model", base), "layers", None)
    if layers is None:
        raise ModelError(f"the planner needs a decoder with a `layers` list; {type(base).__name__} has none")
    return base, layers


def count(cfg: Config, config, weights_dtype, quantized: str | None, upcast: bool = True) -> ModelFacts:
    """Exact counts and bytes of the model the trainer would build (quantization applied analytically:
    bitsandbytes cannot run on the meta device). `upcast`: bitsandbytes' preparation casts every other weight to
    fp32; FSDP2's NF4 base (torchao) leaves them in the weights' dtype."""
    import torch

    try:
        model = build_meta(cfg, config, weights_dtype)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"the memory planner could not build {type(config).__name__} on the meta device: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    base, layers = _decoder_layers(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    head_weight = getattr(head, "weight", None)
    layer_ids = {id(p) for p in layers.parameters()}
    quant_ids = _quantizable(layers) if quantized else set()
    # PEFT's LoRA factors are linear layers too; only the base weights count here.
    matmul = sum(m.weight.numel() for n, m in layers.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lora_" not in n)
    trainable, frozen = ParamGroup(), ParamGroup()
    layer_bytes = root_bytes = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        size = _element_bytes(p, id(p) in quant_ids, quantized, upcast)
        (trainable if p.requires_grad else frozen).add(p.numel(), size)
        if id(p) in layer_ids:
            layer_bytes += int(p.numel() * size)
        else:
            root_bytes += int(p.numel() * size)
    per_layer = layer_bytes // max(len(layers), 1)
    train_sizes = [p.element_size() for p in model.parameters() if p.requires_grad]
    head_bytes = head_weight.element_size() if head_weight is not None else 2
    if quantized in BITSANDBYTES and upcast and head_weight is not None:
        head_bytes = 4  # prepare_model_for_kbit_training upcasts every non-quantized parameter to fp32
    return ModelFacts(
        arch=architecture(config), trainable=trainable, frozen=frozen, layer_bytes=per_layer, root_bytes=root_bytes,
        matmul_params=matmul,
        head_trainable=bool(head_weight is not None and head_weight.requires_grad), head_bytes_per_element=head_bytes,
        trainable_bytes_per_element=(sum(train_sizes) / len(train_sizes)) if train_sizes else 4.0,
        adapted=max((_adapted(layer) for layer in layers), key=len, default=[]) if cfg.adapter else [],
        quantized=quantized, lm_head=head_weight is not None)


def _quantizable(layers) -> set[int]:
    """Frozen linear weights of the decoder layers: what bitsandbytes quantizes and fp8_frozen_weights keeps in
    float8 (the head stays 16-bit)."""
    import torch

    ids = set()
    for module in layers.modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad and module.weight.dim() == 2:
            ids.add(id(module.weight))
    return ids


def _element_bytes(p, quantize: bool, quantized: str | None, upcast: bool = True) -> float:
    from . import coefficients as k

    if quantize and quantized == "nf4":
        absmax = 1 / k.NF4_BLOCK + 4 / (k.NF4_BLOCK * k.NF4_DOUBLE_QUANT_BLOCK)  # 8-bit absmax + fp32 per 256
        return k.NF4_BITS / 8 + absmax
    if quantize and quantized == "int8":
        return 1 + k.INT8_ROW_SCALE_BYTES / p.shape[1]
    if quantize and quantized == "float8":
        return 1  # fp8_frozen_weights: e4m3, one scale per tensor
    if quantized in BITSANDBYTES and upcast and not p.requires_grad:
        return 4  # prepare_model_for_kbit_training: norms, embeddings and the head in fp32
    return p.element_size()


def _adapted(layer) -> list[tuple[str, int, int]]:
    """(name, in_features, rank) of every LoRA-adapted linear layer of one decoder layer."""
    out = []
    for name, module in layer.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or not len(lora_a):
            continue
        first = next(iter(lora_a.values()))
        out.append((name, int(first.in_features), int(first.out_features)))
    return out
