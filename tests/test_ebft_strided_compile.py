"""EBFT strided mode with torch_compile: accepted, run eagerly, and said once (Axolotl's strided example sets it)."""

from __future__ import annotations

import logging

import torch


def test_torch_compile_is_turned_off_with_one_note(write_config, write_jsonl, caplog):
    value = True  # `auto` already chooses eager for this mode, silently (tests/test_compile_setup.py)
    from tuneforge.config import load
    from tuneforge.methods import get_objective
    from tuneforge.models.compile_setup import compile_blocks

    write_jsonl([{"text": "a b c"}], "docs.jsonl")
    cfg = load(write_config({"rl": "ebft", "datasets": [{"path": "docs.jsonl", "type": "completion"}],
                             "ebft": {"mode": "strided"}, "torch_compile": value}))
    with caplog.at_level(logging.WARNING, logger="tuneforge"):
        get_objective(cfg).close()
    notes = [r.getMessage() for r in caplog.records if "torch_compile" in r.getMessage()]
    assert notes == [f"torch_compile: {value} is not applied in EBFT strided mode: its blocks of varying layout run "
                     "through one block-masked forward, which torch.compile would recompile for every document; "
                     "the model runs eagerly (set torch_compile: false to drop this note)"]
    assert cfg.torch_compile is False
    assert compile_blocks(cfg, torch.nn.Linear(2, 2)) == 0  # the model loader then compiles nothing (on any device)


def test_structured_mode_keeps_torch_compile(write_config, write_jsonl, caplog):
    from tuneforge.config import load
    from tuneforge.methods import get_objective

    write_jsonl([{"prompt": "a", "ground_truth": "b"}], "rows.jsonl")
    cfg = load(write_config({"rl": "ebft", "datasets": [{"path": "rows.jsonl", "type": "ebft_structured"}],
                             "torch_compile": True, "trl": {"num_generations": 2}, "micro_batch_size": 2}))
    with caplog.at_level(logging.WARNING, logger="tuneforge"):
        get_objective(cfg).close()
    assert cfg.torch_compile is True
    assert not [r for r in caplog.records if "EBFT strided" in r.getMessage()]
