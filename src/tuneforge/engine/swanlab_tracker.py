"""SwanLab as an accelerate tracker (`use_swanlab`), with the generated text as SwanLab tables.

accelerate ships a SwanLab tracker, but it names the project after the other trackers' and cannot log
tables; this one takes the swanlab_* keys. `swanlab` is imported only when the run starts (optional extra
`tuneforge[swanlab]`). Calls: `swanlab.login` (with swanlab_api_key), `swanlab.init`, `swanlab.config.update`,
`swanlab.log(values, step=)` (a metric key repeated at an earlier step is dropped by SwanLab, so train and
eval values go under their own keys), and `swanlab.finish`.

Completion tables (swanlab_log_completions): the text tuneforge writes as it trains, the newest
swanlab_completion_max_buffer rows of `samples.jsonl` (generate_samples) and `completions.jsonl` (GRPO's
trl.log_completions), each uploaded as a `swanlab.echarts.Table` every swanlab_completion_log_interval
steps and at the end, filed under the step that generated the newest row. Preference methods (DPO, KTO, ORPO) generate no text, so they have no table.
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path

from accelerate.tracking import GeneralTracker, on_main_process

from tuneforge.config.schema import Config
from tuneforge.errors import TuneforgeError

# file in output_dir -> SwanLab table name
TABLES = {"samples.jsonl": "samples", "completions.jsonl": "completions"}


def init_kwargs(cfg: Config) -> dict:
    """swanlab.init's arguments from the swanlab_* keys (unset keys: SwanLab's defaults)."""
    kwargs = {"project": cfg.swanlab_project or Path(cfg.output_dir).name or "tuneforge",
              "experiment_name": cfg.swanlab_experiment_name, "description": cfg.swanlab_description,
              "mode": cfg.swanlab_mode, "workspace": cfg.swanlab_workspace}
    return {k: v for k, v in kwargs.items() if v is not None}


class SwanLabTracker(GeneralTracker):
    name = "swanlab"
    requires_logging_directory = False

    def __init__(self, cfg: Config, output_dir: Path):
        super().__init__()
        self.init_kwargs = init_kwargs(cfg)
        self.api_key, self.api_host = cfg.swanlab_api_key, cfg.swanlab_api_host
        self.tables = ([TableFollower(Path(output_dir) / f, name, cfg.swanlab_completion_max_buffer)
                        for f, name in TABLES.items()] if cfg.swanlab_log_completions else [])
        self.interval = cfg.swanlab_completion_log_interval
        self.tables_at: int | None = None  # the step of the last table upload
        self.last_step: int | None = None
        self.run = None

    @property
    def tracker(self):
        return self.run

    @on_main_process
    def start(self):
        import swanlab

        try:
            if self.api_key:
                swanlab.login(api_key=self.api_key, **({"host": self.api_host} if self.api_host else {}))
            self.run = swanlab.init(**self.init_kwargs)
        except Exception as exc:  # e.g. online mode without a login and no terminal to ask in
            raise TuneforgeError(f"SwanLab did not start ({type(exc).__name__}: {exc}); set swanlab_api_key or "
                                 "SWANLAB_API_KEY, run `swanlab login` once, or use swanlab_mode: local (or remove "
                                 "use_swanlab).") from exc

    @on_main_process
    def store_init_configuration(self, values: dict):
        import swanlab

        swanlab.config.update(values)

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs):
        import swanlab

        swanlab.log(values, step=step)
        if step is None:
            return
        self.last_step = step
        if self.tables and step - (self.tables_at or 0) >= self.interval:
            self._log_tables(step)

    @on_main_process
    def finish(self):
        import swanlab

        if self.tables and self.last_step is not None:
            self._log_tables(self.last_step)  # what was written since the last upload
        swanlab.finish()

    def _log_tables(self, step: int) -> None:
        import swanlab

        for table in self.tables:
            table.read_new()
            at = table.upload_step(step)
            if at is not None:  # the interval counts from the last upload, not the last look
                self.tables_at = step
                headers, rows = table.headers_and_rows()
                swanlab.log({table.name: swanlab.echarts.Table().add(headers, rows)}, step=at)


class TableFollower:
    """The newest `max_rows` records of a JSON-lines file that grows while training (read from where the
    last read stopped; a line not yet ended is left for the next read)."""

    def __init__(self, path: Path, name: str, max_rows: int):
        self.path, self.name = path, name
        self.rows: deque[dict] = deque(maxlen=max_rows)
        self.offset = 0
        self.pending = False  # rows read since the last upload
        self.uploaded: int | None = None  # the step of the last upload

    def upload_step(self, now: int) -> int | None:
        """The step to upload the pending rows at: their newest row's own step (when the rows name it), so
        that a table is filed under the step that generated it; None when nothing can be uploaded now
        (SwanLab drops a value logged again at a step it has, so rows that arrive late for an uploaded
        step wait for the next one)."""
        if not self.pending:
            return None
        step = self.rows[-1].get("step", now)
        step = step if isinstance(step, int) else now
        if self.uploaded is not None and step <= self.uploaded:
            return None
        self.pending, self.uploaded = False, step
        return step

    def read_new(self) -> bool:
        """Read the lines appended since the last call; True when there were any."""
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return False
        end = data.rfind(b"\n") + 1
        self.offset += end
        added = False
        for line in data[:end].splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if isinstance(record, dict):
                self.rows.append(record)
                added = True
        self.pending = self.pending or added
        return added

    def headers_and_rows(self) -> tuple[list[str], list[list]]:
        headers: list[str] = []
        for record in self.rows:
            headers += [k for k in record if k not in headers]
        return headers, [[_cell(record.get(k)) for k in headers] for record in self.rows]


def _cell(value):
    """Table cells are numbers or text."""
    if value is None or isinstance(value, int | float | str):
        return "" if value is None else value
    return json.dumps(value)
