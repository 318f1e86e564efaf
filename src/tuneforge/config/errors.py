"""Configuration problems, collected so that `validate` can report all of them at once."""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.errors import TuneforgeError


@dataclass(frozen=True)
class ConfigIssue:
    path: str  # dotted key path, e.g. "datasets.0.type"
    message: str
    line: int | None = None  # 1-based YAML line, when known
    source: str | None = None  # file name or "command line"

    def render(self) -> str:
        where = self.path or "<config>"
        if self.source and self.line:
            where = f"{where} ({self.source}:{self.line})"
        elif self.source:
            where = f"{where} ({self.source})"
        return f"{where}: {self.message}"


class ConfigError(TuneforgeError):
    def __init__(self, issues: list[ConfigIssue]):
        self.issues = list(issues)
        super().__init__(self._format())

    def _format(self) -> str:
        n = len(self.issues)
        head = "1 problem in the configuration" if n == 1 else f"{n} problems in the configuration"
        body = "\n".join(f"  - {issue.render()}" for issue in self.issues)
        return f"{head}:\n{body}"
