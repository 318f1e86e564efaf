"""`tuneforge train`: config -> objective -> data -> model (+ adapter) -> Trainer -> output_dir."""

from __future__ import annotations

import contextlib
import logging
import shlex
import signal
import sys
from datetime import timedelta
from pathlib import Path

from tuneforge import outputs_guard
from tuneforge.config import dump
from tuneforge.config.schema import Config
from tuneforge.distributed import shared_output
from tuneforge.errors import TuneforgeError

log = logging.getLogger("tuneforge")


def train(cfg: Config, argv: list[str] | None = None, *, show_progress: bool | None = None):
    """Run the training the config describes; returns the `TrainResult`.

    On SIGINT/SIGTERM the run saves a checkpoint, prints the command that resumes it and exits with
    128 + the signal number.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import set_seed

    from tuneforge.config.distributed import check_shard_size
    from tuneforge.methods import get_objective
    from tuneforge.models import llama4_experts, neftune
    from tuneforge.models.adapters import apply_adapter
    from tuneforge.models.compile_setup import compile_blocks
    from tuneforge.models.load import count_parameters, load_model
    from tuneforge.models.tokenizer import load_tokenizer
    from tuneforge.planner.hook import log_plan, resolve_checkpointed_layers

    from . import outputs, plot
    from .signals import TrainingInterrupted
    from .trainer import Trainer

    objective = get_objective(cfg)  # an unimplemented method fails here, before anything loads
    _refuse_deepspeed(cfg)
    _quiet_libraries()
    out = cfg.output_path()
    # Several processes (torchrun / accelerate launch): gloo on CPU, NCCL on GPUs. The first process
    # prepares (and caches) the data while the others wait, then they load its cache.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=cfg.ddp_timeout))
    check_shard_size(cfg, state.num_processes)  # dp_shard_size against the processes started
    outputs_guard.claim(cfg, out, dump(cfg), main=state.is_main_process)  # nothing of the user's or another run's
    shared_output.check_same_file(out / outputs_guard.CLAIM)  # several machines: one output_dir for all
    log_plan(cfg, state.num_processes, state.is_main_process)  # the memory estimate, before the model loads
    cfg = resolve_checkpointed_layers(cfg, state.num_processes, state.is_main_process)
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg)
    with _main_process_first(state, cfg.ddp_timeout):
        data = objective.prepare_data(tokenizer)
    _log_data(data)
    set_seed(cfg.seed)  # the model's random parts (reinit, LoRA init) do not depend on data preparation
    model = load_model(cfg, tokenizer)
    main = state.is_main_process
    if main:
        outputs.write_run_files(cfg, tokenizer, out)
        if cfg.adapter and cfg.reinit_weights and not (out / "base_model").exists():
            outputs.save_random_base(model, tokenizer, out)
    if cfg.llama4_linearized_experts:  # one nn.Linear per expert, so that LoRA can target them
        llama4_experts.linearize(model)
    model = apply_adapter(cfg, model)
    _low_precision(cfg, model)
    if cfg.neftune_noise_alpha:
        neftune.attach(model, cfg.neftune_noise_alpha)
        log.info("NEFTune: noise alpha %g on the input embeddings while training", cfg.neftune_noise_alpha)
    compile_blocks(cfg, model)  # logs whether it compiles and why (torch_compile: auto decides here)
    trainable, total = count_parameters(model)
    log.info("model: %s parameters, %s trainable", f"{total:,}", f"{trainable:,}")

    trainer = Trainer(cfg, model, tokenizer, objective, data, output_dir=out, show_progress=show_progress)
    if cfg.qat and cfg.qat.fake_quant_after_n_steps:  # the step count survives a resume, so does the switch
        from tuneforge.models import qat

        qat.switch_on_at(model, cfg.qat.fake_quant_after_n_steps, lambda: trainer.state.global_step)
    exit_code = None
    try:
        result = trainer.train()
    except TrainingInterrupted as stop:
        command = resume_command(cfg, argv, stop.checkpoint)
        print(f"\nTraining interrupted by {signal.Signals(stop.signum).name} after step {stop.step}; "
              f"checkpoint saved to {stop.checkpoint}.\nResume with:\n  {command}", file=sys.stderr, flush=True)
        exit_code = 128 + stop.signum
    if exit_code is not None:  # outside the except block: its traceback no longer holds the trainer
        trainer = None
        _leave_process_group()
        raise SystemExit(exit_code)
    if cfg.relora_every():  # the base weights carry every restart's update: the output is the merged model
        from .relora import merged_model

        model = result.model = merged_model(model)
    if cfg.llama4_linearized_experts and (not cfg.adapter or cfg.relora_every()):  # transformers' fused layout
        llama4_experts.fuse(model)
    if cfg.qat:  # the saved model is the trained 16-bit one, without the fake-quantizing layers
        from tuneforge.models import qat

        log.info("qat: %d fake-quantized layers swapped back to plain ones for saving", qat.remove(model))
    if trainer.zero is not None:  # DeepSpeed: ZeRO-3 gathers one tensor at a time, as FSDP2 below
        outputs.sync_generation_config(model, tokenizer)
        trainer.zero.save_final(model, tokenizer, out, main=main, safe=cfg.save_safetensors)
    elif trainer.sharded:  # every process sends its shards; the first writes them one tensor at a time
        from tuneforge.distributed.sharded_checkpoint import save_full_model

        outputs.sync_generation_config(model, tokenizer)
        save_full_model(trainer.runner, model, tokenizer, out, main=main, safe=cfg.save_safetensors)
    if trainer.accelerator.is_main_process:
        outputs.save_final(cfg, model, tokenizer, out, result, weights=not (trainer.sharded or trainer.zero))
        plot.plot_metrics(result.history, out)
        if cfg.quantization:
            from tuneforge.models import ptq

            ptq.export(cfg.quantization, type(model), out, tokenizer)
        if cfg.merge_lora and cfg.adapter and cfg.llama4_linearized_experts:
            llama4_experts.save_merged(model, tokenizer, out / "merged", cfg.save_safetensors)
            log.info("merge_lora: merged model written to %s", out / "merged")
        elif cfg.merge_lora and cfg.adapter:
            from tuneforge.merge.for_config import merge_for_config

            log.info("merge_lora: merged model written to %s", merge_for_config(cfg))
        _log_summary(result, out)
    trainer = None  # with it the wrapped model, whose reducer or device mesh holds the process group
    _leave_process_group()
    return result


def _low_precision(cfg: Config, model) -> None:
    """qat: fake-quantizing layers; fp8: float8 linear layers (both before sharding and compilation)."""
    if cfg.qat:
        from tuneforge.models import qat

        qat.prepare(cfg.qat, model)
    if cfg.fp8:
        from tuneforge.models import fp8

        fp8.prepare(model, fsdp_float8_all_gather=cfg.fp8_enable_fsdp_float8_all_gather,
                    compiled=bool(cfg.torch_compile), frozen_only=bool(cfg.adapter),
                    store_frozen=cfg.fp8_frozen_weights)
    if cfg.qat and not cfg.quantization:
        log.info("qat: add a `quantization:` block with the same settings to also write output_dir/quantized")


def _refuse_deepspeed(cfg: Config) -> None:
    """Where DeepSpeed cannot run (not installed), say why and name the FSDP2 settings that shard the same way."""
    if not cfg.deepspeed:
        return
    from tuneforge.distributed.deepspeed_config import unavailable_reason

    reason = unavailable_reason()
    if reason is None:
        return
    import yaml

    from tuneforge.config.distributed import deepspeed_settings, fsdp_equivalent
    from tuneforge.errors import NotSupportedYet

    block = yaml.safe_dump({"fsdp_version": 2, "fsdp_config": fsdp_equivalent(deepspeed_settings(cfg))},
                           default_flow_style=None, sort_keys=False).strip().replace("\n", "; ")
    raise NotSupportedYet(f"deepspeed: {reason}. Install it, or use PyTorch's FSDP2, which shards the same way: "
                          f"replace the deepspeed key with  {block}  (docs/multi-gpu.md)")


def _leave_process_group() -> None:
    """Several processes that all finished (or all stopped at one checkpoint): take the process group down
    before exit. Left to interpreter shutdown, its communication threads can be destroyed mid-use and abort
    the process ("terminate called without an active exception"), which torchrun reports as a failed run.
    No barrier first: the first process may still be writing the final model, which needs no collective.
    The wrapped model (DDP's reducer, FSDP2's device mesh) holds the group too, in reference cycles: collected
    only at interpreter shutdown, the group's worker threads would still be joined then, when a thread that
    needs the GIL is killed and the process aborts the same way. So collect them here, while all is alive."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()


