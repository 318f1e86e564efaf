"""Issue 20, items 3-6: reward code is contained. An exit, a KeyboardInterrupt, a crash, a hang or a dead
worker becomes one RewardError naming the function and the row (the trainer then keeps the last completed
step); trl.reward_timeout works without reward_num_workers; values are validated per call."""

from __future__ import annotations

import logging
import math
import textwrap
import time

import pytest
import torch

from tuneforge.methods.rewards import RewardError, RewardSet, resolve

BAD = """
import os, sys, time

def exits0(completions, **kw):
    sys.exit(0)

def exits3(completions, **kw):
    sys.exit(3)

def hard_exit(completions, **kw):
    if any(c == "boom" for c in completions):
        os._exit(0)
    return [1.0] * len(completions)

def killed(completions, **kw):
    if any(c == "boom" for c in completions):
        os.kill(os.getpid(), 9)   # what an out-of-memory kill does: nothing in the process can catch it
    return [1.0] * len(completions)

def interrupts(completions, **kw):
    raise KeyboardInterrupt

def crashes_on_b(completions, **kw):
    return [1.0 / (c != "b") for c in completions]

def hangs(completions, **kw):
    time.sleep(60)

def string_value(completions, **kw):
    return ["1.0"] * len(completions)

def infinite(completions, **kw):
    return [1.0, float("inf")][: len(completions)]

def huge(completions, **kw):
    return [-1e308] * len(completions)

def all_nan(completions, **kw):
    return [float("nan")] * len(completions)
"""


@pytest.fixture
def bad_module(tmp_path, monkeypatch):
    (tmp_path / "bad_rewards.py").write_text(textwrap.dedent(BAD))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _set(name, **kw):
    return RewardSet([(name, resolve(f"bad_rewards.{name}"))], specs=[f"bad_rewards.{name}"], **kw)


def _compute(rs, completions):
    n = len(completions)
    try:
        return rs.compute(["q"] * n, completions, [[1]] * n, {}, rows=list(range(10, 10 + n)))
    finally:
        rs.close()


@pytest.mark.parametrize(("name", "what"), [
    ("exits0", "called sys.exit(0)"), ("exits3", "called sys.exit(3)"), ("hard_exit", "called os._exit(0)"),
    ("interrupts", "raised KeyboardInterrupt (a function may not stop the run itself)"),
])
def test_an_exit_in_process_becomes_one_error_with_the_row(bad_module, name, what):
    completions = ["a", "boom"] if name == "hard_exit" else ["a", "b"]
    row = "dataset row 11, completion 1: 'boom'" if name == "hard_exit" else "dataset row 10, completion 0: 'a'"
    with pytest.raises(RewardError) as err:
        _compute(_set(name), completions)
    assert str(err.value) == f"reward function `{name}` {what} ({row})"


def test_a_worker_that_dies_is_reported_at_once_not_as_a_timeout(bad_module):
    rs = _set("killed", num_workers=2, timeout=60, search=[str(bad_module)])
    start = time.monotonic()
    with pytest.raises(RewardError) as err:
        _compute(rs, ["a", "b", "c", "boom"])
    assert time.monotonic() - start < 30
    assert str(err.value) == (
        "reward function `killed`: a worker process died while running it on completions 0..3 (dataset rows "
        "[10, 11, 12, 13]) (a signal such as an out-of-memory kill, or a crash in native code).")


def test_an_exit_in_a_worker_names_the_row(bad_module):
    rs = _set("exits3", num_workers=2, search=[str(bad_module)])
    with pytest.raises(RewardError) as err:
        _compute(rs, ["a", "b", "c", "d"])
    assert str(err.value) == "reward function `exits3` called sys.exit(3) (dataset row 10, completion 0: 'a')"


def test_reward_timeout_without_workers(bad_module):
    rs = _set("hangs", timeout=1.0)
    assert rs.num_workers == 1  # a timeout runs the functions in a worker it can abandon
    start = time.monotonic()
    with pytest.raises(RewardError) as err:
        _compute(rs, ["a", "b"])
    assert time.monotonic() - start < 30
    assert str(err.value) == ("reward function `hangs` did not finish within trl.reward_timeout (1.0 s) on "
                              "completions 0..1.")


def test_a_crash_names_the_function_and_row(bad_module):
    with pytest.raises(RewardError) as err:
        _compute(_set("crashes_on_b"), ["a", "b"])
    assert str(err.value) == ("reward function `crashes_on_b` raised ZeroDivisionError: float division by zero "
                              "(dataset row 11, completion 1: 'b')")


