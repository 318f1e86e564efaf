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
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tuneforge.config.schema import Config
from tuneforge.distributed import collectives, fsdp
from tuneforge.errors import TuneforgeError
from tuneforge.methods.base import Batch, Objective
from tuneforge.models.load import mixed_precision

from . import checkpoint as ckpt
from . import memory, text_metrics, trackers
from .best import BestEvaluation
from .metrics import FlopCounter, MetricsLogger, peak_flops
from .optim import build_optimizer
from .plan import Cadence, MicroBatch, Position, StepPlan
from .profiling import StepProfiler
from .schedule import build_scheduler
from .signals import StopFlag, TrainingInterrupted
from .watchdog import LossWatchdog

log = logging.getLogger("tuneforge")

DEFAULT_EVERY = 500  # transformers' default save_steps/eval_steps when only the strategy is given


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


class _Rows:
    """Fetch the documents of a tokenized dataset by index (the objective's `row_columns`), and their lengths."""

    def __init__(self, ds, columns: tuple[str, ...]):
        self.columns = tuple(c for c in columns if c in ds.column_names)
        self.ds = ds.select_columns(list(self.columns))
        self.lengths = [int(n) for n in ds["length"]]

    def rows(self, mb: MicroBatch) -> list[list[dict]]:
        from tuneforge.data.batches import gather

        return gather(self.ds, mb, self.columns)