def resume_command(cfg: Config, argv: list[str] | None, checkpoint: Path) -> str:
    """The user's own command line with `--resume-from-checkpoint <checkpoint>` (replacing an earlier one)."""
    if argv and len(argv) > 1 and "train" in argv[1:]:
        args = list(argv[argv.index("train", 1):])
    else:
        args = ["train", str(cfg.source_file or "config.yaml")]
    kept, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in ("--resume-from-checkpoint", "--resume_from_checkpoint"):
            skip = True
            continue
        if a.startswith(("--resume-from-checkpoint=", "--resume_from_checkpoint=")):
            continue
        kept.append(a)
    return shlex.join(["tuneforge", *kept, "--resume-from-checkpoint", str(checkpoint)])


@contextlib.contextmanager
def _main_process_first(state, timeout: int):
    """The first process runs the body (preparing and caching the data) while the others wait for it, then
    they run it (loading that cache). A wait longer than ddp_timeout ends the run with what to do about it
    (gloo raises the timeout here; NCCL's watchdog aborts the process after the same time)."""
    if not state.is_main_process:
        try:
            state.wait_for_everyone()
        except RuntimeError as exc:
            if "timed out" not in str(exc).lower() and "timeout" not in str(exc).lower():
                raise
            raise TuneforgeError(
                f"process {state.process_index} waited more than ddp_timeout ({timeout} s) for the first process "
                f"to prepare the data. Prepare it once beforehand with `tuneforge preprocess <config>` (training "
                f"then loads the cache in seconds), or raise ddp_timeout") from None
    yield
    if state.is_main_process:
        state.wait_for_everyone()


def _quiet_libraries() -> None:
    """tuneforge shows its own progress; the libraries' per-file bars would interleave with it."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _log_data(data) -> None:
    for split, stats in data.stats.items():
        d = stats.as_dict()
        log.info("%s data: %d rows (%d in), %s tokens, %s trained%s", split, d["rows_out"], d["rows_in"],
                 f"{d['tokens']:,}", f"{d['trained_tokens']:,}",
                 f"; dropped {d['dropped']}" if d["dropped"] else "")


def _log_summary(result, out: Path) -> None:
    parts = [f"{result.state.global_step} steps in {result.state.train_seconds:.1f} s"]
    if result.train_metrics:
        parts.append(f"final loss {result.train_metrics['loss']:.4f}")
    if result.eval_metrics:
        ev = result.eval_metrics
        parts.append(f"eval loss {ev.get('eval_loss', float('nan')):.4f}")
        if "eval_accuracy" in ev:
            parts.append(f"held-out exact-match accuracy {ev['eval_accuracy']:.1%}")
    log.info("done: %s. Outputs in %s", ", ".join(parts), out)
