"""Load a config written as text in a test: the loaded Config, its issues, or the notes it logged."""

from __future__ import annotations

import logging

import pytest

from tuneforge.config import ConfigError, load

BASE = "base_model: some/model\n"


def load_text(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(BASE + text)
    return load(path)


def issues_of(tmp_path, text: str):
    with pytest.raises(ConfigError) as exc:
        load_text(tmp_path, text)
    return exc.value.issues


def notes_of(tmp_path, caplog, text: str):
    with caplog.at_level(logging.WARNING, logger="tuneforge"):
        cfg = load_text(tmp_path, text)
    return cfg, [r.getMessage() for r in caplog.records]
