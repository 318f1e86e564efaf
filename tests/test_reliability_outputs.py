"""Issue 20, items 8 and 12: output_dir. Never written into when it is the working directory, empty, a file,
read-only, holds the user's files or another run; auto-resume skips a damaged newest checkpoint."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from test_engine_support import losses, make_config, one_thread, train  # noqa: F401 - fixture
from tuneforge import outputs_guard
from tuneforge.config import dump
from tuneforge.outputs_guard import OutputDirError


def _claim(cfg):
    outputs_guard.claim(cfg, cfg.output_path(), dump(cfg))


def test_empty_output_dir_and_the_working_directory_are_refused(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("mine")
    with pytest.raises(OutputDirError) as err:
        train(make_config(tmp_path / "a", tiny_model_dir, output_dir=""))
    assert str(err.value) == ("output_dir is empty, which would mean the working directory; give the run a folder "
                              "of its own, e.g. output_dir: ./outputs/run1")
    with pytest.raises(OutputDirError) as err:
        _claim(make_config(tmp_path / "a", tiny_model_dir, output_dir="."))
    assert str(err.value).startswith("output_dir . is the working directory; training writes config.yaml, "
                                     "README.md, tokenizer and weight files there.")
    assert (tmp_path / "README.md").read_text() == "mine"
    assert not (tmp_path / outputs_guard.CLAIM).exists()


def test_a_folder_of_the_users_files_is_not_written_into(tmp_path, tiny_model_dir):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("mine")
    (out / "config.yaml").write_text("not: a tuneforge config\n")
    cfg = make_config(tmp_path, tiny_model_dir, output_dir=str(out))
    with pytest.raises(OutputDirError) as err:
        train(cfg)
    assert str(err.value) == (f"output_dir {out} holds files tuneforge did not write (README.md, config.yaml); "
                              "training would replace files of the same names. Choose a new or empty folder, or set "
                              "overwrite_output_dir: true.")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.yaml"]
    _claim(make_config(tmp_path, tiny_model_dir, output_dir=str(out), overwrite_output_dir=True))  # allowed


def test_a_different_run_is_refused_and_the_same_run_continues(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    first = make_config(tmp_path, tiny_model_dir, max_steps=2, save_steps=1)
    train(first)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    other = make_config(tmp_path, tiny_model_dir, name="other.yaml", max_steps=4, save_steps=1, seed=8,
                        save_total_limit=1)
    with pytest.raises(OutputDirError) as err:
        train(other)
    assert f"output_dir {out} holds another run (base_model {tiny_model_dir}" in str(err.value)
    assert str(err.value).endswith(f"To continue it, train with its own config ({out / 'config.yaml'}) and "
                                   "--resume-from-checkpoint; for a new run choose another output_dir (or set "
                                   "overwrite_output_dir: true to replace it).")
    auto = make_config(tmp_path, tiny_model_dir, name="auto.yaml", seed=8, auto_resume_from_checkpoints=True,
                       overwrite_output_dir=True)
    with pytest.raises(OutputDirError, match="auto_resume_from_checkpoints would resume that run, not this one"):
        _claim(auto)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]  # none deleted
    # The same run with more steps continues (max_steps is not part of what makes a run this run).
    _claim(make_config(tmp_path, tiny_model_dir, name="longer.yaml", max_steps=4, save_steps=1,
                       auto_resume_from_checkpoints=True))


def test_a_file_and_an_unwritable_folder(tmp_path, tiny_model_dir, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError) as err:
        _claim(make_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "file")))
    assert str(err.value) == f"output_dir {tmp_path / 'file'} is a file, not a folder; choose another output_dir."

    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    cfg = make_config(tmp_path / "b", tiny_model_dir)
    monkeypatch.setattr(Path, "write_text", read_only)
    with pytest.raises(OutputDirError) as err:
        _claim(cfg)
    assert str(err.value) == (f"cannot write to output_dir {tmp_path / 'b' / 'out'}: Read-only file system "
                              "(read-only, full, or not yours?); choose a writable output_dir.")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder(tmp_path, tiny_model_dir):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(OutputDirError, match="cannot write to output_dir"):
            train(make_config(tmp_path, tiny_model_dir, output_dir=str(out)))
    finally:
        out.chmod(0o755)


def test_auto_resume_skips_a_damaged_newest_checkpoint(tmp_path, tiny_model_dir, caplog):
    cfg = make_config(tmp_path, tiny_model_dir, max_steps=3, save_steps=1, logging_steps=1)
    full = losses(train(cfg))
    out = tmp_path / "out"
    shutil.rmtree(out / "checkpoint-3")
    weights = next((out / "checkpoint-2").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])  # damaged outside tuneforge
    resumed = make_config(tmp_path, tiny_model_dir, max_steps=3, save_steps=1, logging_steps=1,
                          auto_resume_from_checkpoints=True)
    with caplog.at_level("WARNING", "tuneforge"):
        again = losses(train(resumed))
    assert (f"auto_resume_from_checkpoints: skipping {out / 'checkpoint-2'}: {weights.name} is truncated; trying "
            "the checkpoint before it") in caplog.text
    assert again[2] == full[2] and again[3] == full[3]  # resumed from checkpoint-1, exactly
