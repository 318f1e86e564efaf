"""Load the base model as the config describes: source, config overrides, precision, attention,
quantization, embeddings resize, gradient checkpointing and frozen parameters.

Precision policy (documented choice):
- Full fine-tuning keeps fp32 master weights and runs forward/backward under autocast (`bf16`/`fp16`
  mixed precision through accelerate). Optimizer states are then fp32 too, which keeps small updates
  from being rounded away. `torch_dtype: bfloat16` opts into pure bf16 weights (half the memory;
  the optimizer states follow the weights' dtype). `bf16_master_weights: kahan` does the same with AdamW
  updates added through Kahan-compensated summation (torch-optimi), which keeps fp32-like accuracy.
- Adapter runs load the frozen base in the mixed-precision dtype (bf16/fp16) when it is enabled - the
  base never receives updates, so nothing is lost - while PEFT keeps the adapter weights in fp32.
- `bf16: auto` means bf16 on a CUDA GPU that supports it and fp32 elsewhere (CPU).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import re
from pathlib import Path

import torch

from tuneforge.config.methods import method_facts
from tuneforge.config.schema import Config
from tuneforge.errors import ModelError, NotSupportedYet
from tuneforge.models.tokenizer import model_source

log = logging.getLogger("tuneforge")

_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flex_attention", "varlen")


# ---------------------------------------------------------------- precision
def mixed_precision(cfg: Config) -> str:
    """'bf16', 'fp16' or 'no', from bf16/fp16 and the hardware."""
    cuda = torch.cuda.is_available()
    if cfg.fp16:
        if not cuda:
            raise ModelError("`fp16: true` needs a CUDA GPU (fp16 with loss scaling); on CPU remove it or use bf16.")
        return "fp16"
    if cfg.bf16 is True:
        if cuda and not torch.cuda.is_bf16_supported():
            raise ModelError("`bf16: true` but this GPU has no bfloat16 support; use `fp16: true` or `bf16: false`.")
        return "bf16"
    if cfg.bf16 == "auto" and cuda and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def weights_dtype(cfg: Config) -> torch.dtype:
    if cfg.bf16_master_weights == "kahan":  # bf16 weights, Kahan-compensated updates (engine/optim.py)
        return torch.bfloat16
    if cfg.torch_dtype and cfg.torch_dtype != "auto":
        return getattr(torch, cfg.torch_dtype)
    precision = mixed_precision(cfg)
    if cfg.adapter and precision != "no":
        return torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.float32


def apply_tf32(cfg: Config) -> None:
    if torch.cuda.is_available() and cfg.tf32 in (True, "auto"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# ---------------------------------------------------------------- attention
def attention_implementation(cfg: Config) -> str:
    impl = cfg.attn_implementation
    if impl is None:
        from tuneforge.models import attention

        # The fast path switches on by itself on CUDA: packed documents through a varlen kernel.
        impl = "varlen" if attention.available() else "sdpa"
    if impl == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ModelError(
            "attn_implementation: flash_attention_2 needs the flash-attn package, which is not installed. "
            "Use `attn_implementation: sdpa` (default; packed rows stay separated), `flex_attention`, "
            "`varlen` (CUDA, no extra package) or `eager`, or install flash-attn."
        )
    if impl == "varlen":
        from tuneforge.models import attention

        if not attention.available():
            raise ModelError(
                "attn_implementation: varlen needs a CUDA GPU and torch.nn.attention.varlen (torch >= 2.10); "
                "use sdpa on this machine (packed rows stay separated there too)."
            )
        return attention.register()
    return impl


# ---------------------------------------------------------------- config and classes
def auto_class(cfg: Config):
    import transformers

    name = cfg.model_type or "AutoModelForCausalLM"
    cls = getattr(transformers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ModelError(
            f"model_type `{name}` is not a transformers model class; use e.g. AutoModelForCausalLM, "
            "AutoModelForSequenceClassification or AutoModelForTokenClassification."
        )
    return cls


def load_config(cfg: Config):
    """The model config from base_model (or base_model_config), with `model_config` overrides applied."""
    from transformers import AutoConfig

    src = model_source(cfg, cfg.base_model_config or cfg.base_model)
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.model_revision and src == cfg.base_model:
        kwargs["revision"] = cfg.model_revision
    try:
        config = AutoConfig.from_pretrained(src, **kwargs)
    except Exception as exc:
        raise ModelError(_load_hint(src, exc, "base_model_config" if cfg.base_model_config else "base_model")) from None
    for key, value in (cfg.model_config_overrides or {}).items():
        current = getattr(config, key, None)
        if isinstance(current, dict) and isinstance(value, dict):
            value = {**current, **value}
        setattr(config, key, value)
    if cfg.num_labels is not None:
        config.num_labels = cfg.num_labels
    return config


def _load_hint(src: str, exc: Exception, key: str) -> str:
    if Path(src).exists():
        first = str(exc).splitlines()[0] if str(exc) else ""
        return f"could not load the model from {src} ({key}): {type(exc).__name__}: {first}"
    if src.startswith((".", "/", "~")) or src.count("/") > 1:
        return f"model folder not found: {src}. Check `{key}` (relative paths are looked up next to the config file)."
    return (
        f"could not load the model `{src}` ({key}): it is not a local folder and the hub is unreachable or has "
        f"no such repository ({type(exc).__name__}). Check the name, or download it and point {key} to the folder."
    )


# ---------------------------------------------------------------- quantization
def nf4_under_fsdp(cfg: Config) -> bool:
    """QLoRA under FSDP2: the 16-bit model loads as for LoRA, then its decoder layers' linear weights become
    torchao NF4 tensors (models/nf4.py; bitsandbytes' 4-bit parameters do not survive FSDP2's sharding)."""
    return bool(cfg.fsdp_enabled and cfg.load_in_4bit)


def quantization_config(cfg: Config):
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return None
    if nf4_under_fsdp(cfg):
        from tuneforge.models import nf4

        nf4.torchao_nf4()  # torchao missing: say so before the model loads
        return None
    key = "load_in_4bit" if cfg.load_in_4bit else "load_in_8bit"
    if not torch.cuda.is_available():
        raise ModelError(
            f"`{key}: true` needs a CUDA GPU (bitsandbytes quantized layers); on CPU remove it and use "
            "`adapter: lora` on unquantized weights."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"`{key}: true` needs the bitsandbytes package: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, **(cfg.bnb_config_kwargs or {}))
    compute = torch.bfloat16 if mixed_precision(cfg) != "fp16" else torch.float16
    options = {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": compute,
        "bnb_4bit_quant_storage": compute,
        **(cfg.bnb_config_kwargs or {}),
    }
    return BitsAndBytesConfig(**options)


# ---------------------------------------------------------------- the model
def target_device(cfg: Config) -> torch.device | None:
    """Where the weights are built or loaded: this process's GPU, so that an 8B model is never built (and
    randomly initialised) on the CPU first and then copied. None leaves the placement as it was: CPU runs,
    FSDP2 (which shards the CPU-built model itself), an explicit device_map and quantized models (which
    bring their own device_map)."""
    if not torch.cuda.is_available() or cfg.fsdp_enabled or cfg.device_map is not None:
        return None
    if cfg.load_in_4bit or cfg.load_in_8bit:
        return None
    return torch.device("cuda", torch.cuda.current_device())


def load_model(cfg: Config, tokenizer):
    """Build the model to train (before any adapter is added)."""
    import transformers

    transformers.logging.set_verbosity_error()
    cls = auto_class(cfg)
    config = load_config(cfg)
    attn = attention_implementation(cfg)
    dtype = weights_dtype(cfg)
    quant = quantization_config(cfg)
    apply_tf32(cfg)
    device = target_device(cfg)
    if cfg.reinit_weights:
        if quant is not None:
            raise ModelError("`reinit_weights: true` cannot be combined with load_in_4bit/load_in_8bit.")
        # Seeded by the caller (engine.run sets `seed` first), so the random init is reproducible. Every
        # tensor is created (and initialised) on the target device directly.
        with device or contextlib.nullcontext():
            model = cls.from_config(config, dtype=dtype, attn_implementation=attn,
                                    trust_remote_code=cfg.trust_remote_code)
        log.info("initialised %s randomly from its config (reinit_weights) on %s", type(model).__name__,
                 device or "the CPU")
    else:
        model = _from_pretrained(cfg, cls, config, attn, dtype, quant, device)
    if getattr(model.config, "output_router_logits", False) and not method_facts(cfg).router_loss:
        # Supervised fine-tuning adds the router's auxiliary loss (models/losses.py); the other objectives
        # compute their losses from hidden states too, and would leave it out silently.
        raise NotSupportedYet(
            "this mixture-of-experts model's config asks for the router load-balancing loss (output_router_logits: "
            "true), which tuneforge adds in supervised fine-tuning only. Set `model_config: {output_router_logits: "
            "false}` to train without it (transformers' default for these models).")
    if cfg.quantize_moe_experts:
        from tuneforge.models.moe_quant import quantize_for_config

        quantize_for_config(cfg, model)
    resize_embeddings(cfg, model, tokenizer)
    if nf4_under_fsdp(cfg):
        _quantize_nf4(cfg, model)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # training never reuses keys/values; a cache would also disable packing masks
    enable_gradient_checkpointing(cfg, model)
    if cfg.unfrozen_parameters:
        freeze_except(model, cfg.unfrozen_parameters)
    return model


def _quantize_nf4(cfg: Config, model) -> None:
    import torch.distributed as dist

    from tuneforge.models import nf4

    if cfg.bnb_config_kwargs:
        log.warning("bnb_config_kwargs: ignored under FSDP2, where the 4-bit base is torchao's NF4 with double "
                    "quantization (blocks of 64, scales by 256), not bitsandbytes'")
    shards = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    nf4.quantize_decoder_linears(model, cfg.fsdp_config.transformer_layer_cls_to_wrap, shards)


def _from_pretrained(cfg: Config, cls, config, attn: str, dtype, quant, device=None):
    src = model_source(cfg)
    kwargs = {
        "config": config,
        "dtype": dtype,
        "attn_implementation": attn,
        "trust_remote_code": cfg.trust_remote_code,
    }
    if cfg.model_revision:
        kwargs["revision"] = cfg.model_revision
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = cfg.device_map or {"": torch.cuda.current_device()}
    elif cfg.device_map is not None:
        kwargs["device_map"] = cfg.device_map
    elif device is not None:  # transformers builds on meta and loads each safetensors shard onto the device
        kwargs["device_map"] = {"": device}
    if cfg.low_cpu_mem_usage is not None:
        kwargs["low_cpu_mem_usage"] = cfg.low_cpu_mem_usage
    kwargs.update(cfg.model_kwargs or {})
    if Path(src).is_dir() and not _has_weights(Path(src)):
        raise ModelError(
            f"{src} has a config but no weights (*.safetensors / *.bin). Set `reinit_weights: true` to train "
            "from a random initialisation, or point base_model to a folder with weights."
        )
    try:
        return cls.from_pretrained(src, **kwargs)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(_load_hint(src, exc, "base_model")) from None


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")) or any(folder.glob("*.safetensors.index.json"))


def resize_embeddings(cfg: Config, model, tokenizer) -> bool:
    """Grow the embeddings when the tokenizer has more tokens than the model (to a multiple of 32 with
    resize_token_embeddings_to_32x), or shrink them to the tokenizer with shrink_embeddings; returns
    whether they changed. mean_resizing_embeddings chooses how transformers fills new rows."""
    if tokenizer is None or model.get_input_embeddings() is None:
        return False
    have, need = model.get_input_embeddings().weight.shape[0], len(tokenizer)
    target = -(-need // 32) * 32 if cfg.resize_token_embeddings_to_32x else need
    if not (target > have or (cfg.shrink_embeddings and target < have)):
        return False
    options = {} if cfg.mean_resizing_embeddings is None else {"mean_resizing": cfg.mean_resizing_embeddings}
    model.resize_token_embeddings(target, **options)
    log.info("resized the embeddings from %d to %d rows for %d tokens", have, target, need)
    if cfg.adapter and need > have:  # rows of real new tokens (not padding rows) must be trained
        names = {_module_name(model, model.get_input_embeddings()), _module_name(model, model.get_output_embeddings())}
        names.discard(None)
        missing = sorted(n for n in names if n not in (cfg.lora_modules_to_save or []))
        if missing:
            raise ModelError(
                f"the tokenizer gained {need - have} tokens, whose new embeddings would stay untrained under "
                f"`adapter: {cfg.adapter}`. Add `lora_modules_to_save: {sorted(names)}` (missing: {missing})."
            )
    return True


def _module_name(model, module) -> str | None:
    if module is None:
        return None
    for name, m in model.named_modules():
        if m is module:
            return name.rsplit(".", 1)[-1]
    return None


def enable_gradient_checkpointing(cfg: Config, model) -> None:
    if not cfg.gradient_checkpointing:
        return
    from tuneforge.models.selective_checkpointing import checkpoint_kwargs, limit_layers

    kwargs = checkpoint_kwargs(cfg, model)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.25 (the old name warns, goes in v6)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    limit_layers(cfg, model)


def freeze_except(model, patterns: list[str]) -> list[str]:
    """Train only parameters whose name matches one of the regexes; returns the trained names."""
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as exc:
        raise ModelError(f"unfrozen_parameters: invalid regular expression ({exc}).") from None
    trained = []
    for name, param in model.named_parameters():
        param.requires_grad = any(c.search(name) for c in compiled)
        if param.requires_grad:
            trained.append(name)
    if not trained:
        sample = ", ".join(n for n, _ in list(model.named_parameters())[:4])
        raise ModelError(f"unfrozen_parameters {patterns} match no parameter name (names look like: {sample}, ...).")
    return trained


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = trainable = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
