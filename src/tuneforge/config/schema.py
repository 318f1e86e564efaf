"""The full configuration: every area's keys in one strict model."""

from __future__ import annotations

from pathlib import Path

from pydantic import PrivateAttr

from .adapter import AdapterKeys
from .data import DataKeys
from .distributed import DistributedKeys
from .model import ModelKeys
from .quantization import QuantizationKeys
from .rl import RLKeys
from .training import LoggingKeys, TrainingKeys
from .variants import VariantKeys


class Config(ModelKeys, AdapterKeys, DataKeys, TrainingKeys, LoggingKeys, RLKeys, DistributedKeys,
             VariantKeys, QuantizationKeys):
    """A validated run configuration. Build it with `tuneforge.config.load`."""

    _source_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source_file: Path | None = PrivateAttr(default=None)
    _lines: dict = PrivateAttr(default_factory=dict)  # key path -> YAML line, for checks made after loading
    _notes: list[str] = PrivateAttr(default_factory=list)  # Axolotl keys accepted with a note, for `validate`

    @property
    def source_dir(self) -> Path:
        """Folder of the YAML file; relative paths are looked up here first, then in the working directory."""
        return self._source_dir

    @property
    def notes(self) -> list[str]:
        """What `load` accepted with a note (an Axolotl key mapped, built in or ignored)."""
        return self._notes

    @property
    def source_file(self) -> Path | None:
        return self._source_file

    @property
    def grad_accum(self) -> int:
        if self.gradient_accumulation_steps:
            return self.gradient_accumulation_steps
        if self.batch_size:
            return max(1, self.batch_size // self.micro_batch_size)
        return 1

    @property
    def packing_for_eval(self) -> bool:
        return self.sample_packing if self.eval_sample_packing is None else self.eval_sample_packing

    def resolve_path(self, value: str | None) -> str | None:
        """Resolve a user path: relative to the config file if it exists there, else as given."""
        if value is None:
            return None
        p = Path(value).expanduser()
        if p.is_absolute():
            return str(p)
        beside = self._source_dir / p
        if beside.exists():
            return str(beside)
        return value

    def output_path(self) -> Path:
        """output_dir, relative to the working directory (as in Axolotl)."""
        return Path(self.output_dir).expanduser()
