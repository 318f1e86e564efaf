"""Cross-field rules of the training variants (config/variants.py): what each needs and what it cannot join."""

from __future__ import annotations

from .errors import ConfigIssue
from .methods import method_facts
from .rules import rule
from .schema import Config

# Optimizers whose state is a plain 32-bit tensor per parameter (ReLoRA zeroes a share of its values).
_FLOAT_STATE = ("adamw_torch", "adamw_torch_fused", "adamw", "sgd", "rmsprop", "adagrad", "ademamix", "lion",
                "optimi_adamw", "optimi_adam", "optimi_lion", "optimi_radam", "optimi_stableadamw", "stable_adamw")


def _sharded(cfg: Config) -> str | None:
    return "fsdp_version / fsdp_config" if cfg.fsdp_enabled else "deepspeed" if cfg.deepspeed else None


@rule
def _lisa(cfg: Config) -> list[ConfigIssue]:
    if not (cfg.lisa_n_layers or cfg.lisa_step_interval):
        return []
    if not (cfg.lisa_n_layers and cfg.lisa_step_interval):
        missing = "lisa_step_interval" if cfg.lisa_n_layers else "lisa_n_layers"
        return [ConfigIssue(missing, "LISA needs both lisa_n_layers and lisa_step_interval; set it.")]
    if cfg.adapter:
        return [ConfigIssue("lisa_n_layers", "LISA is full fine-tuning of sampled layers; remove `adapter` (or the "
                            "lisa_* keys to train an adapter).")]
    if cfg.unfrozen_parameters:
        return [ConfigIssue("lisa_n_layers", "LISA chooses the trained layers itself; remove unfrozen_parameters.")]
    if _sharded(cfg):
        return [ConfigIssue("lisa_n_layers", f"LISA changes which layers train between steps, which {_sharded(cfg)} "
                            "sharding cannot follow; train on one GPU or data-parallel without sharding.")]
    return []


@rule
def _relora(cfg: Config) -> list[ConfigIssue]:
    if not (cfg.relora or cfg.relora_steps):
        return []
    if not cfg.relora_every():
        return [ConfigIssue("relora", "ReLoRA needs jagged_restart_steps (steps between restarts); set it.")]
    issues = []
    if cfg.adapter == "qlora" or cfg.load_in_4bit or cfg.load_in_8bit:
        issues.append(ConfigIssue("adapter", "ReLoRA merges the adapter into the base weights at every restart; into "
                                  "4- or 8-bit weights that means requantising them each time, which rounds small "
                                  "merged updates away. Use adapter: lora on 16-bit weights (bf16: true), or a plain "
                                  "QLoRA run."))
    elif cfg.adapter != "lora":
        return [ConfigIssue("relora", "ReLoRA restarts a LoRA adapter; set adapter: lora.")]
    if cfg.peft_use_dora:
        issues.append(ConfigIssue("peft_use_dora", "ReLoRA merges plain LoRA updates; DoRA's magnitude vector would "
                                  "have to restart too. Remove peft_use_dora."))
    if _sharded(cfg):
        issues.append(ConfigIssue("relora", f"ReLoRA restarts are not implemented with {_sharded(cfg)} sharding; "
                                  "train on one GPU or data-parallel without sharding."))
    if cfg.optimizer not in _FLOAT_STATE:
        issues.append(ConfigIssue("optimizer", f"ReLoRA zeroes a share of the optimizer state at each restart; "
                                  f"{cfg.optimizer} keeps it quantized or factored. Use adamw_torch_fused."))
    if cfg.merge_lora:
        issues.append(ConfigIssue("merge_lora", "a ReLoRA run already saves the merged model (base weights with every "
                                  "restart's update); remove merge_lora."))
    return issues


@rule
def _eaft(cfg: Config) -> list[ConfigIssue]:
    if cfg.use_eaft and not method_facts(cfg).supervised:
        return [ConfigIssue("use_eaft", "EAFT weights the supervised fine-tuning loss; remove it for this method.")]
    return []


@rule
def _llama4_experts(cfg: Config) -> list[ConfigIssue]:
    if not cfg.llama4_linearized_experts or not _sharded(cfg):
        return []
    if not cfg.adapter:
        return [ConfigIssue("llama4_linearized_experts", f"full fine-tuning of linearized experts under "
                            f"{_sharded(cfg)} would save the per-expert layout; train an adapter (adapter: lora) "
                            "or remove the key (full fine-tuning trains the fused experts directly).")]
    if cfg.merge_lora:
        return [ConfigIssue("merge_lora", "with linearized experts the merge runs on the whole model in one process; "
                            f"under {_sharded(cfg)} remove merge_lora and merge afterwards on one machine.")]
    return []
