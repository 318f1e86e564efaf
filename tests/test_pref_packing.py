"""Packed preference training equals the unpacked computation.

Axolotl forbids sample_packing with every preference method; we pack whole pairs (or KTO examples)
into sequence_len rows with per-sequence positions. One optimizer step of plain SGD over the same
rows, packed and unpacked, must give the same loss (1e-5) and the same weights (1e-5): the whole data
fits one micro-batch either way, so the step sees the same pairs.
"""

from __future__ import annotations

import pytest
import torch

from test_pref_support import make_cfg, one_thread, reverse_task, train_run, write_jsonl  # noqa: F401

SGD = {"optimizer": "sgd", "learning_rate": 1.0, "lr_scheduler": "constant", "max_grad_norm": None, "max_steps": 1,
       "micro_batch_size": 12, "sequence_len": 128, "shuffle_merged_datasets": False, "logging_steps": 1}


def _rows(method: str) -> list[dict]:
    rows = reverse_task(12, seed=21, k=3)
    for i, r in enumerate(rows):  # vary the lengths, so that unpacked rows carry padding
        r["chosen"] += " x" * (i % 4)
    if method != "kto":
        return rows
    return [{"prompt": r["prompt"], "completion": r["chosen"] if i % 3 else r["rejected"], "label": bool(i % 3)}
            for i, r in enumerate(rows)]


def _step(tmp_path, tiny_model_dir, method: str, packed: bool):
    keys = {"rl": method} if method != "reward_model" else {"reward_model": True}
    if method == "simpo":
        keys["cpo_alpha"] = 0.5
    folder = tmp_path / f"{method}-{packed}"
    data = write_jsonl(folder / "data.jsonl", _rows(method))
    cfg = make_cfg(tiny_model_dir, folder, datasets=[{"path": str(data)}], sample_packing=packed, **keys, **SGD)
    result = train_run(cfg)
    weights = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
    return result.train_metrics, weights


@pytest.mark.parametrize("method", ["dpo", "ipo", "simpo", "orpo", "kto", "reward_model"])
def test_packed_first_step_equals_unpacked(method, tmp_path, tiny_model_dir):
    plain, w_plain = _step(tmp_path, tiny_model_dir, method, packed=False)
    packed, w_packed = _step(tmp_path, tiny_model_dir, method, packed=True)
    assert abs(plain["loss"] - packed["loss"]) < 1e-5, (plain["loss"], packed["loss"])
    assert packed["tokens"] == plain["tokens"]  # the same real tokens went through the model
    worst = max((w_plain[k] - w_packed[k]).abs().max().item() for k in w_plain)
    assert worst < 1e-5, worst
    if method != "reward_model":  # the step did move the weights (lr 1)
        from safetensors.torch import load_file

        before = load_file(str(tiny_model_dir / "model.safetensors"))
        moved = max((w_plain[k] - before[k]).abs().max().item() for k in before if k in w_plain)
        assert moved > 1e-4


def test_packed_rows_hold_several_pairs(tmp_path, tiny_model_dir):
    """The packed run really packs: fewer, fuller rows than the unpacked layout."""
    from tuneforge.data.batches import plan_epoch
    from tuneforge.methods import get_objective
    from tuneforge.models.tokenizer import load_tokenizer

    data = write_jsonl(tmp_path / "data.jsonl", _rows("dpo"))
    cfg = make_cfg(tiny_model_dir, tmp_path, rl="dpo", datasets=[{"path": str(data)}], sample_packing=True, **SGD)
    obj = get_objective(cfg)
    prepared = obj.prepare_data(load_tokenizer(cfg))
    lengths = [int(n) for n in prepared.train["length"]]
    pairs = prepared.train.select_columns(["chosen_input_ids", "rejected_input_ids"])
    assert lengths == [len(c) + len(r) for c, r in zip(pairs["chosen_input_ids"], pairs["rejected_input_ids"],
                                                        strict=True)]
    plan = plan_epoch(lengths, epoch=0, seed=cfg.seed, micro_batch_size=12, packed=True, capacity=cfg.sequence_len)
    rows = plan[0]
    assert len(rows) < len(lengths) and sum(len(r) for r in rows) == len(lengths)
    batch = obj.collate([[prepared.train[i] for i in row] for row in rows], 0, training=True)
    assert batch["input_ids"].shape == (len(rows), cfg.sequence_len)
    assert batch["num_pairs"] == len(lengths)
    assert int((batch["doc_ids"] >= 0).sum()) == sum(lengths)


def test_pairs_longer_than_a_packed_row_are_dropped_or_rejected(tmp_path, tiny_model_dir):
    from tuneforge.errors import DataError
    from tuneforge.methods import get_objective
    from tuneforge.models.tokenizer import load_tokenizer

    rows = _rows("dpo")
    rows[0]["chosen"] = " " + " ".join(["word"] * 40)  # alone under sequence_len, but not with its rejected
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    keys = {**SGD, "sequence_len": 48}
    cfg = make_cfg(tiny_model_dir, tmp_path / "a", rl="dpo", datasets=[{"path": str(data)}], sample_packing=True, **keys)
    prepared = get_objective(cfg).prepare_data(load_tokenizer(cfg))
    assert len(prepared.train) == len(rows) - 1
    cfg = make_cfg(tiny_model_dir, tmp_path / "b", rl="dpo", datasets=[{"path": str(data)}], sample_packing=True,
                   excess_length_strategy="raise", **keys)
    with pytest.raises(DataError, match="chosen \\+ rejected tokens than sequence_len"):
        get_objective(cfg).prepare_data(load_tokenizer(cfg))


def test_packing_matches_per_sequence_logps(tiny_model_dir):
    """Direct check on the model: every sequence log-prob is the same in both layouts."""
    from test_pref_support import pair_doc, perturbed, random_examples
    from tuneforge.methods.pairs import collate_pairs, sequence_logps

    docs = [pair_doc(e) for e in random_examples(6, seed=2)]
    model = perturbed(tiny_model_dir)
    with torch.no_grad():
        flat = collate_pairs([[d] for d in docs], 0, packed=False)
        packed = collate_pairs([docs[:4], docs[4:]], 0, packed=True)
        a, b = sequence_logps(model, flat), sequence_logps(model, packed)
    for key in ("chosen_doc", "rejected_doc"):
        assert torch.allclose(a.logps[flat[key]], b.logps[packed[key]], atol=1e-5)
        assert torch.equal(a.counts[flat[key]], b.counts[packed[key]])
