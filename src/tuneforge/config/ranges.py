"""Cross-field ranges: values each valid alone that contradict each other or the machine (issue 20)."""

from __future__ import annotations

import os

from .errors import ConfigIssue
from .rules import rule
from .schema import Config

# Bytes per packed token while preparing and collating (ids, labels, positions as int64, plus a copy).
_BYTES_PER_PACKED_TOKEN = 32


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@rule
def _contradictions(cfg: Config) -> list[ConfigIssue]:
    issues = []
    if cfg.warmup_steps and cfg.max_steps and cfg.warmup_steps > cfg.max_steps:
        issues.append(ConfigIssue("warmup_steps", f"({cfg.warmup_steps}) is more than max_steps ({cfg.max_steps}): "
                                  "the learning rate would never reach its peak; lower warmup_steps."))
    if cfg.save_strategy in ("no", "best") and (cfg.save_steps or cfg.saves_per_epoch):
        key = "save_steps" if cfg.save_steps else "saves_per_epoch"
        what = "no checkpoints" if cfg.save_strategy == "no" else "checkpoints at better evaluations only"
        issues.append(ConfigIssue(key, f"is set while save_strategy is \"{cfg.save_strategy}\" ({what}); remove "
                                  "one of them."))
    memory = _memory_bytes()
    if cfg.sample_packing and memory:
        need = cfg.sequence_len * cfg.micro_batch_size * _BYTES_PER_PACKED_TOKEN
        if need > memory:
            issues.append(ConfigIssue("sequence_len", f"({cfg.sequence_len:,}) x micro_batch_size with sample_packing "
                                      f"needs about {need / 2**30:,.0f} GiB for the packed rows alone; this machine "
                                      f"has {memory / 2**30:,.0f} GiB. Lower sequence_len."))
    return issues
