"""The training loop: one explicit loop for every objective.

    for each optimizer step:
        micro-batches  <- the step plan (deterministic in seed and epoch; see plan.py)
        n              <- items the objective sums over in the whole step, summed over all ranks
        for each micro-batch:  backward(objective.loss(model, batch, n))   (no gradient sync until the last)
        clip gradients; watchdog on loss and grad norm; optimizer and scheduler step
        log; evaluate / checkpoint when due; on SIGINT/SIGTERM checkpoint and stop

Why the loss is divided by `n` of the *whole step*: then the accumulated gradient is the gradient of
the mean over every trained token of the step, independent of how rows are split into micro-batches
or ranks (data-parallel gradients are averaged over ranks, hence the `* num_processes`).

accelerate handles devices, mixed precision, data-parallel wrapping and trackers. The model is wrapped
in `ObjectiveRunner`, whose forward runs the objective's function: every objective (one forward for
SFT, several for preference methods) then runs inside a single DDP forward, as DDP requires.

Around the loop, each in its own module: evaluation and generation during evaluation (evaluation.py),
running out of memory (memory.py), the dynamic_checkpoint trigger file (trigger.py), which checkpoint to
resume from (resume.py), checkpoint files (checkpoint.py), cross-process sums (tuneforge.distributed), the
accelerate setup (accelerator.py), the whole copy sharded runs generate with (generation_copy.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tuneforge import outputs_guard
from tuneforge.config import dump
from tuneforge.config.schema import Config
from tuneforge.distributed import collectives, fsdp
from tuneforge.methods.base import Batch, Objective
from tuneforge.models.load import mixed_precision
from tuneforge.user_code import keep_last_step_on_failure

from . import checkpoint as ckpt
from . import deepspeed_hooks, generation_copy, loss_scaling, memory, resume, trackers
from .accelerator import build_accelerator
from .best import BestEvaluation
from .evaluation import Evaluator
from .metrics import FlopCounter, LogInterval, MetricsLogger, StepResult, peak_flops
from .optim import build_optimizer
from .plan import MicroBatch, Position, StepPlan, eval_cadence, save_cadence
from .profiling import StepProfiler
from .rows import RowSource, device_batch
from .schedule import build_scheduler
from .signals import StopFlag, TrainingInterrupted
from .stream_plan import StreamPlan, StreamRows
from .trigger import CheckpointTrigger
from .variants import StepVariants, with_jagged_schedule
from .watchdog import LossWatchdog

log = logging.getLogger("tuneforge")


class ObjectiveRunner(torch.nn.Module):
    """`runner(fn, *args)` runs `fn(model, *args)` as this module's forward (see the module docstring)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(self.model, *args)


@dataclass
class TrainState:
    global_step: int = 0
    epoch: int = 0  # data position: epoch ...
    index: int = 0  # ... and its next micro-batch
    tokens_seen: int = 0  # real (non-padding) input tokens, this rank
    trained_tokens_seen: int = 0  # items of the objective (SFT: trained tokens), all ranks
    train_seconds: float = 0.0
    micro_batch_splits: int = 1  # auto_find_batch_size: pieces each planned micro-batch is cut into


@dataclass
class TrainResult:
    state: TrainState
    train_metrics: dict = field(default_factory=dict)  # the last logged training record
    eval_metrics: dict | None = None  # the last evaluation record
    last_checkpoint: Path | None = None
    history: list[dict] = field(default_factory=list)  # every record written to metrics.jsonl
    model: Any = None  # the trained (PEFT or transformers) model