@pytest.mark.parametrize(("name", "value"), [("infinite", "inf"), ("huge", "-1e+308"), ("all_nan", "nan")])
def test_non_finite_rewards_stop_the_run_by_default(bad_module, name, value):
    i = 1 if name == "infinite" else 0
    with pytest.raises(RewardError) as err:
        _compute(_set(name), ["a", "b"])
    assert str(err.value) == (
        f"reward function `{name}` returned {value} (dataset row {10 + i}, completion {i}); rewards must be finite "
        "numbers within +-1e+15 (or None for not applicable). Fix the function, or set "
        "`trl.reward_nan_policy: skip` to treat such values as None.")


def test_the_string_1_0_is_refused(bad_module):
    with pytest.raises(RewardError) as err:
        _compute(_set("string_value"), ["a"])
    assert str(err.value) == ("reward function `string_value` returned '1.0' (dataset row 10, completion 0); "
                              "expected a number or None.")


def test_skip_policy_treats_them_as_none_and_logs(bad_module, caplog):
    with caplog.at_level(logging.WARNING, "tuneforge"):
        out = _compute(_set("infinite", nan_policy="skip"), ["a", "b"])
        assert out[0, 0] == 1.0 and math.isnan(out[1, 0])
        assert "1 reward value(s) treated as None, e.g. inf (dataset row 11, completion 1)" in caplog.text
        out = _compute(_set("all_nan", nan_policy="skip"), ["a", "b"])
    assert torch.isnan(out).all()
    assert "no reward function gave a value for any of the 2 completions of this step" in caplog.text


def test_a_failing_reward_mid_training_keeps_the_last_completed_step(tmp_path, write_config, write_jsonl,
                                                                     monkeypatch):
    """A reward that exits at its third call: the run stops with one message and checkpoint-2 to resume."""
    from tuneforge.config import load
    from tuneforge.engine.run import train

    (tmp_path / "counting.py").write_text(textwrap.dedent("""
        import os
        CALLS = [0]
        def third_exits(completions, **kw):
            CALLS[0] += 1
            if CALLS[0] == 3:
                os._exit(0)
            return [float(len(c)) for c in completions]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    write_jsonl([{"prompt": f"hello {i}"} for i in range(16)], "prompts.jsonl")
    cfg = load(write_config({
        "rl": "grpo", "datasets": [{"path": "prompts.jsonl", "type": "prompt"}],
        "trl": {"num_generations": 2, "max_completion_length": 3, "reward_funcs": ["counting.third_exits"]},
        "micro_batch_size": 4, "max_steps": 5, "save_strategy": "no", "seed": 0}))
    with pytest.raises(RewardError) as err:
        train(cfg, show_progress=False)
    saved = tmp_path / "out" / "checkpoint-2"
    assert str(err.value) == ("reward function `counting.third_exits` called os._exit(0) (on the batch of 4 "
                              f"completions). The last completed step (2) is saved in {saved}; fix the function, then "
                                   f"resume with `--resume-from-checkpoint {saved}`.")
    assert (saved / "trainer_state.json").exists()


def test_ctrl_c_to_the_process_group_does_not_kill_reward_workers(bad_module, tmp_path):
    """Workers ignore SIGINT: a Ctrl-C reaches the trainer (which finishes the step and saves), not a worker
    in the middle of a call (which used to hang the trainer forever)."""
    import os
    import signal
    import threading

    (bad_module / "slow_rewards.py").write_text("import time\ndef slow(completions, **kw):\n"
                                                "    time.sleep(1.5)\n    return [2.0] * len(completions)\n")
    rs = RewardSet([("slow", resolve("slow_rewards.slow"))], specs=["slow_rewards.slow"], num_workers=2, timeout=60,
                   search=[str(bad_module)])

    def interrupt_workers():
        time.sleep(0.8)
        for proc in list(rs._pool._pool._processes.values()):
            os.kill(proc.pid, signal.SIGINT)

    try:
        rs.compute(["q"], ["warm-up"], [[1]], {})  # starts the workers
        threading.Thread(target=interrupt_workers).start()
        out = rs.compute(["q"] * 4, ["a", "b", "c", "d"], [[1]] * 4, {})
    finally:
        rs.close()
    assert out.tolist() == [[2.0]] * 4
