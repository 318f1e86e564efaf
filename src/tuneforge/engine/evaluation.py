"""Evaluation: the objective's metrics over the whole evaluation set, and generation during evaluation.

- Metrics: every process evaluates its share of the evaluation micro-batches (planned once, in dataset
  order); the objective's sums are added over processes and summarized into token-weighted `eval_*` values.
- `generate_samples`: the objective's completions for the first evaluation documents, logged and appended
  with their step to output_dir/samples.jsonl (first process only).
- `do_causal_lm_eval`: a greedy continuation of every evaluation document, scored against its reference
  with corpus metrics (BLEU, chrF, TER; `text_metrics.py`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import torch

from tuneforge.config.schema import Config
from tuneforge.distributed import collectives
from tuneforge.methods.base import Objective

from . import text_metrics
from .plan import MicroBatch
from .rows import RowSource, device_batch
from .samples_writer import SamplesWriter

log = logging.getLogger("tuneforge")


class Evaluator:
    def __init__(self, cfg: Config, objective: Objective, rows: RowSource, *, accelerator, generation_model, tokenizer,
                 pad_id: int, rows_per_micro_batch: int, output_dir: Path, sharded: bool = False):
        self.cfg = cfg
        self.objective = objective
        self.rows = rows
        self.accelerator = accelerator
        # () -> the model generation runs on, outside the data-parallel wrapper: the model itself, or under FSDP2
        # a whole copy refreshed from the shards (a collective: every process calls it at the same point)
        self.generation_model = generation_model
        self.tokenizer = tokenizer
        self.pad_id = pad_id
        self.rows_per_micro_batch = rows_per_micro_batch
        self.output_dir = output_dir
        self.sharded = sharded  # FSDP2: every process runs as many forwards as the one with the most batches
        self._plan: list[MicroBatch] | None = None
        self._filler: list[MicroBatch] = []
        if cfg.do_causal_lm_eval:
            text_metrics.require_sacrebleu(cfg.eval_causal_lm_metrics)

    def batches(self) -> list[MicroBatch]:
        """This process's evaluation micro-batches, in dataset order (planned once)."""
        from tuneforge.data.batches import plan_epoch

        if self._plan is not None:
            return self._plan
        cfg, acc = self.cfg, self.accelerator
        planned = plan_epoch(
            self.rows.lengths, epoch=0, seed=cfg.seed,
            micro_batch_size=cfg.eval_batch_size or self.rows_per_micro_batch,
            packed=cfg.packing_for_eval, capacity=cfg.eval_sequence_len or cfg.sequence_len, shuffle=False,
            group_size=cfg.sample_packing_group_size, max_docs=cfg.sample_packing_bin_size,
        )
        self._plan = planned[acc.process_index :: acc.num_processes]
        self._filler = planned[:1]
        return self._plan

    def _padding(self) -> list[MicroBatch]:
        """FSDP2: every forward gathers parameters with all processes, so each runs as many evaluation forwards
        as the process with the most batches; the extra ones repeat a batch and are not counted."""
        if not self.sharded:
            return []
        missing = int(collectives.max_float(len(self.batches()))) - len(self.batches())
        return self._filler * missing

    @torch.no_grad()
    def run(self, runner, *, step: int, epoch: float) -> tuple[dict, list[dict]]:
        """The evaluation record of `step` (`type: eval`, `eval_*` metrics) and the generated samples."""
        inner = self.accelerator.unwrap_model(runner)  # no DDP: processes may see different batch counts
        inner.eval()
        sums: dict[str, float] = defaultdict(float)
        padding = self._padding()  # a collective: before any forward, which under FSDP2 gathers with all processes
        with self.accelerator.autocast():
            for mb in self.batches():
                batch = self._device_batch(mb)
                for k, v in inner(self.objective.evaluate, batch).items():
                    sums[k] += v
            for mb in padding:
                inner(self.objective.evaluate, self._device_batch(mb))  # not counted
            model = self.generation_model() if self.cfg.eval_generates else None
            if model is not None:
                model.eval()  # FSDP2's whole copy too (only generation uses it); inner.train() below resets the model
            samples = self._samples(model)
            predictions = self._predictions(model)
        inner.train()
        keys = collectives.union_keys(sums)  # a process may lack a key (e.g. it skipped a micro-batch)
        sums = dict(zip(keys, collectives.sum_floats([sums.get(k, 0.0) for k in keys]), strict=True))
        summary = self.objective.summarize_eval(sums)
        if predictions is not None:
            summary.update(text_metrics.score(self.cfg.eval_causal_lm_metrics, [p for p, _ in predictions],
                                              [r for _, r in predictions]))
        record = {"type": "eval", "step": step, "epoch": round(epoch, 4),
                  **{f"eval_{k}": v for k, v in summary.items()}}
        return record, samples

    def _device_batch(self, mb: MicroBatch):
        return device_batch(self.objective, self.rows, mb, pad_id=self.pad_id, device=self.accelerator.device,
                            training=False)

    def _samples(self, model) -> list[dict]:
        """generate_samples: the objective's samples for the first evaluation documents (first process)."""
        cfg = self.cfg
        if not cfg.generate_samples or not self.accelerator.is_main_process:
            return []
        count = min(cfg.num_generation_samples, len(self.rows.lengths))
        documents = [row[0] for row in self.rows.rows([[i] for i in range(count)])]
        return self.objective.samples(model, self.tokenizer, documents)

    def _predictions(self, model) -> list[tuple[str, str]] | None:
        """do_causal_lm_eval: (completion, reference) of every evaluation document, each process generating for
        its own evaluation batches, gathered on all processes (corpus scores do not depend on the order)."""
        if not self.cfg.do_causal_lm_eval:
            return None
        documents = [doc for mb in self.batches() for row in self.rows.rows(mb) for doc in row]
        mine = self.objective.predictions(model, self.tokenizer, documents)
        return [pair for part in collectives.gather_objects(mine) for pair in part]

    def write_samples(self, samples: list[dict], step: int) -> None:
        """Each sample in the log and, with its step, in output_dir/samples.jsonl."""
        for sample in samples:
            log.info("sample at step %d: %r -> %r (reference %r)", step, sample["prompt"][-80:],
                     sample["completion"], sample["reference"])
        SamplesWriter(self.output_dir / "samples.jsonl").write({"step": step, **sample} for sample in samples)
