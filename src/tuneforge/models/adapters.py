"""LoRA / QLoRA / DoRA adapters through PEFT. No adapter configured means full fine-tuning."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tuneforge.config.schema import Config
from tuneforge.errors import ModelError

log = logging.getLogger("tuneforge")

_TASK_TYPES = {
    "AutoModelForSequenceClassification": "SEQ_CLS",
    "AutoModelForTokenClassification": "TOKEN_CLS",
}


def linear_module_names(model) -> list[str]:
    """Leaf names of every linear layer of the model except the output head (`lora_target_linear`).

    bitsandbytes' Linear4bit/Linear8bitLt subclass nn.Linear, so quantized models are covered too.
    """
    heads = [model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None]
    if type(model).__name__.endswith(("ForSequenceClassification", "ForTokenClassification")):
        # A classification head (reward models) is new and trained in full: PEFT puts it in modules_to_save.
        heads += [getattr(model, "score", None), getattr(model, "classifier", None)]
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not any(module is h for h in heads) and name:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def lora_config(cfg: Config, model):
    from peft import LoraConfig

    targets: list[str] | str | None
    listed = cfg.lora_target_modules
    if cfg.lora_target_linear:
        extra = [listed] if isinstance(listed, str) else list(listed or [])
        targets = sorted(set(linear_module_names(model)) | set(extra))
    else:
        targets = listed  # a list of names, or one regex string (PEFT matches it against full names)
    if targets is None and cfg.lora_target_parameters:
        targets = []  # parameters only (None would make PEFT pick its default modules for the architecture)
    options = {
        "r": cfg.lora_r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": targets,
        "modules_to_save": cfg.lora_modules_to_save,
        "fan_in_fan_out": cfg.lora_fan_in_fan_out,
        "use_dora": cfg.peft_use_dora,
        "use_rslora": cfg.peft_use_rslora,
        "rank_pattern": cfg.lora_rank_pattern or {},
        "alpha_pattern": cfg.lora_alpha_pattern or {},
        "layers_to_transform": cfg.peft_layers_to_transform,
        "target_parameters": cfg.lora_target_parameters,
        "bias": "none",
        "task_type": _TASK_TYPES.get(cfg.model_type or "", "CAUSAL_LM"),
    }
    if cfg.peft_init_lora_weights is not None:
        options["init_lora_weights"] = cfg.peft_init_lora_weights
    options.update(cfg.peft or {})
    try:
        return LoraConfig(**options)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"invalid LoRA settings: {exc}") from None


def apply_adapter(cfg: Config, model):
    """Wrap the model in a trainable PEFT adapter (new, or continued from lora_model_dir)."""
    if not cfg.adapter:
        if cfg.lora_mlp_kernel or cfg.lora_qkv_kernel or cfg.lora_o_kernel:
            log.warning("lora_*_kernel: ignored without `adapter: lora` (they fuse LoRA layers)")
        return model
    import peft

    if (cfg.load_in_4bit or cfg.load_in_8bit) and not cfg.fsdp_enabled:
        from tuneforge.models.selective_checkpointing import checkpoint_kwargs, limit_layers

        # bitsandbytes models only: it casts every 16-bit parameter to fp32, which would dequantize FSDP2's NF4
        # weights (models/nf4.py); FSDP2's mixed-precision policy keeps the trained shards in fp32 there.
        if upcasts_unquantized(cfg, model):
            model = peft.prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=bool(cfg.gradient_checkpointing),
                gradient_checkpointing_kwargs=checkpoint_kwargs(cfg, model),
            )
            limit_layers(cfg, model)  # the preparation checkpoints every layer again
        else:  # what the preparation does but the cast: freeze the base (checkpointing is on already)
            for param in model.parameters():
                param.requires_grad = False
    if cfg.lora_model_dir:
        model = _continue_adapter(cfg, model)
    else:
        config = lora_config(cfg, model)
        try:
            model = peft.get_peft_model(model, config)
        except ValueError as exc:
            experts = sorted({n.split("layers.", 1)[-1].split(".", 1)[-1] for n, p in model.named_parameters()
                              if p.dim() == 3})
            raise ModelError(
                f"could not add the LoRA adapter: {str(exc).splitlines()[0]}. Linear layers of this model: "
                f"{', '.join(linear_module_names(model))}; set lora_target_modules to some of them or "
                "`lora_target_linear: true`."
                + (f" Parameters lora_target_parameters can name: {', '.join(experts)}." if experts else "")
            ) from None
    if cfg.lora_mlp_kernel or cfg.lora_qkv_kernel or cfg.lora_o_kernel:
        from tuneforge.models.lora_fuse import fuse_lora

        fuse_lora(model, mlp=cfg.lora_mlp_kernel, qkv=cfg.lora_qkv_kernel, o=cfg.lora_o_kernel)
    if cfg.gradient_checkpointing:
        # With a frozen embedding the checkpointed blocks would get inputs that need no grad.
        model.enable_input_require_grads()
    trainable, total = _counts(model)
    log.info("%s adapter: %s trainable parameters of %s (%.3f%%)", cfg.adapter, f"{trainable:,}", f"{total:,}",
             100 * trainable / max(total, 1))
    return model


def upcasts_unquantized(cfg: Config, model) -> bool:
    """kbit_fp32_unquantized, or by default whether the weights bitsandbytes left unquantized are fp16."""
    if cfg.kbit_fp32_unquantized is not None:
        return cfg.kbit_fp32_unquantized
    return any(p.dtype == torch.float16 for p in model.parameters())


def _continue_adapter(cfg: Config, model):
    from peft import PeftModel

    folder = cfg.resolve_path(cfg.lora_model_dir) or cfg.lora_model_dir
    if not (Path(folder) / "adapter_config.json").exists():
        raise ModelError(
            f"lora_model_dir {cfg.lora_model_dir}: no adapter_config.json there. Point it to the folder a previous "
            "adapter run wrote (its output_dir or a checkpoint-N folder)."
        )
    try:
        model = PeftModel.from_pretrained(model, folder, is_trainable=True)
    except Exception as exc:
        raise ModelError(f"could not load the adapter from {folder}: {type(exc).__name__}: {exc}") from None
    log.info("continuing training of the adapter in %s", folder)
    return model


def _counts(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
