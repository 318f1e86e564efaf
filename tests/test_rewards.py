"""Reward functions from YAML: loading, the calling convention, clear errors, worker processes, and the
ready-made rewards in `tuneforge.rewards`."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from tuneforge import rewards as ready
from tuneforge.methods.rewards import RewardError, RewardSet, resolve


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        import time

        def accuracy(completions, answer, **kwargs):
            return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]

        def named_only(completions, answer):          # no **kwargs: gets only what it names
            return [float(len(c)) for c in completions]

        def sometimes_none(completions, **kwargs):
            return [None if c == "skip" else 0.5 for c in completions]

        def breaks_on_row(completions, **kwargs):
            return [1.0 / (len(c) - 3) for c in completions]   # ZeroDivisionError on 3-letter completions

        def too_short(completions, **kwargs):
            return [1.0]

        def not_a_number(completions, **kwargs):
            return ["high" for _ in completions]

        def sleepy(completions, **kwargs):
            time.sleep(5)
            return [0.0] * len(completions)

        async def async_len(completions, **kwargs):
            return [float(len(c)) for c in completions]

        def no_arguments():
            return []

        def sees(completions, prompts, completion_ids, trainer_state=None, **kwargs):
            return [float(len(i) + 10 * (p == "q")) for p, i in zip(prompts, completion_ids)]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _set(*names, weights=None, **kw):
    return RewardSet([(n, resolve(f"my_rewards.{n}")) for n in names], weights, specs=[f"my_rewards.{n}" for n in names],
                     **kw)


def _compute(rs, completions, **columns):
    n = len(completions)
    return rs.compute(["q"] * n, completions, [[1] * len(c) for c in completions], columns, rows=list(range(10, 10 + n)))


def test_calling_convention_columns_and_none(user_module):
    rs = _set("accuracy", "named_only", "sometimes_none", "async_len", "sees")
    out = _compute(rs, ["ab", "skip", "abc"], answer=["ab", "x", "y"])
    expect = torch.tensor([[1, 2, 0.5, 2, 12], [0, 4, math.nan, 4, 14], [0, 3, 0.5, 3, 13]], dtype=torch.float64)
    assert torch.allclose(out, expect, equal_nan=True)


def test_a_raising_function_names_itself_and_the_row(user_module):
    with pytest.raises(RewardError, match=r"`breaks_on_row` raised ZeroDivisionError.*dataset row 11, completion 1"):
        _compute(_set("breaks_on_row"), ["abcde", "abc", "ab"])


def test_wrong_length_and_bad_values_are_reported(user_module):
    with pytest.raises(RewardError, match=r"`too_short` returned 1 values for 3 completions"):
        _compute(_set("too_short"), ["a", "b", "c"])
    with pytest.raises(RewardError, match=r"`not_a_number` returned 'high' \(dataset row 10, completion 0\)"):
        _compute(_set("not_a_number"), ["a"])


def test_loading_errors_are_clear(user_module):
    with pytest.raises(RewardError, match="cannot import module `nowhere`"):
        resolve("nowhere.fn")
    with pytest.raises(RewardError, match="has no function `missing`"):
        resolve("my_rewards.missing")
    with pytest.raises(RewardError, match="takes neither `completions`"):
        resolve("my_rewards.no_arguments")
    with pytest.raises(RewardError, match="not `module.function`"):
        resolve("accuracy")
    with pytest.raises(RewardError, match="2 values for 1 reward functions"):
        _set("accuracy", weights=[1.0, 2.0])


def test_from_config_resolves_next_to_the_config(tmp_path, write_config, write_jsonl):
    from tuneforge.config import load

    sub = tmp_path / "cfgdir"
    sub.mkdir()
    (sub / "local_rewards.py").write_text("def one(completions, **kw):\n    return [1.0] * len(completions)\n")
    path = write_config({"rl": "grpo", "datasets": [{"path": "x.jsonl"}],
                         "trl": {"reward_funcs": ["local_rewards.one"], "reward_weights": [2.0]}}, "cfgdir/c.yaml")
    rs = RewardSet.from_config(load(path))
    assert rs.short_names == ["one"] and rs.weights.tolist() == [2.0]


def test_worker_processes_give_the_same_matrix(user_module):
    completions = ["ab", "skip", "abc", "x", "ab"]
    columns = {"answer": ["ab", "x", "abc", "x", "y"]}
    inline = _compute(_set("accuracy", "sometimes_none", "named_only"), completions, **columns)
    rs = _set("accuracy", "sometimes_none", "named_only", num_workers=2, timeout=60, search=[str(user_module)])
    try:
        pooled = _compute(rs, completions, **columns)
    finally:
        rs.close()
    assert torch.allclose(inline, pooled, equal_nan=True)


def test_worker_timeout_and_worker_errors(user_module):
    rs = _set("sleepy", num_workers=1, timeout=0.5, search=[str(user_module)])
    with pytest.raises(RewardError, match=r"`sleepy` did not finish within trl.reward_timeout \(0.5 s\)"):
        _compute(rs, ["a", "b"])
    rs = _set("breaks_on_row", num_workers=2, timeout=60, search=[str(user_module)])
    try:
        with pytest.raises(RewardError, match=r"ZeroDivisionError.*dataset row 13"):
            _compute(rs, ["abcde", "ab", "abcd", "abc"])
    finally:
        rs.close()


# ---------------------------------------------------------------- ready-made rewards
def test_exact_and_numeric_answers():
    comps = ["<think>2+2</think> 4", "The answer is \\boxed{1,000}", "#### 3.50", "I think 7/2", "no number", "5"]
    answers = ["4", "1000", "3.5", "3.5", "1", "6"]
    assert ready.numeric_answer(comps, answers) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert ready.exact_match(["  Paris.", "<think>x</think>paris", "Lyon"], ["paris"] * 3) == [1.0, 1.0, 0.0]
    chat = [[{"role": "assistant", "content": "#### 12"}]]
    assert ready.numeric_answer(chat, ["12"]) == [1.0]


def test_format_regex_and_length():
    assert ready.think_format(["<think>a</think> b", "<think></think>b", "b <think>a</think> c", "<think>a</think>"]) == [
        1.0, 0.0, 0.0, 0.0]
    assert ready.regex_match(["abc123", "abc"], [r"\d+$", r"\d"]) == [1.0, 0.0]
    ids = [[0] * n for n in (10, 192, 224, 256, 300)]
    assert ready.length_penalty(ids, max_completion_length=256, overlong_cache=64) == [0.0, 0.0, -0.5, -1.0, -1.0]