class Trainer:
    def __init__(self, cfg: Config, model, tokenizer, objective: Objective, data, *, output_dir: Path | None = None,
                 accelerator=None, show_progress: bool | None = None):
        self.cfg = cfg
        self.model = model  # the (PEFT-wrapped) transformers model; saved as is
        self.tokenizer = tokenizer
        self.objective = objective
        self.out = Path(output_dir) if output_dir is not None else cfg.output_path()
        self.adapter = bool(cfg.adapter)
        self.precision = mixed_precision(cfg)
        names = trackers.requested(cfg)
        trackers.check_installed(names)
        self.accelerator = accelerator or _accelerator(cfg, self.precision, names, self.out)
        acc = self.accelerator
        self.tracker_names = names
        self.pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0

        self.train_rows = _Rows(data.train, objective.row_columns)
        self.plan = StepPlan(cfg, self.train_rows.lengths, world_size=acc.num_processes, rank=acc.process_index,
                             rows_per_micro_batch=objective.rows_per_micro_batch(),
                             micro_batches_per_step=objective.micro_batches_per_step())
        self.total_steps = self.plan.total_steps
        has_eval = data.eval is not None and cfg.eval_strategy != "no"
        self.eval_rows = _Rows(data.eval, objective.row_columns) if has_eval else None

        self.sharded = cfg.fsdp_enabled
        self.generation_model = None
        self.runner, self.optimizer, self.scheduler = self._prepare_model(model)
        self.trainable = [p for p in self.runner.parameters() if p.requires_grad]

        self.eval_cadence = self._eval_cadence()
        self.save_cadence = self._save_cadence()

        self.state = TrainState()
        self.watchdog = LossWatchdog(cfg.loss_watchdog_threshold, cfg.loss_watchdog_patience, self.precision)
        self.best = BestEvaluation(cfg)
        self.profiler = StepProfiler(cfg.profiler_steps, cfg.profiler_steps_start, self.out, acc.process_index)
        self.flops = FlopCounter(model, self.adapter)
        self.peak = peak_flops(acc.device)
        self.logger = MetricsLogger(self.out, self.total_steps, enabled=acc.is_main_process, accelerator=acc,
                                    trackers=bool(names), progress=show_progress)
        self.last_checkpoint: Path | None = None
        self.last_eval: dict | None = None
        self.last_train: dict = {}
        self._eval_plan: list[MicroBatch] | None = None
        self._eval_filler: list[MicroBatch] = []
        self._phase = ""  # of the optimizer step under way: what running out of memory there leaves intact
        if cfg.do_causal_lm_eval:
            text_metrics.require_sacrebleu(cfg.eval_causal_lm_metrics)
        if cfg.auto_find_batch_size and acc.num_processes > 1:
            log.warning("auto_find_batch_size retries single-process runs only; with %d processes a step that runs "
                        "out of memory stops the run with what to change", acc.num_processes)

    def _prepare_model(self, model):
        """(runner, optimizer, scheduler): DDP through accelerate, or FSDP2 shards (built before the optimizer,
        since sharding replaces the parameters). The scheduler is stepped by hand: accelerate's wrapper would
        step it once per process."""
        cfg, acc = self.cfg, self.accelerator
        if not self.sharded:
            optimizer = build_optimizer(cfg, model)
            runner, optimizer = acc.prepare(ObjectiveRunner(model), optimizer)
            return runner, optimizer, build_scheduler(cfg, optimizer, self.total_steps)
        # Online methods generate outside the runner's forward, where sharded parameters cannot be used:
        # they get a whole copy of the model, refreshed from the shards before each generation.
        self.generation_model = copy.deepcopy(model).to(acc.device) if _generates(self.objective) else None
        runner = ObjectiveRunner(model)
        fsdp.shard(runner, model, cfg.fsdp_config)
        optimizer = acc.prepare(build_optimizer(cfg, model))
        return runner, optimizer, build_scheduler(cfg, optimizer, self.total_steps)

    def _generation_model(self):
        """The model online methods generate with: the trained one, or under FSDP2 its refreshed whole copy."""
        if self.generation_model is None:
            return self.model
        fsdp.copy_whole_weights(self.runner.model, self.generation_model)
        return self.generation_model

    def _micro_batch_context(self, last: bool):
        """Around one micro-batch's forward and backward: gradients are synchronised on the step's last one."""
        if self.sharded:
            return contextlib.nullcontext() if last else fsdp.gradient_sync(self.runner, False)
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.runner)

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> TrainResult:
        resumed_at = self._resume()
        cfg, state = self.cfg, self.state
        if self.accelerator.is_main_process:
            ckpt.clean_partial(self.out)
        trackers.start(cfg, self.accelerator, self.tracker_names, _public_config(cfg))
        self.logger.start(state.global_step, keep_until=resumed_at)
        log.info("training for %d optimizer steps (%d micro-batches of %d rows per step, %d process(es))",
                 self.total_steps, cfg.grad_accum, cfg.micro_batch_size, self.accelerator.num_processes)
        window = _Window()
        evaluated_at = -1
        try:
            with StopFlag() as stop:
                while state.global_step < self.total_steps:
                    epoch = state.epoch
                    mbs, nxt, epoch_end = self.plan.next_step(Position(state.epoch, state.index))
                    start = time.perf_counter()
                    with self.profiler.step(state.global_step + 1):
                        out = self._fitting_step(mbs)
                    seconds = time.perf_counter() - start
                    state.global_step += 1
                    state.epoch, state.index = nxt.epoch, nxt.index
                    state.tokens_seen += out["tokens"]
                    state.trained_tokens_seen += out["num_items"]
                    state.train_seconds += seconds
                    window.add(out, seconds)
                    step = state.global_step
                    signum = self._signal_on_any_rank(stop.signum)  # all processes stop after the same step
                    if step % cfg.logging_steps == 0 or step == self.total_steps or signum:
                        self._log_window(window, nxt)
                        window = _Window()
                    else:
                        self.logger.advance(step)
                    self._release_memory(step, epoch_end)
                    if signum and step < self.total_steps:
                        path = self.save_checkpoint(resumable=True)
                        raise TrainingInterrupted(signum, path, step)
                    epoch_step = self.plan.steps_done_in_epoch(nxt, epoch_end, epoch)
                    if self._evaluate_and_save(step, epoch_step, self.plan.steps_in_epoch(epoch)):
                        evaluated_at = step
                    if self.best.patience_ran_out:
                        log.info(self.best.stop_message())
                        break
            if self.eval_rows is not None and evaluated_at != state.global_step:
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

    def _release_memory(self, step: int, epoch_end: bool = False) -> None:
        """gc_collect_steps / torch_empty_cache_steps (or gc_steps for both) after `step`."""
        cfg = self.cfg
        collect = cfg.gc_collect_steps if cfg.gc_collect_steps is not None else cfg.gc_steps
        empty = cfg.torch_empty_cache_steps if cfg.torch_empty_cache_steps is not None else cfg.gc_steps
        if collect and (step % collect == 0 if collect > 0 else epoch_end):
            _gc_collect()
        if empty and step % empty == 0:
            _empty_cuda_cache()

    def _checkpoint_requested(self, step: int) -> bool:
        """dynamic_checkpoint: whether the trigger file appeared (looked for by the first process every
        check_interval steps, the answer shared so that all processes save); the file is then removed."""
        request = self.cfg.dynamic_checkpoint
        if request is None or not request.enabled or step % request.check_interval:
            return False
        trigger = self.out / (request.trigger_file_path or "axolotl_checkpoint.save")
        main = self.accelerator.is_main_process
        if not collectives.sum_floats([float(main and trigger.exists())])[0]:
            return False
        if main:
            trigger.unlink(missing_ok=True)
        log.info("checkpoint requested by %s", trigger)
        return True

    def _evaluate_and_save(self, step: int, epoch_step: int, in_epoch: int) -> bool:
        """The evaluation and checkpoint due after `step` (load_best_model_at_end: a checkpoint at every new
        best evaluation too); True when it evaluated."""
        requested = self._checkpoint_requested(step)  # looked at even when a save is due: one request, one file
        save = requested or (self.save_cadence and self.save_cadence.due(step, epoch_step, in_epoch)) or (
            self.cfg.save_first_step and step == 1)
        evaluate = bool(self.eval_cadence and self.eval_cadence.due(step, epoch_step, in_epoch))
        if evaluate and self.best.update(self.evaluate()) and self.cfg.load_best_model_at_end:
            self.best.checkpoint, save = str(ckpt.checkpoint_dir(self.out, step)), True  # saved with the state
        if save:
            self.save_checkpoint()
        return evaluate

    def _fitting_step(self, mbs: list[MicroBatch]) -> dict:
        """The optimizer step over `mbs`, each cut into `state.micro_batch_splits` pieces; after running out of
        memory, the same step again in pieces half as large where auto_find_batch_size allows (engine/memory.py)."""
        while True:
            pieces = memory.split(mbs, self.state.micro_batch_splits)
            self._phase = "forward/backward pass"  # moving the batches to the device counts as its start
            try:
                return self._optimizer_step([self._batch(self.train_rows, mb, training=True) for mb in pieces])
            except torch.OutOfMemoryError:
                phase = self._phase
            # Out of the except clause: the exception's frames, which hold the step's activations, are gone.
            self._out_of_memory(phase, pieces)

    def _out_of_memory(self, phase: str, pieces: list[MicroBatch]) -> None:
        """Drop the failed step's gradients; then return to retry it in smaller micro-batches, or stop with a
        diagnosis, keeping the last completed step in a checkpoint where that state is intact."""
        self.optimizer.zero_grad(set_to_none=True)
        memory.release()
        blocked = self._retry_blocked(pieces)
        step = self.state.global_step + 1
        if phase != memory.UPDATE and self.cfg.auto_find_batch_size and blocked is None:
            self.state.micro_batch_splits *= 2
            log.warning("step %d ran out of memory in its %s; auto_find_batch_size: retrying it with each micro-batch "
                        "in %d pieces (the same rows per step, so the same update)", step, phase,
                        self.state.micro_batch_splits)
            return
        saved = self._keep_completed_step() if phase != memory.UPDATE else None
        largest = max(pieces, key=len)
        raise memory.OutOfMemory(memory.diagnosis(
            self.cfg, step=step, phase=phase, rows=len(largest),
            tokens=sum(self.train_rows.lengths[i] for row in largest for i in row), retry_blocked=blocked, saved=saved))

    def _keep_completed_step(self) -> str | None:
        """After running out of memory outside the optimizer update: the checkpoint of the last completed step
        (saved now unless it exists). Single-process runs only: the other processes of a data-parallel run
        are blocked in a collective and would not join the save."""
        if self.accelerator.num_processes > 1 or self.state.global_step == 0:
            return None
        done = ckpt.checkpoint_dir(self.out, self.state.global_step)
        return str(done if self.last_checkpoint == done else self.save_checkpoint(resumable=True))

    def _retry_blocked(self, pieces: list[MicroBatch]) -> str | None:
        """Why auto_find_batch_size cannot retry this step in smaller micro-batches (None: it can)."""
        if self.accelerator.num_processes > 1:
            return "it retries single-process runs only (the other processes would wait in the gradient all-reduce)"
        if not self.objective.splits_micro_batches:
            return f"{self.objective.name}'s loss depends on which rows share a micro-batch"
        if max(len(p) for p in pieces) == 1:
            return "the micro-batches are down to one row each"
        return None

    def _optimizer_step(self, batches: list[Batch]) -> dict:
        acc, objective = self.accelerator, self.objective
        self.runner.train()
        self._phase = "generation"
        batches = objective.rollout_step(self._generation_model(), batches)
        self._phase = "forward/backward pass"
        num_items = int(collectives.sum_floats([float(sum(objective.num_items(b) for b in batches))])[0])
        sums: dict[str, float] = defaultdict(float)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with self._micro_batch_context(last), acc.autocast() if self.sharded else contextlib.nullcontext():
                loss, metrics = self.runner(objective.loss, batch, num_items)
                acc.backward(loss * acc.num_processes)
            for k, v in metrics.items():
                sums[k] += v
        keys = collectives.union_keys(sums)  # a rank may lack a key (e.g. it skipped a micro-batch)
        sums = dict(zip(keys, collectives.sum_floats([sums.get(k, 0.0) for k in keys]), strict=True))
        grad_norm = self._clip_gradients()
        summary = objective.summarize(sums, num_items)
        lr = self.scheduler.get_last_lr()[0]
        # Before the update: a non-finite loss or gradient must never reach the weights.
        self.watchdog.check(summary.get("loss", 0.0), None if self.precision == "fp16" else grad_norm,
                            self.state.global_step + 1, lr, str(self.last_checkpoint) if self.last_checkpoint else None)
        self._phase = memory.UPDATE
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "sums": sums, "num_items": num_items, "grad_norm": grad_norm, "lr": lr,
            "tokens": sum(b["num_tokens"] for b in batches),
            "flops": sum(self.flops.step_flops(b["num_tokens"], b["sum_sq_lengths"]) for b in batches),
        }

    def _clip_gradients(self) -> float:
        max_norm = self.cfg.max_grad_norm or float("inf")
        if self.sharded:
            return fsdp.clip_grad_norm(self.trainable, max_norm)
        norm = self.accelerator.clip_grad_norm_(self.trainable, max_norm)
        return float(norm) if norm is not None else float("nan")

    def _signal_on_any_rank(self, signum: int | None) -> int:
        """The stop signal received by any process (0: none). A signal may reach one process only, or the
        processes at different points of a step; without agreeing, one would stop and save while another
        waited in the next step's gradient all-reduce forever."""
        return int(collectives.max_float(float(signum or 0)))

    def _batch(self, rows: _Rows, mb: MicroBatch, *, training: bool) -> Batch:
        batch = self.objective.collate(rows.rows(mb), self.pad_id, training=training)
        lengths = [rows.lengths[i] for row in mb for i in row]
        device = self.accelerator.device
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        batch["num_tokens"] = sum(lengths)
        batch["sum_sq_lengths"] = sum(n * n for n in lengths)
        return batch

    # ------------------------------------------------------------------------------------------ schedule
    def _eval_cadence(self) -> Cadence | None:
        cfg = self.cfg
        if self.eval_rows is None:
            return None
        chosen = self.plan.cadence(cfg.eval_steps, cfg.evals_per_epoch)
        if chosen is None and cfg.eval_strategy == "steps":
            return Cadence(every=DEFAULT_EVERY)
        return chosen or Cadence(per_epoch=1)  # default: at the end of every epoch

    def _save_cadence(self) -> Cadence | None:
        cfg = self.cfg
        if cfg.save_strategy == "no":
            return None
        chosen = self.plan.cadence(cfg.save_steps, cfg.saves_per_epoch)
        if chosen is None and cfg.save_strategy == "epoch":
            return Cadence(per_epoch=1)
        return chosen or Cadence(every=DEFAULT_EVERY)

    # ------------------------------------------------------------------------------------------ logging
    def _log_window(self, window: _Window, pos: Position) -> None:
        summary = self.objective.summarize(window.sums, window.items)
        record = {
            "type": "train",
            "step": self.state.global_step,
            "epoch": round(self.plan.epoch_progress(pos), 4),
            **summary,
            "lr": window.lr,
            "grad_norm": window.grad_norm(),
            "tokens": window.tokens,
            "trained_tokens": window.items,
            "tokens_per_second": window.tokens / max(window.seconds, 1e-9),
            "total_tokens": self.state.tokens_seen,
            "step_time": window.seconds / max(window.steps, 1),
        }
        if self.peak:
            record["mfu"] = window.flops / (window.seconds * self.peak)
        self.last_train = record
        self.logger.train_step(record)

    # ------------------------------------------------------------------------------------------ eval
    def eval_batches(self) -> list[MicroBatch]:
        """This rank's evaluation micro-batches, in dataset order (planned once)."""
        from tuneforge.data.batches import plan_epoch

        if self._eval_plan is not None:
            return self._eval_plan
        cfg, acc = self.cfg, self.accelerator
        planned = plan_epoch(
            self.eval_rows.lengths, epoch=0, seed=cfg.seed,
            micro_batch_size=cfg.eval_batch_size or self.objective.rows_per_micro_batch(),
            packed=cfg.packing_for_eval, capacity=cfg.eval_sequence_len or cfg.sequence_len, shuffle=False,
            group_size=cfg.sample_packing_group_size, max_docs=cfg.sample_packing_bin_size,
        )
        self._eval_plan = planned[acc.process_index :: acc.num_processes]
        self._eval_filler = planned[:1]
        return self._eval_plan

    def _eval_padding(self) -> list[MicroBatch]:
        """FSDP2: every forward gathers parameters with all processes, so each runs as many evaluation forwards
        as the process with the most batches; the extra ones repeat a batch and are not counted."""
        if not self.sharded:
            return []
        missing = int(collectives.max_float(len(self.eval_batches()))) - len(self.eval_batches())
        return self._eval_filler * missing

    def evaluate(self) -> dict:
        """Token-weighted loss, perplexity and accuracy over the whole eval set; logged and returned. Out of
        memory there, the last completed step is kept and the run stops with what to change."""
        try:
            return self._evaluate()
        except torch.OutOfMemoryError:
            pass
        memory.release()
        raise memory.OutOfMemory(memory.diagnosis(self.cfg, step=self.state.global_step, phase=memory.EVALUATION,
                                                  rows=0, tokens=0, retry_blocked=None,
                                                  saved=self._keep_completed_step()))

    @torch.no_grad()
    def _evaluate(self) -> dict:
        if self.cfg.gc_collect_steps == -1:
            _gc_collect()
        inner = self.accelerator.unwrap_model(self.runner)  # no DDP: ranks may see different batch counts
        inner.eval()
        sums: dict[str, float] = defaultdict(float)
        with self.accelerator.autocast():
            for mb in self.eval_batches():
                batch = self._batch(self.eval_rows, mb, training=False)
                for k, v in inner(self.objective.evaluate, batch).items():
                    sums[k] += v
            for mb in self._eval_padding():
                inner(self.objective.evaluate, self._batch(self.eval_rows, mb, training=False))  # not counted
            samples = self._samples()
            predictions = self._predictions()
        inner.train()
        keys = collectives.union_keys(sums)  # a rank may lack a key (e.g. it skipped a micro-batch)
        sums = dict(zip(keys, collectives.sum_floats([sums.get(k, 0.0) for k in keys]), strict=True))
        summary = self.objective.summarize_eval(sums)
        if predictions is not None:
            summary.update(text_metrics.score(self.cfg.eval_causal_lm_metrics, [p for p, _ in predictions],
                                              [r for _, r in predictions]))
        record = {"type": "eval", "step": self.state.global_step,
                  "epoch": round(self.plan.epoch_progress(Position(self.state.epoch, self.state.index)), 4),
                  **{f"eval_{k}": v for k, v in summary.items()}}
        self.last_eval = record
        self.logger.eval_result(record)
        self._log_samples(samples)
        return record

    def _samples(self) -> list[dict]:
        """generate_samples: the objective's samples for the first evaluation documents (first process)."""
        cfg = self.cfg
        if not cfg.generate_samples or not self.accelerator.is_main_process:
            return []
        count = min(cfg.num_generation_samples, len(self.eval_rows.lengths))
        documents = [row[0] for row in self.eval_rows.rows([[i] for i in range(count)])]
        return self.objective.samples(self.model, self.tokenizer, documents)

    def _predictions(self) -> list[tuple[str, str]] | None:
        """do_causal_lm_eval: (completion, reference) of every evaluation document, each process generating for
        its own evaluation batches, gathered on all processes (corpus scores do not depend on the order)."""
        if not self.cfg.do_causal_lm_eval:
            return None
        documents = [doc for mb in self.eval_batches() for row in self.eval_rows.rows(mb) for doc in row]
        mine = self.objective.predictions(self.model, self.tokenizer, documents)
        return [pair for part in collectives.gather_objects(mine) for pair in part]

    def _log_samples(self, samples: list[dict]) -> None:
        """Each sample in the log and, with its step, in output_dir/samples.jsonl."""
        step = self.state.global_step
        for sample in samples:
            log.info("sample at step %d: %r -> %r (reference %r)", step, sample["prompt"][-80:],
                     sample["completion"], sample["reference"])
        if samples:
            with (self.out / "samples.jsonl").open("a") as f:
                f.writelines(json.dumps({"step": step, **sample}) + "\n" for sample in samples)

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, resumable: bool = False) -> Path:
        """Write checkpoint-<step>; `resumable` forces optimizer state even with save_only_model."""
        state = {
            **asdict(self.state),
            "total_steps": self.total_steps,
            "watchdog": self.watchdog.state_dict(),
            "best": self.best.state_dict(),
            "plan": self._plan_signature(),
        }
        only_model = self.cfg.save_only_model and not resumable
        path = ckpt.save_checkpoint(
            self.out, self.state.global_step, model=self.model, tokenizer=self.tokenizer, optimizer=self.optimizer,
            scheduler=self.scheduler, state=state, only_model=only_model, accelerator=self.accelerator,
            safe=self.cfg.save_safetensors, objective_state=None if only_model else self.objective.state_dict(),
            sharded=self.runner if self.sharded else None,
            sharded_full_weights=self.sharded and self.cfg.fsdp_config.state_dict_type == "FULL_STATE_DICT",
        )
        if self.accelerator.is_main_process:
            ckpt.rotate(self.out, self.cfg.save_total_limit, keep=(path, self.best.checkpoint_path()))
        self.last_checkpoint = path
        log.info("saved %s", path)
        return path

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
        if self.sharded:
            from tuneforge.distributed import sharded_checkpoint

            sharded_checkpoint.load(path, self.runner, None, with_optimizer=False)
        else:
            ckpt.load_weights(path, self.model, self.adapter)
        self.last_eval = best.record
        log.info("load_best_model_at_end: the final model is %s's (%s %.4g)", path.name, best.metric, best.value)

    def _plan_signature(self) -> dict:
        c = self.cfg
        return {"rows": len(self.train_rows.lengths), "seed": c.seed, "micro_batch_size": c.micro_batch_size,
                "grad_accum": c.grad_accum, "sample_packing": c.sample_packing, "sequence_len": c.sequence_len,
                "group_by_length": c.group_by_length, "curriculum_sampling": c.curriculum_sampling,
                "batch_flattening": c.batch_flattening,
                "world_size": self.accelerator.num_processes}

    def _resume_path(self) -> Path | None:
        cfg = self.cfg
        if cfg.resume_from_checkpoint:
            path = Path(cfg.resolve_path(cfg.resume_from_checkpoint) or cfg.resume_from_checkpoint)
            if not path.is_dir():
                raise TuneforgeError(f"resume_from_checkpoint: {cfg.resume_from_checkpoint} does not exist.")
            return path
        if cfg.auto_resume_from_checkpoints:
            return ckpt.latest_checkpoint(self.out)
        return None

    def _resume(self) -> int | None:
        """Restore everything from the checkpoint to resume from, if any; returns its step."""
        path = self._resume_path()
        if path is None:
            return None
        saved = ckpt.load_training_state(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                         process_index=self.accelerator.process_index, adapter=self.adapter,
                                         sharded=self.runner if self.sharded else None)
        saved["index"] = _index_for_world(saved, self.accelerator.num_processes)
        fields = TrainState.__dataclass_fields__
        self.state = TrainState(**{k: saved[k] for k in fields if k in saved})
        self.watchdog.load_state_dict(saved.get("watchdog", {}))
        self.best.load_state_dict(saved.get("best", {}))
        self.objective.load_state_dict(saved.get("objective", {}))
        then = saved.get("plan", {})
        changed = {k: (v, then.get(k)) for k, v in self._plan_signature().items() if then.get(k) != v}
        now = self._plan_signature()
        if then.get("grad_accum", 0) * then.get("world_size", 0) == now["grad_accum"] * now["world_size"]:
            changed.pop("grad_accum", None)  # another process count, the same micro-batches per step
            changed.pop("world_size", None)
        if changed:
            log.warning("resuming with different data settings %s (now, then): the data order after resume will "
                        "not match the original run", changed)
        if self.state.global_step >= self.total_steps:
            raise TuneforgeError(
                f"{path} is at step {self.state.global_step}, and this config trains {self.total_steps} steps in all: "
                "nothing left to train. Raise num_epochs or max_steps to continue training from it.")
        self.last_checkpoint = path
        log.info("resumed from %s: step %d, epoch %d, micro-batch %d", path, self.state.global_step,
                 self.state.epoch, self.state.index)
        return self.state.global_step


