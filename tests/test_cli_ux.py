"""First-run experience of the command: CPU threads on a busy machine, --version, help on every option."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from tuneforge.cli import app, choose_cpu_threads


@pytest.mark.parametrize("cores, load, threads", [
    (2, 4.8, 1),     # the busy 2-core machine: 1 thread (83 s against 237 s with 2)
    (2, 0.2, None),  # idle: torch's default, one per core
    (8, 3.2, 5),     # three cores busy: the five left
    (4, 1.4, 3),
    (1, 0.9, 1),
])
def test_cpu_threads_leave_busy_cores_alone(cores, load, threads):
    assert choose_cpu_threads(cores, load) == threads


def test_version():
    from tuneforge import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


@pytest.mark.parametrize("command", ["validate", "preprocess", "train", "inference", "merge-lora", "quantize",
                                     "vllm-serve"])
def test_every_command_documents_overrides_and_its_config(command):
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--learning-rate 1e-4" in text and "--resume-from-checkpoint" in text
    assert "The YAML config." in text


def test_every_option_has_help():
    import typer.main

    for command in typer.main.get_command(app).commands.values():
        for param in command.params:
            assert getattr(param, "help", None), f"{command.name} {param.name} has no help"


def test_a_second_fetch_does_not_claim_to_copy_unchanged_files(tmp_path, capsys):
    from tuneforge.fetch import run

    run("examples", tmp_path / "ex")
    first = capsys.readouterr().out
    run("examples", tmp_path / "ex")
    second = capsys.readouterr().out
    n = int(first.split()[1])
    assert n > 0 and "already there" not in first
    assert second.startswith("copied 0 file(s)") and f"; {n} already there, unchanged" in second


def test_preprocess_filter_drops_only_the_cache_location_line():
    import logging

    from tuneforge.cli import _CacheLineFilter

    record = logging.LogRecord("tuneforge", logging.INFO, __file__, 1, "prepared data saved to %s", ("/x",), None)
    other = logging.LogRecord("tuneforge", logging.INFO, __file__, 1, "tokenizing %d rows", (3,), None)
    assert not _CacheLineFilter().filter(record) and _CacheLineFilter().filter(other)
def test_library_import_notices_are_dropped_and_nothing_else(caplog):
    import logging

    from tuneforge import cli

    cli._drop_import_notices()
    for name, needle in cli.IMPORT_NOTICES:
        logging.getLogger(name).warning("x %s y", needle)
        logging.getLogger(name).warning("a real problem")
    kept = [r.getMessage() for r in caplog.records]
    assert kept == ["a real problem"] * len(cli.IMPORT_NOTICES)
