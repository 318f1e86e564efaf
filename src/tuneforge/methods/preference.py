"""Shared machinery of the offline preference objectives (DPO/IPO, SimPO, ORPO, KTO) and reward models.

Batches. All sequences of a micro-batch go through the model in ONE forward pass. Unpacked, the rows
are [chosen_1 .. chosen_P, rejected_1 .. rejected_P], right-padded (TRL's layout). With `sample_packing`
each packed row holds whole pairs back to back (chosen_i, rejected_i, chosen_j, ...), position ids
restart at every sequence, so no sequence attends to another (see `models/losses.py`), and every
sequence log-prob is the one of the unpacked layout; rows are filled to `sequence_len` instead of being
padded to the longest sequence. `doc_ids` names the sequence of every position (-1 on padding).

Sequence log-probs. The decoder runs once; the LM head runs only at labelled positions, a chunk at a time
and checkpointed (no [B, T, V] logits are kept), and the per-token log-probs are summed per sequence.

Reference model (`Reference`). With an adapter, pi_ref is the same network with the adapter disabled
(PEFT's `disable_adapter()`): no second copy in memory. With full fine-tuning it is a frozen copy,
loaded the way the policy was loaded (same seed, so `reinit_weights` gives the same random init); it is
loaded on first use, from the model source rather than copied from the live model, so that a resumed run
still compares against the initial policy. Reference passes run without gradients and in eval mode.
`precompute_ref_log_probs: true` runs the reference once over the data before training and stores the
log-probs as dataset columns (cached next to the prepared data); then no reference is held at all.
Reference-free methods (SimPO, ORPO, reward models) never build one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tuneforge.config.schema import Config
from tuneforge.data.collate import collate as collate_documents
from tuneforge.errors import DataError
from tuneforge.models.losses import IGNORE_INDEX, LogitHead, decoder_hidden_states

from .base import Batch, Objective

log = logging.getLogger("tuneforge")

PAIR_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
_CHUNK_ELEMENTS = 1 << 26  # fp32 logits per chunk, as in models/losses.py
DEFAULT_BETA = 0.1


def config_error(key: str, message: str) -> Exception:
    from tuneforge.config.errors import ConfigError, ConfigIssue

    return ConfigError([ConfigIssue(key, message)])


def beta_of(cfg: Config, default: float = DEFAULT_BETA) -> float:
    """beta: `trl.beta` wins over `rl_beta` (Axolotl's precedence)."""
    if cfg.trl is not None and cfg.trl.beta is not None:
        return float(cfg.trl.beta)
    return float(cfg.rl_beta) if cfg.rl_beta is not None else default


# ---------------------------------------------------------------- batch layout
Doc = tuple[list[int], list[int]]  # (input_ids, labels)


def layout(rows: list[list[Doc]], pad_id: int, *, pad_to: int | None = None, multiple_of: int | None = None,
           full_targets: bool = False, prefix: str = "") -> Batch:
    """Lay out rows of sequences as the SFT collate does, plus `doc_ids` [B, T] and `doc_last` [D].

    Sequences are numbered row by row. `full_targets` adds `full_target_ids`: every next token of the same
    sequence, labelled or not (ORPO's NLL over prompt + answer).
    """
    docs = [[{"input_ids": ids, "labels": labels} for ids, labels in row] for row in rows]
    batch = collate_documents(docs, pad_id, pad_to=pad_to, multiple_of=multiple_of)
    B, T = batch["input_ids"].shape
    doc_ids = torch.full((B, T), -1, dtype=torch.long)
    last = []
    d = 0
    for b, row in enumerate(rows):
        at = 0
        for ids, _ in row:
            doc_ids[b, at : at + len(ids)] = d
            at += len(ids)
            last.append(b * T + at - 1)
            d += 1
    batch["doc_ids"] = doc_ids
    batch["doc_last"] = torch.tensor(last, dtype=torch.long)
    if full_targets:
        every = [[{"input_ids": ids, "labels": ids} for ids, _ in row] for row in rows]
        batch["full_target_ids"] = collate_documents(every, pad_id, pad_to=pad_to, multiple_of=multiple_of)["target_ids"]
    return {prefix + k: v for k, v in batch.items()}


def sub_batch(batch: Batch, prefix: str) -> Batch:
    """The keys of `batch` that start with `prefix`, without it (a second layout in the same batch)."""
    return {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}


def collate_pairs(rows: list[list[dict]], pad_id: int, *, packed: bool, pad_to: int | None = None,
                  multiple_of: int | None = None, full_targets: bool = False) -> Batch:
    """One forward's worth of pairs: see the module docstring for the two layouts."""
    pairs = [doc for row in rows for doc in row]
    chosen = [(p["chosen_input_ids"], p.get("chosen_labels") or p["chosen_input_ids"]) for p in pairs]
    rejected = [(p["rejected_input_ids"], p.get("rejected_labels") or p["rejected_input_ids"]) for p in pairs]
    n = len(pairs)
    if packed:
        seq_rows, at = [], 0
        for row in rows:
            seq_rows.append([s for k in range(at, at + len(row)) for s in (chosen[k], rejected[k])])
            at += len(row)
        chosen_doc, rejected_doc = torch.arange(0, 2 * n, 2), torch.arange(1, 2 * n, 2)
    else:
        seq_rows = [[s] for s in chosen] + [[s] for s in rejected]
        chosen_doc, rejected_doc = torch.arange(n), torch.arange(n, 2 * n)
    batch = layout(seq_rows, pad_id, pad_to=pad_to, multiple_of=multiple_of, full_targets=full_targets)
    batch.update(chosen_doc=chosen_doc, rejected_doc=rejected_doc, num_pairs=n)
    for key in ("ref_chosen_logps", "ref_rejected_logps", "margin"):
        if pairs and pairs[0].get(key) is not None:
            batch[key] = torch.tensor([float(p[key]) for p in pairs], dtype=torch.float32)
    return batch


def batch_shape(cfg: Config, training: bool) -> tuple[bool, int | None]:
    """(packed, pad_to) for a micro-batch, following the same keys as the SFT collate."""
    packed = cfg.sample_packing if training else cfg.packing_for_eval
    pad = cfg.pad_to_sequence_len or (cfg.pad_to_sequence_len is None and packed)
    pad_to = (cfg.eval_sequence_len or cfg.sequence_len) if not training else cfg.sequence_len
    return packed, pad_to if pad else None


# ---------------------------------------------------------------- sequence log-probs
def _chunk_logps(head: LogitHead, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(head(hidden), targets, reduction="none")


def chunked_token_logps(head: LogitHead, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for each row of `hidden` [N, H], chunk by chunk; logits are recomputed in backward."""
    chunk = max(256, _CHUNK_ELEMENTS // head.vocab)
    parts = []
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_logps, head, h, t, use_reentrant=False))
        else:
            parts.append(_chunk_logps(head, h, t))
    return torch.cat(parts) if parts else hidden.new_zeros((0,), dtype=torch.float32)


@dataclass
class SequenceLogps:
    logps: torch.Tensor  # [D] sum of log-probs of each sequence's labelled tokens
    counts: torch.Tensor  # [D] labelled tokens per sequence
    full_nll: torch.Tensor | None = None  # [D] sum of -log p over every next token (full_targets only)
    full_counts: torch.Tensor | None = None


def sequence_logps(network, batch: Batch, *, full: bool = False) -> SequenceLogps:
    """Per-sequence sums of token log-probs (labelled tokens; with `full` also every token) in one forward."""
    hidden = decoder_hidden_states(network, batch)
    targets = batch["full_target_ids"] if full else batch["target_ids"]
    mask = targets != IGNORE_INDEX
    doc = batch["doc_ids"][mask]
    token_logps = chunked_token_logps(LogitHead(network), hidden[mask], targets[mask])
    n_docs = batch["doc_last"].numel()

    def per_doc(values: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(n_docs, dtype=values.dtype, device=values.device)
        return out.index_add(0, doc[which], values[which])

    if not full:
        every = torch.ones_like(doc, dtype=torch.bool)
        return SequenceLogps(per_doc(token_logps, every), per_doc(torch.ones_like(token_logps), every))
    labelled = batch["target_ids"][mask] != IGNORE_INDEX
    every = torch.ones_like(labelled)
    return SequenceLogps(per_doc(token_logps, labelled), per_doc(torch.ones_like(token_logps), labelled),
                         per_doc(-token_logps, every), per_doc(torch.ones_like(token_logps), every))


def disable_dropout(model) -> None:
    """Zero every dropout layer, as TRL does for its preference trainers (`disable_dropout=True`)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


# ---------------------------------------------------------------- the reference model
def load_reference(cfg: Config, tokenizer, device=None):
    """A frozen copy of the policy's starting point, loaded as `engine.run` loads the policy.

    The seed is reset first (inside a forked RNG, so training randomness is untouched): a random init
    (`reinit_weights`) or resized embeddings come out identical to the policy's.
    """
    from tuneforge.models.load import load_model

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        if devices:
            torch.cuda.manual_seed_all(cfg.seed)
        ref = load_model(cfg, tokenizer)
    ref.requires_grad_(False)
    ref.eval()
    return ref.to(device) if device is not None else ref


class Reference:
    """pi_ref for the on-the-fly case: `with reference.network(model) as net:` runs net under no_grad."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.tokenizer = None  # set by the objective's prepare_data
        self.copy = None

    @contextlib.contextmanager
    def network(self, model) -> Iterator[Any]:
        with torch.no_grad():
            if is_peft_model(model):
                with model.disable_adapter(), eval_mode(model):
                    yield model
                return
            if self.copy is None:
                device = next(model.parameters()).device
                log.info("loading a frozen copy of the model as the reference (full fine-tuning)")
                self.copy = load_reference(self.cfg, self.tokenizer, device)
            yield self.copy

    def sequence_logps(self, model, batch: Batch, cached: torch.Tensor | None) -> torch.Tensor:
        """Per-sequence reference log-probs of `batch`: the precomputed `cached` when given, else a pass."""
        if cached is not None:
            return cached
        with self.network(model) as net:
            return sequence_logps(net, batch).logps


def prepare_checked(cfg: Config, tokenizer, reference: Reference | None, columns: tuple[str, ...], what: str,
                    fix: str, *, rebuild: bool = False):
    """Prepared data of a preference-style method, every split checked for the columns it trains on."""
    from tuneforge.data.pipeline import prepare

    if reference is not None:
        reference.tokenizer = tokenizer
    data = prepare(cfg, tokenizer, rebuild=rebuild)
    def checked(ds, split):
        require_columns(ds, split, columns, what, fix)
        return ds

    map_splits(data, checked)
    return data


def map_splits(data, fn) -> None:
    """Replace each present split (train, eval) of prepared `data` by `fn(dataset, split_name)`."""
    for split in ("train", "eval"):
        ds = getattr(data, split)
        if ds is not None:
            setattr(data, split, fn(ds, split))


# ---------------------------------------------------------------- precomputed reference log-probs
def _reference_key(cfg: Config, family: str, extra: dict[str, Any]) -> str:
    """What decides the reference log-probs besides the tokens: the model source, its init and precision."""
    from tuneforge.models.load import mixed_precision, weights_dtype
    from tuneforge.models.tokenizer import model_source

    src = model_source(cfg)
    files = {}
    if Path(src).is_dir():
        for f in sorted(Path(src).glob("*")):
            if f.suffix in (".safetensors", ".bin", ".json"):
                st = f.stat()
                files[f.name] = [st.st_size, st.st_mtime_ns]
    material = {
        "family": family, "source": src, "revision": cfg.model_revision, "files": files,
        "overrides": cfg.model_config_overrides, "reinit": cfg.reinit_weights, "seed": cfg.seed,
        "dtype": str(weights_dtype(cfg)), "precision": mixed_precision(cfg), "attn": cfg.attn_implementation,
        "model_type": cfg.model_type, **extra,
    }
    blob = json.dumps(material, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def precompute_columns(cfg: Config, tokenizer, splits: dict[str, Any], columns: tuple[str, ...],
                       collate_fn: Callable[[list[list[dict]]], Batch],
                       compute_fn: Callable[[Any, Batch], dict[str, torch.Tensor]],
                       cache_dir: Path | None, family: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the reference once over every split and add its outputs as float columns.

    `collate_fn` builds an unpacked batch from rows of one document; `compute_fn(net, batch)` returns
    per-document tensors named like the new columns. Results are stored as `ref_logps-<key>-<split>.npz`
    in the prepared-data cache entry and reused when the data and the reference are unchanged.
    """
    from accelerate import PartialState

    from tuneforge.data.batches import gather
    from tuneforge.models.load import mixed_precision

    key = _reference_key(cfg, family, extra or {})
    out, net = dict(splits), None
    device = PartialState().device
    precision = mixed_precision(cfg)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                if precision != "no" else contextlib.nullcontext())
    size = max(1, cfg.eval_batch_size or cfg.micro_batch_size)
    for name, ds in splits.items():
        if ds is None:
            continue
        path = Path(cache_dir) / f"ref_logps-{key}-{name}.npz" if cache_dir else None
        values = _load_npz(path, len(ds))
        if values is None:
            if net is None:
                log.info("precomputing reference log-probs (precompute_ref_log_probs)")
                net = load_reference(cfg, tokenizer, device)
            ds_cols = ds.select_columns([c for c in columns if c in ds.column_names])
            parts: dict[str, list[np.ndarray]] = {}
            with torch.no_grad(), autocast:
                for start in range(0, len(ds), size):
                    mb = [[i] for i in range(start, min(start + size, len(ds)))]
                    batch = collate_fn(gather(ds_cols, mb, columns))
                    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    for k, v in compute_fn(net, batch).items():
                        parts.setdefault(k, []).append(v.float().cpu().numpy())
            values = {k: np.concatenate(v) for k, v in parts.items()}
            if path is not None:
                _save_npz(path, values)
        for k, v in values.items():
            if k in ds.column_names:
                ds = ds.remove_columns(k)
            ds = ds.add_column(k, v.astype(np.float64).tolist())
        out[name] = ds
    if net is not None:
        del net
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def _load_npz(path: Path | None, rows: int) -> dict[str, np.ndarray] | None:
    if path is None or not path.exists():
        return None
    try:
        with np.load(path) as f:
            values = {k: f[k] for k in f.files}
    except (OSError, ValueError):
        return None
    if not values or any(len(v) != rows for v in values.values()):
        return None
    log.info("reusing precomputed reference log-probs from %s", path)
    return values


def _save_npz(path: Path, values: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(f".{path.name}.{torch.randint(0, 1 << 30, ()).item()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **values)
    tmp.replace(path)  # atomic: a reader never sees a half-written file


# ---------------------------------------------------------------- data preparation shared by the pair methods
def require_columns(ds, split: str, columns: tuple[str, ...], what: str, fix: str) -> None:
    """Fail with one message when a prepared split lacks the columns an objective trains on."""
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(f"{what}, but the {split} data has no {', '.join(missing)} "
                        f"(columns: {', '.join(ds.column_names)}). {fix}")


def pair_lengths(ds):
    """`length` = chosen + rejected tokens: what a pair puts through the model, and what packing fits."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def count(table: pa.Table) -> pa.Table:
        total = pc.add(pc.list_value_length(table.column("chosen_input_ids")),
                       pc.list_value_length(table.column("rejected_input_ids")))
        return table.set_column(table.schema.get_field_index("length"), "length", total.cast(pa.int64()))

    return ds.with_format("arrow").map(count, batched=True, desc="pair lengths",
                                       load_from_cache_file=False).with_format(None)


def drop_unpackable(ds, cfg: Config, split: str):
    """With sample_packing a pair must fit one packed row: drop (or reject) pairs longer than the row."""
    capacity = cfg.sequence_len if split == "train" else (cfg.eval_sequence_len or cfg.sequence_len)
    lengths = np.asarray(ds["length"])
    too_long = lengths > capacity
    if not too_long.any():
        return ds
    n = int(too_long.sum())
    if cfg.excess_length_strategy == "raise":
        raise DataError(
            f"{split}: {n} pairs have more chosen + rejected tokens than sequence_len {capacity} (longest "
            f"{int(lengths.max())}); with sample_packing a pair is packed whole into one row. Raise sequence_len, "
            "or set excess_length_strategy: drop."
        )
    log.warning("%s: dropped %d of %d pairs whose chosen + rejected tokens exceed sequence_len %d (sample_packing "
                "packs a pair whole into one row; raise sequence_len to keep them)", split, n, len(ds), capacity)
    return ds.select(np.flatnonzero(~too_long))


class PairObjective(Objective):
    """Base of the objectives trained on chosen/rejected pairs; subclasses implement `pair_losses`.

    `num_items` is the number of pairs: the loss of a micro-batch is the sum of its per-pair losses over
    the pairs of the whole optimizer step, so accumulation and data parallelism give the mean over the step.
    Terms that TRL averages over tokens (an NLL on the chosen answers) are averaged over the micro-batch's
    tokens and weighted by its pairs; with one micro-batch per step that is exactly TRL's loss.
    """

    row_columns = (*PAIR_COLUMNS, "margin", "ref_chosen_logps", "ref_rejected_logps")
    uses_reference = False

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.reference = Reference(cfg) if self.uses_reference else None
        self._ready: set[int] = set()

    @property
    def full_targets(self) -> bool:
        """Whether batches carry `full_target_ids` (an NLL over prompt and answer)."""
        return False

    # ---- data
    def prepare_data(self, tokenizer, *, rebuild: bool = False):
        data = prepare_checked(self.cfg, tokenizer, self.reference, ("chosen_input_ids", "rejected_input_ids"),
                               f"{self.name} trains on preference pairs",
                               "Use a preference dataset type such as chatml.intel, chat_template.default, or rows "
                               "with prompt/chosen/rejected.", rebuild=rebuild)
        def lengths_and_packing(ds, split):
            ds = pair_lengths(ds)
            packed = self.cfg.sample_packing if split == "train" else self.cfg.packing_for_eval
            return drop_unpackable(ds, self.cfg, split) if packed else ds

        map_splits(data, lengths_and_packing)
        if self.uses_reference and self.cfg.precompute_ref_log_probs:
            splits = precompute_columns(
                self.cfg, tokenizer, {"train": data.train, "eval": data.eval}, PAIR_COLUMNS,
                lambda rows: collate_pairs(rows, tokenizer.pad_token_id or 0, packed=False),
                self._reference_columns, data.cache_dir, "pairs",
            )
            data.train, data.eval = splits["train"], splits["eval"]
        return data

    @staticmethod
    def _reference_columns(net, batch: Batch) -> dict[str, torch.Tensor]:
        seq = sequence_logps(net, batch)
        return {"ref_chosen_logps": seq.logps[batch["chosen_doc"]], "ref_rejected_logps": seq.logps[batch["rejected_doc"]]}

    def collate(self, rows: list[list[dict]], pad_id: int, *, training: bool) -> Batch:
        packed, pad_to = batch_shape(self.cfg, training)
        return collate_pairs(rows, pad_id, packed=packed, pad_to=pad_to, multiple_of=self.cfg.pad_to_multiple_of,
                             full_targets=self.full_targets)

    def num_items(self, batch: Batch) -> int:
        return int(batch["num_pairs"])

    # ---- loss
    def setup(self, model) -> None:
        """Once per model: no dropout (policy and reference must agree at init, as in TRL)."""
        if id(model) not in self._ready:
            disable_dropout(model)
            self._ready.add(id(model))

    def reference_logps(self, model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        if self.reference is None:
            raise RuntimeError(f"{self.name} has no reference model")
        with self.reference.network(model) as net:
            seq = sequence_logps(net, batch)
        return seq.logps[batch["chosen_doc"]], seq.logps[batch["rejected_doc"]]

    def pair_losses(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """(per-pair loss [P], additive metric sums) for one micro-batch."""
        raise NotImplementedError

    def loss(self, model, batch: Batch, num_items: int) -> tuple[torch.Tensor, dict[str, float]]:
        self.setup(model)
        per_pair, sums = self.pair_losses(model, batch)
        total = per_pair.sum()
        return total / max(num_items, 1), {"loss": float(total.detach()), "pairs": float(batch["num_pairs"]), **sums}

    def summarize(self, sums: dict[str, float], num_items: int) -> dict[str, float]:
        n = max(num_items, 1)
        return {k: v / n for k, v in sums.items() if k != "pairs"}

    def summarize_eval(self, sums: dict[str, float]) -> dict[str, float]:
        return self.summarize(sums, int(sums.get("pairs", 1)))


def reward_sums(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                rejected_logps: torch.Tensor) -> dict[str, float]:
    """Sums over pairs of the metrics TRL logs (the objective divides by the pair count)."""
    c, r = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "rewards/chosen": float(c.sum()),
        "rewards/rejected": float(r.sum()),
        "rewards/margins": float((c - r).sum()),
        "rewards/accuracies": float((c > r).float().sum()),
        "logps/chosen": float(chosen_logps.detach().float().sum()),
        "logps/rejected": float(rejected_logps.detach().float().sum()),
    }


def chosen_nll(seq: SequenceLogps, batch: Batch, *, full: bool = False) -> torch.Tensor:
    """Mean negative log-likelihood per token of the chosen sequences of this micro-batch."""
    idx = batch["chosen_doc"]
    if full:
        return seq.full_nll[idx].sum() / seq.full_counts[idx].sum().clamp(min=1)
    return -seq.logps[idx].sum() / seq.counts[idx].sum().clamp(min=1)

