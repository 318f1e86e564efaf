"""Issue 20: the fault-injection suite. kill -9 at random points of a checkpoint save, then an exact resume;
a file-size limit (RLIMIT_FSIZE) hitting a save; a reward that exits, run through the `tuneforge` command.
Bounded: a handful of tiny-model runs on one thread."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from test_engine_support import make_config, one_thread, train  # noqa: F401 - fixture

SRC = str(Path(__file__).resolve().parents[1] / "src")

# Runs `tuneforge train CONFIG`, killing itself with SIGKILL at the K-th call of SITE during a checkpoint save.
KILLER = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from tuneforge.engine import checkpoint

site, k = sys.argv[2], int(sys.argv[3])
calls = [0]
def wrap(owner, name):
    real = getattr(owner, name)
    def hooked(*a, **kw):
        calls[0] += 1
        if calls[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **kw)
    setattr(owner, name, hooked)

# torch.save: rng, optimizer, scheduler state; _fsync_tree: before the rename; _fsync_dir: just after it.
wrap(checkpoint.torch if site == "save" else checkpoint, site)
from tuneforge.cli import main
sys.argv = ["tuneforge", "train", sys.argv[1]]
main()
"""


def _env():
    return {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _weights(folder: Path) -> dict:
    return load_file(str(next(folder.glob("*.safetensors"))))


def test_kill_9_at_random_points_of_a_save_then_resume_bit_identical(tmp_path, tiny_model_dir):
    keys = {"max_steps": 4, "save_steps": 1, "logging_steps": 1}
    reference = make_config(tmp_path / "ref", tiny_model_dir, **keys)
    train(reference)
    want = _weights(tmp_path / "ref" / "out")
    rng = random.Random(int(os.environ.get("TUNEFORGE_FAULT_SEED", "20")))
    # Call counts within the saves of checkpoint-1..3 (checkpoint-4 is the last step: nothing left to resume).
    sites = {"save": 9, "save_model_files": 3, "_fsync_tree": 3, "_fsync_dir": 3}
    points = [(site, rng.randint(1, sites[site])) for site in rng.sample(sorted(sites), 3)]
    for n, (site, k) in enumerate(points):
        folder = tmp_path / f"run{n}"
        cfg = make_config(folder, tiny_model_dir, **keys)
        proc = subprocess.run([sys.executable, "-c", KILLER, str(cfg.source_file), site, str(k)], env=_env(),
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode == -9, (site, k, proc.stderr[-2000:])
        resumed = make_config(folder, tiny_model_dir, **keys, auto_resume_from_checkpoints=True)
        train(resumed)
        got = _weights(folder / "out")
        assert got.keys() == want.keys()
        for name, tensor in want.items():
            assert got[name].equal(tensor), (site, k, name)  # bit-identical to the uninterrupted run
        assert not list((folder / "out").glob("*.tmp")), "the unfinished save was swept"


FSIZE = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (1_500_000, 1_500_000))   # the weights fit, the optimizer does not
from tuneforge.cli import main
sys.argv = ["tuneforge", "train", sys.argv[1]]
main()
"""


def test_a_file_size_limit_hitting_a_checkpoint_save_is_one_message(tmp_path, tiny_model_dir):
    cfg = make_config(tmp_path, tiny_model_dir, max_steps=2, save_steps=1)
    proc = subprocess.run([sys.executable, "-c", FSIZE, str(cfg.source_file)], env=_env(), capture_output=True,
                          text=True, timeout=240)
    out = tmp_path / "out"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert (f"error: could not write checkpoint-1 in {out} (") in proc.stderr
    assert "nothing half-written is left behind, and no earlier checkpoint exists." in proc.stderr
    assert not list(out.glob("checkpoint-*")), "the unfinished checkpoint-1.tmp was removed"


def test_a_save_failing_after_an_earlier_one_names_the_intact_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    import errno

    import torch

    from tuneforge.engine import checkpoint
    from tuneforge.outputs_guard import OutputDirError

    real, calls = torch.save, [0]

    def full_disk(obj, f, *a, **k):
        calls[0] += 1
        if "checkpoint-2" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(OutputDirError) as err:
        train(make_config(tmp_path, tiny_model_dir, max_steps=3, save_steps=1))
    first = tmp_path / "out" / "checkpoint-1"
    assert str(err.value) == (f"could not write checkpoint-2 in {tmp_path / 'out'} (No space left on device); nothing "
                              f"half-written is left behind, and the previous checkpoint {first} is intact: free "
                              f"space, then resume with --resume-from-checkpoint {first}.")
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-1"]


def test_a_reward_that_calls_sys_exit_0_fails_the_command(tmp_path, tiny_model_dir):
    (tmp_path / "quits.py").write_text(textwrap.dedent("""
        import sys
        def reward(completions, **kw):
            sys.exit(0)
    """))
    (tmp_path / "prompts.jsonl").write_text("".join(f'{{"prompt": "hi {i}"}}\n' for i in range(8)))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "base_model": str(tiny_model_dir), "output_dir": str(tmp_path / "out"), "rl": "grpo",
        "datasets": [{"path": "prompts.jsonl", "type": "prompt"}], "micro_batch_size": 4, "max_steps": 2,
        "trl": {"num_generations": 2, "max_completion_length": 3, "reward_funcs": ["quits.reward"]}}))
    proc = subprocess.run([sys.executable, "-m", "tuneforge.cli", "train", str(tmp_path / "c.yaml")], env=_env(),
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert ("error: reward function `quits.reward` called sys.exit(0) (dataset row 0, completion 0: ") in proc.stderr
    assert proc.stderr.rstrip().endswith("No step had completed, so there is no checkpoint to resume from.")