class Trainer:
    def __init__(self, cfg: Config, model, tokenizer, objective: Objective, data, *, output_dir: Path | None = None,
                 accelerator=None, show_progress: bool | None = None):
        self.cfg = cfg
        self.model = model  # the (PEFT-wrapped) transformers model; saved as is
        self.tokenizer = tokenizer
        self.objective = objective
        self.output_dir = Path(output_dir) if output_dir is not None else cfg.output_path()
        self.adapter = bool(cfg.adapter)
        self.precision = mixed_precision(cfg)
        self.tracker_names = trackers.requested(cfg)
        trackers.check_installed(self.tracker_names)
        self.accelerator = accelerator or build_accelerator(cfg, self.precision, self.tracker_names, self.output_dir)
        acc = self.accelerator
        self.pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0

        self.streamed = getattr(data, "stream", None) is not None  # read while training (engine/stream_plan.py)
        if self.streamed:
            self.train_rows = StreamRows()
            self.plan = StreamPlan(cfg, data.stream.open(acc.process_index, acc.num_processes),
                                   shape=objective.step_shape())
        else:
            self.train_rows = RowSource(data.train, objective.row_columns)
            self.plan = StepPlan(cfg, self.train_rows.lengths, world_size=acc.num_processes, rank=acc.process_index,
                                 shape=objective.step_shape())
        self.total_steps = self.plan.total_steps
        self.sharded = cfg.fsdp_enabled
        evaluates = data.eval is not None and cfg.eval_strategy != "no"
        self.eval_generates = evaluates and cfg.eval_generates  # prepare_model keeps a model that can generate
        self.zero, self.backward = None, acc.backward  # deepspeed: its ZeroEngine and backward (deepspeed_hooks)
        self.flops = FlopCounter(model, self.adapter)  # before ZeRO-3 partitions the weights (shapes read here)
        self.prepare_model()
        self.variants = StepVariants(cfg, model, self.optimizer)  # LISA, ReLoRA (engine/variants.py)

        self.evaluator = None
        if evaluates:
            self.evaluator = Evaluator(cfg, objective, RowSource(data.eval, objective.row_columns), accelerator=acc,
                                       generation_model=self._generation_model, tokenizer=tokenizer, pad_id=self.pad_id,
                                       rows_per_micro_batch=objective.step_shape().rows_per_micro_batch,
                                       output_dir=self.output_dir, sharded=self.sharded or self.zero is not None)
        self.eval_cadence = eval_cadence(self.plan, cfg) if self.evaluator is not None else None
        self.save_cadence = save_cadence(self.plan, cfg)
        self.trigger = CheckpointTrigger(cfg.dynamic_checkpoint, self.output_dir, is_main_process=acc.is_main_process)

        self.state = TrainState()
        self.watchdog = LossWatchdog(cfg.loss_watchdog_threshold, cfg.loss_watchdog_patience, self.precision)
        self.best = BestEvaluation(cfg)
        self.profiler = StepProfiler(cfg.profiler_steps, cfg.profiler_steps_start, self.output_dir, acc.process_index)
        self.peak = peak_flops(acc.device)
        self.logger = MetricsLogger(self.output_dir, self.total_steps, enabled=acc.is_main_process, accelerator=acc,
                                    trackers=bool(self.tracker_names), progress=show_progress)
        self.out_of_memory = memory.OutOfMemoryPolicy(
            cfg, objective, processes=acc.num_processes, lengths=self.train_rows.lengths,
            drop_gradients=lambda: self.optimizer.zero_grad(set_to_none=True),
            checkpoint_last_step=self._checkpoint_of_last_step)
        self.last_checkpoint: Path | None = None
        self.last_eval: dict | None = None
        self.last_train: dict = {}

    def prepare_model(self) -> None:
        """The model wrapped for the devices (`runner`), its optimizer and learning-rate schedule: DDP through
        accelerate, or FSDP2 shards (built before the optimizer, since sharding replaces the parameters). The
        scheduler is stepped by hand: accelerate's wrapper would step it once per process."""
        cfg, acc = self.cfg, self.accelerator
        self.generation_model = None
        if cfg.deepspeed:  # the DeepSpeed engine becomes the runner; it clips its own gradients (no `trainable`)
            return deepspeed_hooks.prepare(self, ObjectiveRunner(self.model),
                                           generation_copy.generates(self.objective) or self.eval_generates)
        if self.sharded:
            # Online methods and generation during evaluation generate outside the runner's forward, where
            # sharded parameters cannot be used: they get a whole copy of the model, refreshed from the shards
            # before each generation.
            if generation_copy.generates(self.objective) or self.eval_generates:
                self.generation_model = generation_copy.whole_copy(cfg, self.model, self.objective, acc.device)
            self.runner = ObjectiveRunner(self.model)
            fsdp.shard(self.runner, self.model, cfg.fsdp_config,
                       compute_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision))
            loss_scaling.shard_aware(acc)  # before the optimizer is prepared: it keeps the scaler it is given
            self.optimizer = acc.prepare(build_optimizer(cfg, self.model))
        else:
            self.runner, self.optimizer = acc.prepare(ObjectiveRunner(self.model), build_optimizer(cfg, self.model))
        self.scheduler = with_jagged_schedule(cfg, build_scheduler(cfg, self.optimizer, self.total_steps))
        self.trainable = [p for p in self.runner.parameters() if p.requires_grad]

    def _generation_model(self):
        """The model online methods and evaluation generate with: the trained one, or under FSDP2 and ZeRO-3 its
        whole copy refreshed from the shards (every process must call this at the same point)."""
        if self.generation_model is None:
            return self.model
        if self.zero is not None:  # DeepSpeed ZeRO-3
            self.zero.copy_whole_weights(self.generation_model)
        else:
            fsdp.copy_whole_weights(self.runner.model, self.generation_model)
        return self.generation_model

    def _micro_batch_context(self, last: bool):
        """Around one micro-batch's forward and backward: gradients are synchronised on the step's last one;
        with activation_offloading the tensors saved for the backward wait in CPU memory."""
        stack = contextlib.ExitStack()
        if self.cfg.activation_offloading:
            stack.enter_context(torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()))
        if self.zero is not None or not last:  # DeepSpeed is told where the step ends on every micro-batch
            stack.enter_context(self.zero.micro_batch(last) if self.zero is not None else fsdp.gradient_sync(
                self.runner, False) if self.sharded else self.accelerator.no_sync(self.runner))
        return stack

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> TrainResult:
        resumed_at = self.load_checkpoint()
        cfg, state = self.cfg, self.state
        if self.accelerator.is_main_process:
            ckpt.clean_partial(self.output_dir)
        trackers.start(cfg, self.accelerator, self.tracker_names, dump(cfg))
        self.logger.start(state.global_step, keep_until=resumed_at)
        log.info("training for %d optimizer steps (%d micro-batches of %d rows per step, %d process(es))",
                 self.total_steps, cfg.grad_accum, cfg.micro_batch_size, self.accelerator.num_processes)
        interval = LogInterval()
        evaluated_at = -1
        try:
            with StopFlag() as stop:
                while state.global_step < self.total_steps:
                    epoch = state.epoch
                    mbs, after, epoch_end = self.plan.next_step(Position(state.epoch, state.index))
                    start = time.perf_counter()
                    with self.profiler.step(state.global_step + 1), keep_last_step_on_failure(
                            state.global_step, self.accelerator.num_processes, self._checkpoint_of_last_step):
                        result = self.out_of_memory.run_step(mbs, state, self._optimizer_step)
                    seconds = time.perf_counter() - start
                    state.global_step += 1
                    state.epoch, state.index = after.epoch, after.index
                    state.tokens_seen += result.tokens
                    state.trained_tokens_seen += result.num_items
                    state.train_seconds += seconds
                    interval.add(result, seconds)
                    step = state.global_step
                    signum = self._signal_on_any_rank(stop.signum)  # all processes stop after the same step
                    if step % cfg.logging_steps == 0 or step == self.total_steps or signum:
                        self._log_train(interval, after)
                        interval = LogInterval()
                    else:
                        self.logger.advance(step)
                    memory.release_after_step(cfg, step, epoch_end)
                    if signum and step < self.total_steps:
                        path = self.save_checkpoint(resumable=True)
                        raise TrainingInterrupted(signum, path, step)
                    epoch_step = self.plan.steps_done_in_epoch(after, epoch_end, epoch)
                    if self._evaluate_and_save(step, epoch_step, self.plan.steps_in_epoch(epoch)):
                        evaluated_at = step
                    if self.best.patience_ran_out:
                        log.info(self.best.stop_message())
                        break
            if self.evaluator is not None and evaluated_at != state.global_step:
                self.best.update(self.evaluate())  # the weights in hand: no checkpoint needed if best
            if cfg.load_best_model_at_end:
                self._load_best()
        finally:
            self.profiler.close()  # a run that ended inside the window
            self.objective.close()
            self.logger.close()
            if self.tracker_names:
                self.accelerator.end_training()
        return TrainResult(state, self.last_train, self.last_eval, self.last_checkpoint, list(self.logger.records),
                           self.model)

    def _evaluate_and_save(self, step: int, epoch_step: int, in_epoch: int) -> bool:
        """The evaluation and checkpoint due after `step` (load_best_model_at_end, save_strategy: best: a
        checkpoint at every new best evaluation too); True when it evaluated."""
        requested = self.trigger.requested(step)  # looked at even when a save is due: one request, one file
        save = requested or (self.save_cadence and self.save_cadence.due(step, epoch_step, in_epoch)) or (
            self.cfg.save_first_step and step == 1)
        evaluate = bool(self.eval_cadence and self.eval_cadence.due(step, epoch_step, in_epoch))
        if evaluate and self.best.update(self.evaluate()) and self.best.saves:
            self.best.checkpoint, save = str(ckpt.checkpoint_dir(self.output_dir, step)), True  # saved with the state
        if save:
            self.save_checkpoint()
        return evaluate

    def _optimizer_step(self, micro_batches: list[MicroBatch]) -> StepResult:
        """One optimizer step over `micro_batches`; `out_of_memory.phase` follows it, for the diagnosis."""
        acc, objective, oom = self.accelerator, self.objective, self.out_of_memory
        batches = [self._device_batch(mb) for mb in micro_batches]
        self.variants.before_step(self.state.global_step)
        self.runner.train()
        oom.phase = memory.GENERATION
        batches = objective.rollout_step(self._generation_model(), batches)
        oom.phase = memory.FORWARD_BACKWARD
        num_items = int(collectives.sum_floats([float(sum(objective.num_items(b) for b in batches))])[0])
        sums: dict[str, float] = defaultdict(float)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with self._micro_batch_context(last):
                loss, metrics = self.runner(objective.loss, batch, num_items)
                self.backward(loss * acc.num_processes)  # DeepSpeed: without its 1/gas (deepspeed_engine)
            for k, v in metrics.items():
                sums[k] += v
        keys = collectives.union_keys(sums)  # a rank may lack a key (e.g. it skipped a micro-batch)
        sums = dict(zip(keys, collectives.sum_floats([sums.get(k, 0.0) for k in keys]), strict=True))
        grad_norm = None if self.zero is not None else self._clip_gradients()  # DeepSpeed clips in its step
        summary = objective.summarize(sums, num_items)
        lr = float(self.scheduler.get_last_lr()[0])  # torchao optimizers keep lr as a tensor
        # Before the update: a non-finite loss or gradient must never reach the weights.
        self.watchdog.check(summary.get("loss", 0.0), None if self.precision == "fp16" else grad_norm,
                            self.state.global_step + 1, lr, str(self.last_checkpoint) if self.last_checkpoint else None)
        oom.phase = memory.UPDATE
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.variants.after_step(self.state.global_step + 1)
        grad_norm = self.zero.grad_norm() if self.zero is not None else grad_norm  # DeepSpeed's, after its step
        return StepResult(
            sums=sums, num_items=num_items, grad_norm=grad_norm, lr=lr,
            tokens=sum(b["num_tokens"] for b in batches),
            flops=sum(self.flops.step_flops(b["num_tokens"], b["sum_sq_lengths"]) for b in batches),
        )

    def _device_batch(self, mb: MicroBatch) -> Batch:
        return device_batch(self.objective, self.train_rows, mb, pad_id=self.pad_id, device=self.accelerator.device,
                            training=True)

    def _clip_gradients(self) -> float:
        max_norm = self.cfg.max_grad_norm or float("inf")
        if self.sharded:
            loss_scaling.unscale(self.accelerator)
            return fsdp.clip_grad_norm(self.trainable, max_norm)
        norm = self.accelerator.clip_grad_norm_(self.trainable, max_norm)
        return float(norm) if norm is not None else float("nan")

    def _signal_on_any_rank(self, signum: int | None) -> int:
        """The stop signal received by any process (0: none). A signal may reach one process only, or the
        processes at different points of a step; without agreeing, one would stop and save while another
        waited in the next step's gradient all-reduce forever."""
        return int(collectives.max_float(float(signum or 0)))

    def _log_train(self, interval: LogInterval, after: Position) -> None:
        summary = self.objective.summarize(interval.sums, interval.items)
        record = interval.train_record(summary, step=self.state.global_step, epoch=self.plan.epoch_progress(after),
                                       total_tokens=self.state.tokens_seen, peak_flops=self.peak)
        self.last_train = record
        self.logger.train_step(record)

    # ------------------------------------------------------------------------------------------ eval
    def evaluate(self) -> dict:
        """Token-weighted loss, perplexity and accuracy over the whole eval set (engine/evaluation.py); logged
        and returned. Out of memory there, the last completed step is kept and the run stops with what to change."""
        state = self.state
        epoch = self.plan.epoch_progress(Position(state.epoch, state.index))

        def run() -> tuple[dict, list[dict]]:
            memory.release_before_evaluation(self.cfg)
            return self.evaluator.run(self.runner, step=state.global_step, epoch=epoch)

        record, samples = self.out_of_memory.run_evaluation(run, state.global_step)
        self.last_eval = record
        self.logger.eval_result(record)
        self.evaluator.write_samples(samples, state.global_step)
        return record

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, resumable: bool = False) -> Path:
        """Write checkpoint-<step>; `resumable` forces optimizer state even with save_only_model."""
        state = {
            **asdict(self.state),
            "total_steps": self.total_steps,
            "watchdog": self.watchdog.state_dict(),
            "best": self.best.state_dict(),
            "plan": self._plan_signature(),
            "grad_scaler": loss_scaling.state_dict(self.accelerator),
        }
        if self.streamed:  # every process's stream position (each reads its own shard)
            state["stream"] = collectives.gather_objects(self.plan.state_dict())
        only_model = self.cfg.save_only_model and not resumable
        with outputs_guard.save_errors(self.output_dir, self.state.global_step, self.last_checkpoint):  # disk full
            path = ckpt.save_checkpoint(
                self.output_dir, self.state.global_step, model=self.model, tokenizer=self.tokenizer,
                optimizer=self.optimizer, scheduler=self.scheduler, state=state, only_model=only_model,
                accelerator=self.accelerator, safe=self.cfg.save_safetensors,
                objective_state=None if only_model else self.objective.state_dict(),
                sharded=self.runner if self.sharded else None,
                sharded_full_weights=self.sharded and self.cfg.fsdp_config.state_dict_type == "FULL_STATE_DICT",
                zero=self.zero, extra_files=lambda folder: self.variants.save(folder, self.state.global_step),
            )
        if self.accelerator.is_main_process:
            ckpt.rotate(self.output_dir, self.cfg.save_total_limit, keep=(path, self.best.checkpoint_path()))
        self.last_checkpoint = path
        log.info("saved %s", path)
        return path

    def load_checkpoint(self) -> int | None:
        """Restore everything from the checkpoint to resume from (engine/resume.py), if any; returns its step."""
        path = resume.resume_path(self.cfg, self.output_dir)
        if path is None:
            return None
        saved = ckpt.load_training_state(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                         process_index=self.accelerator.process_index, adapter=self.adapter,
                                         sharded=self.runner if self.sharded else None, zero=self.zero)
        self.variants.load(path)
        if self.streamed:
            self.plan.load_state_dict(saved.get("stream"), path)
        else:
            saved["index"] = resume.index_for_world(saved, self.accelerator.num_processes)
        fields = TrainState.__dataclass_fields__
        self.state = TrainState(**{k: saved[k] for k in fields if k in saved})
        self.watchdog.load_state_dict(saved.get("watchdog", {}))
        self.best.load_state_dict(saved.get("best", {}))
        loss_scaling.load_state_dict(self.accelerator, saved.get("grad_scaler"))
        self.objective.load_state_dict(saved.get("objective", {}))
        resume.warn_if_plan_changed(saved.get("plan", {}), self._plan_signature())
        resume.check_steps_left(path, self.state.global_step, self.total_steps)
        self.last_checkpoint = path
        log.info("resumed from %s: step %d, epoch %d, micro-batch %d", path, self.state.global_step,
                 self.state.epoch, self.state.index)
        return self.state.global_step

    def _checkpoint_of_last_step(self) -> Path:
        """The checkpoint of the last completed step: the one saved after it, else a resumable one saved now."""
        done = ckpt.checkpoint_dir(self.output_dir, self.state.global_step)
        return done if self.last_checkpoint == done else self.save_checkpoint(resumable=True)

    def _plan_signature(self) -> dict:
        return resume.plan_signature(self.cfg, len(self.train_rows.lengths), self.accelerator.num_processes)

    def _load_best(self) -> None:
        """load_best_model_at_end: the best evaluation's weights become the model's (unless they are already)."""
        best = self.best
        if best.record is None or best.record["step"] == self.state.global_step:
            return
        path = best.checkpoint_path()
        if path is None:  # deleted by hand: keep the trained weights rather than end without a model
            log.warning("load_best_model_at_end: the checkpoint of the best evaluation (step %d, %s) is gone; "
                        "the final model is the last step's", best.record["step"], best.checkpoint)
            return
        if self.zero is not None:
            self.zero.load(path, with_optimizer=False)
        elif self.sharded:
            from tuneforge.distributed import sharded_checkpoint

            sharded_checkpoint.load(path, self.runner, None, with_optimizer=False)
        else:
            ckpt.load_weights(path, self.model, self.adapter)
            self.variants.load(path)
        self.last_eval = best.record
        log.info("load_best_model_at_end: the final model is %s's (%s %.4g)", path.name, best.metric, best.value)