class _Window:
    """Totals over the steps between two log lines."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.items = 0
        self.tokens = 0
        self.seconds = 0.0
        self.flops = 0.0
        self.steps = 0
        self.norms: list[float] = []
        self.lr = 0.0

    def add(self, out: dict, seconds: float) -> None:
        for k, v in out["sums"].items():
            self.sums[k] += v
        self.items += out["num_items"]
        self.tokens += out["tokens"]
        self.flops += out["flops"]
        self.seconds += seconds
        self.steps += 1
        self.lr = out["lr"]
        if out["grad_norm"] is not None and math.isfinite(out["grad_norm"]):
            self.norms.append(out["grad_norm"])

    def grad_norm(self) -> float | None:
        return sum(self.norms) / len(self.norms) if self.norms else None


def _generates(objective: Objective) -> bool:
    """Whether the objective generates during a step (an online method overrides the rollout hooks)."""
    kind = type(objective)
    return kind.rollout_step is not Objective.rollout_step or kind.rollout is not Objective.rollout


def _index_for_world(saved: dict, world: int) -> int:
    """The data position's micro-batch index for `world` processes. Each process trains every world-th
    micro-batch of an epoch's plan, so a checkpoint of `then` processes at index i has consumed the plan's
    first i * then micro-batches; with another count, the run continues after exactly those."""
    then, index = int(saved.get("world_size", world)), int(saved.get("index", 0))
    if then == world:
        return index
    consumed = index * then
    if consumed % world:
        raise TuneforgeError(
            f"the checkpoint was written by {then} processes after {consumed} micro-batches of its epoch, which {world} "
            f"processes cannot split evenly; resume on a process count that divides {consumed}.")
    log.info("resuming a %d-process checkpoint on %d processes: the same data position (%d micro-batches of the "
             "epoch done); keep micro_batch_size x gradient_accumulation_steps x processes as before for the same "
             "updates", then, world, consumed)
    return consumed // world


def _gc_collect() -> None:
    gc.collect()


def _empty_cuda_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _accelerator(cfg: Config, precision: str, trackers_: list[str], out: Path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is not None and current != precision and hasattr(AcceleratorState, "_reset_state"):
        # accelerate keeps its state in a process-wide singleton that refuses a new precision; one process
        # may train several times (tests, notebooks), so start it afresh (accelerate's own tests do this).
        AcceleratorState._reset_state(reset_partial_state=False)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.ddp_find_unused_parameters,
                                        **({"bucket_cap_mb": cfg.ddp_bucket_cap_mb} if cfg.ddp_bucket_cap_mb else {}))
    return Accelerator(mixed_precision=precision, log_with=trackers_ or None, project_dir=str(out / "runs"),
                       cpu=not torch.cuda.is_available(),  # several CPU processes: gloo data parallelism
                       kwargs_handlers=[ddp])


def _public_config(cfg: Config) -> dict:
    from tuneforge.config import dump

    return dump(cfg)
