"""The trainer's DeepSpeed setup (`deepspeed:`), kept beside the loop rather than inside it: tuneforge's
optimizer and schedule, handed to `deepspeed.initialize` with the filled JSON
(tuneforge.distributed.deepspeed_engine says how the loop's step contract is kept)."""

from __future__ import annotations

from . import generation_copy
from .optim import build_optimizer
from .schedule import build_scheduler, warmup_steps


def prepare(trainer, runner, generates: bool) -> None:
    """Set `trainer`'s runner (the DeepSpeed engine around `runner`, the trainer's ObjectiveRunner), optimizer
    (engine.step / zero_grad), scheduler, backward and ZeroEngine; `generates`: the run generates (an online
    method, or generation during evaluation). ZeRO-1 and 2 keep whole weights on every process, which generate
    as they are; ZeRO-3 partitions them, so generation gets a whole copy made before DeepSpeed partitions the
    model and refreshed from the partitions before each generation (as under FSDP2)."""
    from tuneforge.config.distributed import deepspeed_settings, zero_stage
    from tuneforge.distributed import deepspeed_engine as dse

    cfg = trainer.cfg
    if generates and zero_stage(deepspeed_settings(cfg)) >= 3:
        trainer.generation_model = generation_copy.whole_copy(cfg, trainer.model, trainer.objective,
                                                              trainer.accelerator.device)
    acc = trainer.accelerator
    optimizer = build_optimizer(cfg, trainer.model)
    zero = dse.initialize(cfg, runner, trainer.model, optimizer=optimizer,
                          world_size=acc.num_processes, precision=trainer.precision,
                          total_steps=trainer.total_steps, warmup=warmup_steps(cfg, trainer.total_steps))
    if zero.scheduler is not None:  # the JSON's scheduler section: DeepSpeed steps it
        scheduler = dse.DeepSpeedSchedule(zero.scheduler)
    else:  # tuneforge's schedule on the torch optimizer whose param_groups DeepSpeed's wrapper updates with
        scheduler = build_scheduler(cfg, dse.base_optimizer(zero), trainer.total_steps)
    trainer.runner, trainer.optimizer, trainer.scheduler = zero.engine, dse.EngineOptimizer(zero), scheduler
    trainer.zero, trainer.backward = zero, zero.backward


def save_state(zero, tmp, model, tokenizer, *, only_model: bool, main: bool, safe: bool) -> None:
    """A DeepSpeed run's checkpoint content: every process's DeepSpeed state (resumable), or with save_only_model
    the weights as a loadable folder; the tokenizer and model config from the first process."""
    if only_model:
        zero.save_final(model, tokenizer, tmp, main=main, safe=safe)
        return
    zero.save(tmp)
    if main:
        config = getattr(getattr(model, "get_base_model", lambda: model)(), "config", None)
        if config is not None:
            config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))


def load_state(zero, path) -> bool:
    """Restore a DeepSpeed checkpoint's model and optimizer when this is a DeepSpeed run (True), refusing a
    checkpoint of the other kind either way."""
    from tuneforge.distributed import deepspeed_engine as dse
    from tuneforge.errors import TuneforgeError

    if zero is None:
        if dse.exists(path):
            raise TuneforgeError(f"{path} is a DeepSpeed checkpoint: resume it with the same deepspeed: JSON")
        return False
    if not dse.exists(path):
        raise TuneforgeError(f"{path} holds no DeepSpeed state, but this run uses deepspeed: resume it without the "
                             "deepspeed key, or from a checkpoint of a DeepSpeed run")
    zero.load(path, with_optimizer=True)
    return True
