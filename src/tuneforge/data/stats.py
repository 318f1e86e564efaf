"""What data preparation reports: row and token counts per dataset entry and per split, and the
prepared splits themselves."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Stats:
    rows_in: int = 0
    rows_out: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> rows
    truncated: int = 0  # rows cut to sequence_len (excess_length_strategy: truncate)
    tokens: int = 0
    trained_tokens: int = 0  # tokens that are a training target (labels[1:] != -100, as collate shifts)
    held_out: int = 0  # rows moved to the evaluation split by val_set_size
    name: str = ""

    def add(self, other: Stats) -> None:
        self.rows_in += other.rows_in
        self.rows_out += other.rows_out
        self.dropped.update(other.dropped)
        self.truncated += other.truncated
        self.tokens += other.tokens
        self.trained_tokens += other.trained_tokens
        self.held_out += other.held_out

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "dropped": dict(self.dropped),
            "truncated": self.truncated,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "held_out": self.held_out,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stats:
        return cls(
            rows_in=int(d["rows_in"]),
            rows_out=int(d["rows_out"]),
            dropped=Counter({k: int(v) for k, v in d.get("dropped", {}).items()}),
            truncated=int(d.get("truncated", 0)),
            tokens=int(d.get("tokens", 0)),
            trained_tokens=int(d.get("trained_tokens", 0)),
            held_out=int(d.get("held_out", 0)),
            name=str(d.get("name", "")),
        )


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset
    eval: Any | None
    stats: dict[str, Stats]  # "train", "eval": totals of the split
    cache_dir: Any = None  # pathlib.Path of the cache entry, None when skip_prepare_dataset
    reused_cache: bool = False
    by_dataset: dict[str, list[Stats]] = field(default_factory=dict)  # split -> one Stats per dataset entry
    stream: Any = None  # streamed training data (data/streaming.py StreamSpec); `train` is then None


def sum_stats(parts: list[Stats]) -> Stats:
    total = Stats(name="all")
    for s in parts:
        total.add(s)
    return total
