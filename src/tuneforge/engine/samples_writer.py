"""Append-only JSON-lines files of generated text in output_dir (`samples.jsonl`, `completions.jsonl`).

Any objective or evaluation that shows what the model generates writes through `SamplesWriter`: one
JSON object per line, appended, so a resumed run continues the same file. A write that fails (a full
disk, a read-only output_dir) is logged and training goes on: the samples are for reading, not resuming.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("tuneforge")


class SamplesWriter:
    def __init__(self, path: Path):
        self.path = Path(path)

    def write(self, records: Iterable[dict]) -> None:
        lines = [json.dumps(record) + "\n" for record in records]
        if not lines:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.writelines(lines)
        except OSError as exc:
            log.warning("could not write %s: %s", self.path.name, exc)
