"""`dynamic_checkpoint`: save a checkpoint when a trigger file appears in output_dir (Axolotl's key)."""

from __future__ import annotations

import logging
from pathlib import Path

from tuneforge.distributed import collectives

log = logging.getLogger("tuneforge")

DEFAULT_TRIGGER_FILE = "axolotl_checkpoint.save"  # Axolotl's name, so existing scripts keep working


class CheckpointTrigger:
    """Whether the trigger file appeared. The first process looks for it every `check_interval` steps and
    the answer is shared, so that every process saves; the file is then removed (one request, one save)."""

    def __init__(self, request, output_dir: Path, *, is_main_process: bool):
        self.request = request if request is not None and request.enabled else None
        self.file = output_dir / ((self.request and self.request.trigger_file_path) or DEFAULT_TRIGGER_FILE)
        self.main = is_main_process

    def requested(self, step: int) -> bool:
        if self.request is None or step % self.request.check_interval:
            return False
        if not collectives.sum_floats([float(self.main and self.file.exists())])[0]:
            return False
        if self.main:
            self.file.unlink(missing_ok=True)
        log.info("checkpoint requested by %s", self.file)
        return True
