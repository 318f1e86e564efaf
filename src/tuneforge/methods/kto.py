"""KTO (`rl: kto`): unpaired completions labelled desirable or undesirable, with a reference model (TRL's KTOTrainer).

With h = log pi(y|x) - log pi_ref(y|x) (summed over the completion) and the reference point

  z0 = max(0, mean over the micro-batch of [log pi(y'|x) - log pi_ref(y'|x)])   (detached)

estimated on mismatched pairs (x, y'), each example's loss is

  desirable:   lambda_D (1 - sigmoid(beta (h - z0)))       lambda_D = kto_desirable_weight (1.0)
  undesirable: lambda_U (1 - sigmoid(beta (z0 - h)))       lambda_U = kto_undesirable_weight (1.0)

and the loss is their mean. The mismatched completion of each row is fixed when the data is prepared,
as TRL does: rows are taken in dataset order in chunks of `micro_batch_size`, and each prompt gets the
completion of the previous row of its chunk (the first row gets the last one's). So micro_batch_size
must be at least 2. The KL pass runs the policy without gradients, separately from the main forward.
Under data parallelism z0 is averaged over the processes, as in TRL.
Logged: kl, rewards/chosen and logps/chosen (desirable rows), rewards/rejected and logps/rejected
(undesirable rows), rewards/margins.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from tuneforge.config.schema import Config
from tuneforge.distributed import collectives

from .base import Batch, Objective, config_error
from .pairs import batch_shape, layout, sequence_logps, sub_batch
from .preference import beta_of, map_splits, prepare_checked
from .reference import Reference, disable_dropout, precompute_columns

log = logging.getLogger("tuneforge")

KL_PREFIX = "kl_"


def add_kl_completions(ds, chunk: int, max_len: int):
    """`kl_input_ids`/`kl_labels`: row i's prompt + row (i-1)'s completion, within chunks of `chunk` rows.

    `length` becomes max(main, KL) tokens, so a packed row of examples fits both of its forward passes.
    """

    def rotate(batch: dict[str, list]) -> dict[str, list]:
        ids, labels, cut = batch["input_ids"], batch["labels"], batch["prompt_len"]
        n = len(ids)
        kl_ids, kl_labels = [], []
        for i in range(n):
            j = (i - 1) % n
            prompt = ids[i][: cut[i]]
            kl_ids.append((prompt + ids[j][cut[j]:])[:max_len])
            kl_labels.append(([-100] * len(prompt) + labels[j][cut[j]:])[:max_len])
        batch["kl_input_ids"], batch["kl_labels"] = kl_ids, kl_labels
        batch["length"] = [max(len(a), len(b)) for a, b in zip(ids, kl_ids, strict=True)]
        return batch

    return ds.map(rotate, batched=True, batch_size=chunk, desc="KTO mismatched pairs", load_from_cache_file=False)


def collate_kto(rows: list[list[dict]], pad_id: int, *, pad_to: int | None = None,
                multiple_of: int | None = None) -> Batch:
    """Two layouts of the same rows: the examples, and (prefixed kl_) their mismatched KL sequences."""
    docs = [d for row in rows for d in row]
    main = layout([[(d["input_ids"], d["labels"]) for d in row] for row in rows], pad_id, pad_to=pad_to,
                  multiple_of=multiple_of)
    batch = {**main, "label": torch.tensor([bool(d["label"]) for d in docs]), "num_examples": len(docs)}
    if docs and "kl_input_ids" in docs[0]:
        batch.update(layout([[(d["kl_input_ids"], d["kl_labels"]) for d in row] for row in rows], pad_id,
                            pad_to=pad_to, multiple_of=multiple_of, prefix=KL_PREFIX))
    for key in ("ref_logps", "ref_kl_logps"):
        if docs and docs[0].get(key) is not None:
            batch[key] = torch.tensor([float(d[key]) for d in docs], dtype=torch.float32)
    return batch


class KTOObjective(Objective):
    name = "kto"
    splits_micro_batches = False  # z0 is a mean over the micro-batch
    row_columns = ("input_ids", "labels", "label", "kl_input_ids", "kl_labels", "ref_logps", "ref_kl_logps")

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.beta = beta_of(cfg)
        self.w_d, self.w_u = float(cfg.kto_desirable_weight), float(cfg.kto_undesirable_weight)
        if cfg.micro_batch_size < 2:
            raise config_error("micro_batch_size", "KTO estimates its reference point from mismatched pairs within "
                               "a batch of examples; set micro_batch_size to 2 or more.")
        self.reference = Reference(cfg)
        self._ready: set[int] = set()

    # ---- data
    def prepare_data(self, tokenizer, *, rebuild: bool = False):
        data = prepare_checked(self.cfg, tokenizer, self.reference, ("label", "prompt_len"),
                               "KTO trains on completions labelled desirable/undesirable",
                               "Use a KTO dataset type (chatml.intel, llama3.argilla, ...), a dict type with "
                               "field_completion/field_label, or rows with prompt/completion/label.", rebuild=rebuild)
        def balanced_with_kl(ds, split):
            self._check_balance(ds, split)
            return add_kl_completions(ds, self.cfg.micro_batch_size, self.cfg.sequence_len)

        map_splits(data, balanced_with_kl)
        if self.cfg.precompute_ref_log_probs:
            splits = precompute_columns(
                self.cfg, tokenizer, {"train": data.train, "eval": data.eval},
                ("input_ids", "labels", "label", "kl_input_ids", "kl_labels"),
                lambda rows: collate_kto(rows, tokenizer.pad_token_id or 0), self._reference_columns,
                data.cache_dir, "kto", {"chunk": self.cfg.micro_batch_size, "max_len": self.cfg.sequence_len},
            )
            data.train, data.eval = splits["train"], splits["eval"]
        return data

    def _check_balance(self, ds, split: str) -> None:
        if split != "train":
            return
        labels = ds["label"]
        n_d = max(sum(1 for x in labels if x), 1)
        n_u = max(len(labels) - n_d, 1)
        ratio = self.w_d * n_d / (self.w_u * n_u)
        if not 1.0 <= ratio <= 4 / 3 and n_d != n_u:
            log.warning("KTO: %d desirable and %d undesirable rows with weights %.3g/%.3g give lambda_D n_D / "
                        "(lambda_U n_U) = %.2f; the KTO paper recommends 1 to 4/3 (adjust kto_desirable_weight or "
                        "kto_undesirable_weight).", n_d, n_u, self.w_d, self.w_u, ratio)

    @staticmethod
    def _reference_columns(net, batch: Batch) -> dict[str, torch.Tensor]:
        return {"ref_logps": sequence_logps(net, batch).logps,
                "ref_kl_logps": sequence_logps(net, sub_batch(batch, KL_PREFIX)).logps}

    def collate(self, rows: list[list[dict]], pad_id: int, *, training: bool) -> Batch:
        _, pad_to = batch_shape(self.cfg, training)
        return collate_kto(rows, pad_id, pad_to=pad_to, multiple_of=self.cfg.pad_to_multiple_of)

    def num_items(self, batch: Batch) -> int:
        return int(batch["num_examples"])

    # ---- loss
    def _kl(self, model, batch: Batch) -> torch.Tensor:
        kl_batch = sub_batch(batch, KL_PREFIX)
        with torch.no_grad():
            policy = sequence_logps(model, kl_batch).logps
            ref = self.reference.sequence_logps(model, kl_batch, batch.get("ref_kl_logps"))
            kl = collectives.mean_tensor((policy - ref).mean()).to(policy.device)
        return kl.clamp(min=0)

    def loss(self, model, batch: Batch, num_items: int) -> tuple[torch.Tensor, dict[str, float]]:
        if id(model) not in self._ready:
            disable_dropout(model)
            self._ready.add(id(model))
        kl = self._kl(model, batch)
        logps = sequence_logps(model, batch).logps
        h = logps - self.reference.sequence_logps(model, batch, batch.get("ref_logps"))
        good = batch["label"].to(h.device)
        losses = torch.where(good, self.w_d * (1 - F.sigmoid(self.beta * (h - kl))),
                             self.w_u * (1 - F.sigmoid(self.beta * (kl - h))))
        total = losses.sum()
        rewards = (self.beta * h).detach()
        n = len(h)
        sums = {
            "loss": float(total.detach()), "examples": float(n), "kl": float(kl) * n,
            "desirable": float(good.sum()), "undesirable": float((~good).sum()),
            "rewards/chosen": float(rewards[good].sum()), "rewards/rejected": float(rewards[~good].sum()),
            "logps/chosen": float(logps.detach()[good].sum()), "logps/rejected": float(logps.detach()[~good].sum()),
        }
        return total / max(num_items, 1), sums

    def summarize(self, sums: dict[str, float], num_items: int) -> dict[str, float]:
        n = max(num_items, 1)
        logged = {"loss": sums["loss"] / n, "kl": sums["kl"] / n}
        d, u = sums.get("desirable", 0.0), sums.get("undesirable", 0.0)
        if d:
            logged["rewards/chosen"] = sums["rewards/chosen"] / d
            logged["logps/chosen"] = sums["logps/chosen"] / d
        if u:
            logged["rewards/rejected"] = sums["rewards/rejected"] / u
            logged["logps/rejected"] = sums["logps/rejected"] / u
        if d and u:
            logged["rewards/margins"] = logged["rewards/chosen"] - logged["rewards/rejected"]
        return logged

    def summarize_eval(self, sums: dict[str, float]) -> dict[str, float]:
        return self.summarize(sums, int(sums.get("examples", 1)))
