"""Optimisation, schedule, evaluation and checkpoint keys."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from .base import Section

Optimizer = Literal[
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "adamw_bnb_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "adamw",
    "sgd",
    "adafactor",
    "lion_8bit",
    "lion_32bit",
    "paged_lion_8bit",
    # engine/optim.py builds these (optional packages in brackets): rmsprop, adagrad, ademamix and muon are
    # torch's or ours; adamw_torch_8bit/4bit, ao_* [torchao], schedule_free_* [schedulefree], optimi_* and
    # stable_adamw [torch-optimi], lion [lion-pytorch], *ademamix_8bit/32bit [bitsandbytes].
    "rmsprop", "adagrad", "ademamix", "muon",
    "adamw_torch_8bit", "adamw_torch_4bit", "ao_adamw_8bit", "ao_adamw_4bit", "ao_adamw_fp8",
    "schedule_free_adamw", "schedule_free_radam", "schedule_free_sgd",
    "optimi_adamw", "optimi_adam", "optimi_lion", "optimi_radam", "optimi_ranger", "optimi_sgd",
    "optimi_stableadamw", "optimi_adan", "stable_adamw", "lion",
    "ademamix_8bit", "paged_ademamix_8bit", "paged_ademamix_32bit",
]
Scheduler = Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_min_lr",
                    "rex", "warmup_stable_decay", "inverse_sqrt", "polynomial", "cosine_with_restarts"]


class DynamicCheckpoint(Section):
    enabled: bool = Field(False, description="Save a checkpoint when the trigger file appears in output_dir.")
    check_interval: int = Field(10, ge=1, description="Look for the trigger file every this many steps.")
    trigger_file_path: str = Field(
        "", description="The trigger file's name in output_dir (default: axolotl_checkpoint.save, Axolotl's)."
    )

    @field_validator("trigger_file_path")
    @classmethod
    def _a_name(cls, value: str) -> str:
        if "/" in value or "\\" in value:
            raise ValueError("give a file name (it is looked for in output_dir), not a path")
        return value


class LRGroup(Section):
    name: str = Field(description="A label for the group (used in messages).")
    modules: list[str] = Field(description="Parameter-name fragments: a trainable parameter whose name contains "
                               "one of them trains at this group's lr (the first matching group wins).")
    lr: float = Field(gt=0, description="The group's peak learning rate (the schedule scales it like the others).")


class TrainingKeys(Section):
    micro_batch_size: int = Field(1, ge=1, description="Rows (or packed rows) per device per forward pass.")
    gradient_accumulation_steps: int | None = Field(
        None, ge=1, description="Micro-batches per optimizer step (default 1; exclusive with batch_size)."
    )
    batch_size: int | None = Field(
        None, ge=1, description="Rows per optimizer step per device; sets gradient_accumulation_steps."
    )
    eval_batch_size: int | None = Field(None, ge=1, description="Rows per evaluation batch (default: micro_batch_size).")
    num_epochs: float = Field(1.0, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides num_epochs).")
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate.")
    bf16_master_weights: Literal["fp32", "kahan"] | None = Field(
        None, description="Full fine-tuning's master weights. fp32 (default): fp32 weights and optimizer states "
        "under bf16 autocast. kahan: the weights stay bf16 (no fp32 copy: 10 instead of 16 bytes per parameter "
        "with AdamW) and torch-optimi's AdamW adds each update with Kahan-compensated summation, so updates "
        "smaller than bf16's resolution are not lost; needs optimizer adamw_torch, adamw_torch_fused or "
        "optimi_adamw and no adapter.")
    optimizer: Optimizer = Field(
        "adamw_torch_fused",
        description="Optimizer: adamw_torch, adamw_torch_fused, sgd, rmsprop, adagrad, adafactor, ademamix, muon "
        "(hidden matrices; AdamW for the rest); adamw_8bit / paged_adamw_8bit / lion_8bit / lion_32bit / "
        "ademamix_8bit (bitsandbytes); adamw_torch_8bit / adamw_torch_4bit / ao_adamw_fp8 (torchao); "
        "schedule_free_adamw / _radam / _sgd (schedulefree); optimi_adamw, optimi_lion, ... and stable_adamw "
        "(torch-optimi); lion (lion-pytorch).",
    )
    optim_args: dict[str, Any] | None = Field(None, description="Extra keyword arguments for the optimizer.")
    lr_groups: list[LRGroup] | None = Field(
        None, description="Per-module learning rates: [{name, modules: [name fragments], lr}]."
    )
    embedding_lr: float | None = Field(None, gt=0, description="Learning rate of embedding layers' weights.")
    embedding_lr_scale: float | None = Field(
        None, gt=0, description="Embedding layers train at learning_rate x this (exclusive with embedding_lr)."
    )
    lr_scheduler: Scheduler = Field(
        "cosine", description="Learning-rate schedule after warmup: cosine, cosine_with_min_lr, linear, constant, "
        "constant_with_warmup, rex, warmup_stable_decay (lr_scheduler_kwargs num_decay_steps / num_stable_steps, "
        "decay_type, min_lr_ratio), inverse_sqrt, polynomial (power, lr_end), cosine_with_restarts (num_cycles).")
    lr_scheduler_kwargs: dict[str, Any] | None = Field(None, description="Extra scheduler options.")
    cosine_min_lr_ratio: float | None = Field(
        None, ge=0.0, le=1.0, description="Cosine schedule floor, as a fraction of learning_rate."
    )
    cosine_constant_lr_ratio: float | None = Field(
        None, ge=0.0, le=1.0, description="With cosine and cosine_min_lr_ratio: the cosine reaches the floor at "
        "this fraction of the total steps and the rate stays there (0 or null: decay over the whole run).")
    warmup_steps: int | None = Field(None, ge=0, description="Linear warmup steps (exclusive with warmup_ratio).")
    warmup_ratio: float | None = Field(
        None, ge=0.0, le=1.0, description="Warmup as a fraction of total steps (exclusive with warmup_steps)."
    )
    weight_decay: float = Field(0.0, ge=0.0, description="Decoupled weight decay (not applied to norms and biases).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="Adam beta1, in [0, 1).")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="Adam beta2, in [0, 1).")
    adam_epsilon: float = Field(1e-8, gt=0, description="Adam epsilon (> 0).")
    max_grad_norm: float | None = Field(1.0, ge=0, description="Clip the global gradient norm to this (null: no clipping).")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed for data order, dropout and initialisation.")
    loss_watchdog_threshold: float | None = Field(
        None, description="Stop when the training loss stays above this for loss_watchdog_patience steps."
    )
    loss_watchdog_patience: int = Field(3, ge=1, description="Consecutive steps above the threshold before stopping.")
    # evaluation
    eval_steps: int | float | None = Field(
        None, description="Evaluate every N steps (or a fraction of total steps); exclusive with evals_per_epoch."
    )
    evals_per_epoch: int | None = Field(None, ge=1, description="Evaluations per epoch.")
    eval_strategy: Literal["no", "steps", "epoch"] | None = Field(None, description="When to evaluate.")
    generate_samples: bool = Field(
        False, description="SFT: at each evaluation, continue the first num_generation_samples evaluation rows "
        "from their prompts and log the completions next to the references (also in output_dir/samples.jsonl)."
    )
    num_generation_samples: int = Field(3, ge=1, description="Evaluation rows generate_samples continues.")
    generation_max_new_tokens: int = Field(50, ge=1, description="Most tokens a generate_samples completion has.")
    generation_do_sample: bool = Field(True, description="generate_samples samples (false: greedy decoding).")
    generation_temperature: float = Field(
        0.7, ge=0.0, description="Sampling temperature of generate_samples (0: greedy)."
    )
    generation_top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling of generate_samples.")
    generation_top_k: int | None = Field(None, ge=1, description="Top-k sampling of generate_samples.")
    generation_prompt_ratio: float = Field(
        0.5, gt=0.0, lt=1.0, description="generate_samples: share of a row used as its prompt when the row has no "
        "untrained prefix (completion data); other rows are continued from where their trained tokens start."
    )
    do_causal_lm_eval: bool = Field(
        False, description="SFT: at each evaluation, also continue every evaluation row greedily from its prompt "
        "(up to generation_max_new_tokens) and score the completions against the references with "
        "eval_causal_lm_metrics, logged as eval_sacrebleu, eval_chrf, eval_ter (needs `pip install sacrebleu`)."
    )
    eval_causal_lm_metrics: list[Literal["sacrebleu", "chrf", "ter", "perplexity", "comet"]] = Field(
        default_factory=lambda: ["sacrebleu", "chrf", "ter"], description="Metrics of do_causal_lm_eval: corpus "
        "BLEU and chrF (0-100, higher is better), TER (lower is better); perplexity is always logged as "
        "eval_perplexity; comet is not available (its model comes from the Hugging Face Hub)."
    )
    metric_for_best_model: str = Field(
        "eval_loss", description="Evaluation metric that ranks evaluations for early_stopping_patience and "
        "load_best_model_at_end (with or without the eval_ prefix)."
    )
    greater_is_better: bool | None = Field(
        None, description="Whether a higher metric_for_best_model is better (default: lower for losses and "
        "perplexity, higher otherwise)."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop training after this many evaluations in a row without a better "
        "metric_for_best_model."
    )
    early_stopping_threshold: float = Field(
        0.0, ge=0.0, description="How much metric_for_best_model must improve to count as better."
    )
    load_best_model_at_end: bool = Field(
        False, description="Save a checkpoint at every evaluation that improves metric_for_best_model (kept "
        "through save_total_limit) and end the run with the best one's weights as the final model."
    )
    # checkpoints
    output_dir: str = Field("./outputs/model-out", description="Where checkpoints and the final model are written.")
    overwrite_output_dir: bool = Field(
        False, description="Train into an output_dir that holds another run or files tuneforge did not write (the "
        "working directory included); tuneforge replaces only files of its own names there.")
    save_steps: int | float | None = Field(
        None, description="Save a checkpoint every N steps (or a fraction of total steps)."
    )
    saves_per_epoch: int | None = Field(None, ge=1, description="Checkpoints per epoch (exclusive with save_steps).")
    save_strategy: Literal["no", "steps", "epoch", "best"] | None = Field(
        None, description="When to save checkpoints: steps (save_steps / saves_per_epoch), epoch, no, or best: only "
        "at an evaluation that improves metric_for_best_model (greater_is_better; needs evaluation data).")
    save_total_limit: int | None = Field(None, ge=1, description="Keep only the newest N checkpoints.")
    dynamic_checkpoint: DynamicCheckpoint | None = Field(
        None, description="Checkpoint on request: `touch <output_dir>/axolotl_checkpoint.save` (training goes on)."
    )
    save_first_step: bool = Field(False, description="Also save a checkpoint after the first step (sanity check).")
    save_only_model: bool = Field(
        False, description="Checkpoints hold weights only (smaller, but the run cannot be resumed from them)."
    )
    save_safetensors: bool = Field(True, description="Write weights as safetensors.")
    resume_from_checkpoint: str | None = Field(None, description="checkpoint-N folder to resume from.")
    auto_resume_from_checkpoints: bool = Field(
        False, description="Resume from the newest checkpoint in output_dir when there is one."
    )

    auto_find_batch_size: bool = Field(
        False, description="When a step runs out of GPU memory, retry it with every micro-batch cut in half (twice "
        "as many accumulated: the same rows, the same update) and keep that size; single-process runs."
    )
    gc_collect_steps: int | None = Field(
        None, ge=-1, description="Run Python's garbage collector every this many steps (-1: only at the end of "
        "each epoch and before evaluations)."
    )
    torch_empty_cache_steps: int | None = Field(
        None, ge=1, description="Return the CUDA allocator's unused cached memory to the driver every this many "
        "steps (against fragmentation; costs a little speed)."
    )
    gc_steps: int | None = Field(
        None, ge=1, description="Both of the above every this many steps (Axolotl's older key; the other two "
        "take precedence)."
    )
    profiler_steps: int | None = Field(
        None, ge=1, description="Record this many training steps with torch.profiler and write a Chrome trace "
        "(profiler_trace.json), an operator table and, on CUDA, a memory snapshot to output_dir."
    )
    profiler_steps_start: int = Field(0, ge=0, description="Steps to train before the profiled ones.")
    neftune_noise_alpha: float | None = Field(
        None, gt=0, description="NEFTune (SFT): add uniform noise of magnitude alpha / sqrt(length x hidden size) "
        "to the input embeddings while training (the paper uses 5)."
    )
    # Several processes (torchrun / accelerate launch)
    ddp_timeout: int = Field(
        1800, ge=1, description="Seconds a process waits for the others at a collective (the gradient "
        "all-reduce; the wait while the first process prepares the data) before the run fails instead of hanging."
    )
    ddp_bucket_cap_mb: int | None = Field(
        None, ge=1, description="Size of DDP's gradient all-reduce buckets in MB (PyTorch's default: 25)."
    )
    ddp_find_unused_parameters: bool = Field(
        False, description="DDP: let trainable parameters go without a gradient in a step (a model whose "
        "forward skips some of them); costs a pass over the autograd graph per step."
    )


    @property
    def eval_generates(self) -> bool:
        """Evaluation generates text (generate_samples, do_causal_lm_eval): it needs a model that can generate."""
        return bool(self.generate_samples or self.do_causal_lm_eval)

    @field_validator("eval_strategy", "save_strategy", mode="before")
    @classmethod
    def _unquoted_no(cls, value):
        # YAML 1.1 reads an unquoted `no` as false; it means the strategy "no".
        return "no" if value is False else value


class LoggingKeys(Section):
    logging_steps: int = Field(1, ge=1, description="Log metrics every N optimizer steps.")
    use_tensorboard: bool = Field(False, description="Log to TensorBoard under output_dir/runs.")
    wandb_project: str | None = Field(None, description="Weights & Biases project (setting it enables W&B).")
    wandb_entity: str | None = Field(None, description="W&B entity (team or user).")
    wandb_name: str | None = Field(None, description="W&B run name.")
    wandb_run_id: str | None = Field(None, description="W&B run id (to continue a run).")
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(None, description="W&B mode.")
    wandb_watch: str | bool | None = Field(None, description="Accepted for Axolotl compatibility; no effect.")
    wandb_log_model: str | bool | None = Field(None, description="Accepted for Axolotl compatibility; no effect.")
    use_mlflow: bool = Field(False, description="Log to MLflow.")
    mlflow_tracking_uri: str | None = Field(None, description="MLflow tracking URI.")
    mlflow_experiment_name: str | None = Field(None, description="MLflow experiment name.")
    mlflow_run_name: str | None = Field(None, description="MLflow run name.")
    include_tkps: bool = Field(True, description="Accepted for Axolotl compatibility; no effect (`tokens_per_second` "
                               "is always logged).")
    # SwanLab (engine/swanlab_tracker.py); Axolotl's plugin arguments, at the top level as in Axolotl
    use_swanlab: bool = Field(False, description="Log to SwanLab (`pip install swanlab`); listing Axolotl's "
                              "SwanLabPlugin in `plugins:` turns it on too.")
    swanlab_project: str | None = Field(None, description="SwanLab project (default: output_dir's folder name).")
    swanlab_experiment_name: str | None = Field(None, description="SwanLab experiment name.")
    swanlab_description: str | None = Field(None, description="SwanLab experiment description.")
    swanlab_mode: Literal["cloud", "online", "local", "offline", "disabled"] | None = Field(
        None, description="cloud (= online): sync to SwanLab's server; local / offline: write to ./swanlog only; "
        "disabled: no SwanLab (default: SwanLab's own, online).")
    swanlab_workspace: str | None = Field(None, description="SwanLab workspace (organisation or user).")
    swanlab_api_key: str | None = Field(None, description="SwanLab API key for `swanlab.login` (default: the "
                                        "SWANLAB_API_KEY environment variable or an earlier `swanlab login`).")
    swanlab_api_host: str | None = Field(None, description="SwanLab API address of a private deployment (the host "
                                         "`swanlab.login` uses with swanlab_api_key).")
    swanlab_web_host: str | None = Field(None, description="Accepted for Axolotl compatibility; not used (the "
                                         "login goes to swanlab_api_host).")
    swanlab_log_model: bool | None = Field(None, description="Accepted for Axolotl compatibility; not used "
                                           "(checkpoints are not uploaded).")
    swanlab_log_completions: bool = Field(
        True, description="Also log the text the run generates as SwanLab tables: `samples` (generate_samples, "
        "output_dir/samples.jsonl) and `completions` (GRPO's trl.log_completions, completions.jsonl).")
    swanlab_completion_log_interval: int = Field(
        100, ge=1, description="Steps between two uploads of the completion tables (and one at the end).")
    swanlab_completion_max_buffer: int = Field(
        128, ge=1, description="Rows each completion table holds: the newest ones.")
    swanlab_lark_webhook_url: str | None = Field(None, description="Accepted for Axolotl compatibility; not used "
                                                 "(no Lark notifications are sent).")
    swanlab_lark_secret: str | None = Field(None, description="Accepted for Axolotl compatibility; not used.")
