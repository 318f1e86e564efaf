"""SIGTERM/SIGINT during `tuneforge train`: finish the step, checkpoint, print the resume command, exit non-zero."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from test_engine_support import losses, make_config, make_rows, one_thread, train  # noqa: F401
from tuneforge.config import load
from tuneforge.engine.signals import StopFlag


def test_first_signal_sets_a_flag_second_aborts():
    with StopFlag() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


@pytest.mark.slow
def test_sigterm_checkpoints_and_prints_the_resume_command(tmp_path, tiny_model_dir):
    cfg = make_config(tmp_path, tiny_model_dir, make_rows(n=40), max_steps=5000, logging_steps=1)
    config_file = tmp_path / "config.yaml"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "train", str(config_file), "--logging-steps", "1"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.time() + 90
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    line = next(ln.strip() for ln in err.splitlines() if ln.strip().startswith("tuneforge train"))
    args = shlex.split(line)
    assert args[:3] == ["tuneforge", "train", str(config_file)] and args[-2] == "--resume-from-checkpoint"
    checkpoint = args[-1]
    step = int(checkpoint.rsplit("-", 1)[1])
    assert step >= 3 and (tmp_path / "out" / f"checkpoint-{step}" / "optimizer.pt").exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()  # an interrupted run writes no final model
    # The printed command resumes: same arguments, through the real config loader; train a few more steps.
    resumed = train(load(args[2], [*args[3:], "--max-steps", str(step + 2)]))
    assert sorted(losses(resumed))[-2:] == [step + 1, step + 2]
    assert cfg.max_steps == 5000
