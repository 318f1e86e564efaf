"""Length rules (drop / truncate / raise / min_sample_len), bin packing and epoch plans."""

from __future__ import annotations

import random
import time
from collections import Counter

import numpy as np
import pytest

from tuneforge.config.schema import Config
from tuneforge.data.batches import plan_epoch
from tuneforge.data.packing import pack, pack_sequential
from tuneforge.data.pipeline import apply_length_rules, trained_per_row
from tuneforge.errors import DataError

IGN = -100


def _cfg(**kw) -> Config:
    return Config(base_model="tiny", **kw)


def _rows_dataset(rows: list[tuple[list[int], list[int]]]):
    import datasets

    return datasets.Dataset.from_dict({
        "input_ids": [r[0] for r in rows],
        "labels": [r[1] for r in rows],
        "length": [len(r[0]) for r in rows],
        "_source": [0] * len(rows),
        "_row": list(range(len(rows))),
    })


def _random_rows(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(1, 60)
        ids = [rng.randint(5, 999) for _ in range(length)]
        kind = rng.random()
        if kind < 0.15:
            labels = [IGN] * length  # nothing trained
        elif kind < 0.25:
            labels = [ids[0]] + [IGN] * (length - 1)  # only position 0 "trained": still nothing to learn
        else:
            labels = [t if rng.random() < 0.6 else IGN for t in ids]
        rows.append((ids, labels))
    return rows


def _reference_rules(rows, limit, strategy, min_len):
    """Row-by-row statement of the rules, for comparison with the column-wise implementation."""
    kept, dropped, truncated = [], Counter(), 0
    for ids, labels in rows:
        if len(ids) > limit and strategy == "truncate":
            ids, labels = ids[:limit], labels[:limit]
            truncated += 1
        if len(ids) > limit:
            dropped[f"longer than sequence_len ({limit})"] += 1
        elif min_len and len(ids) < min_len:
            dropped[f"shorter than min_sample_len ({min_len})"] += 1
        elif all(t == IGN for t in labels[1:]):
            dropped["no trained tokens"] += 1
        else:
            kept.append((ids, labels))
    return kept, dropped, truncated


# ---------------------------------------------------------------- length rules
@pytest.mark.parametrize("strategy", ["drop", "truncate"])
@pytest.mark.parametrize("min_len", [None, 10])
def test_length_rules_match_row_by_row_reference(strategy, min_len):
    rows = _random_rows(400, seed=1)
    ds = _rows_dataset(rows)
    out, stats = apply_length_rules(ds, _cfg(sequence_len=32, excess_length_strategy=strategy,
                                             min_sample_len=min_len), "datasets[0]")
    kept, dropped, truncated = _reference_rules(rows, 32, strategy, min_len)
    assert [(r["input_ids"], r["labels"]) for r in out] == kept
    assert out["length"] == [len(k[0]) for k in kept]
    assert dict(stats.dropped) == dict(dropped)
    assert stats.truncated == truncated
    assert stats.rows_out == len(kept)
    assert stats.tokens == sum(len(k[0]) for k in kept)
    assert stats.trained_tokens == sum(sum(t != IGN for t in k[1][1:]) for k in kept)


def test_truncate_cuts_ids_and_labels_together():
    ds = _rows_dataset([(list(range(10, 22)), [IGN] * 4 + list(range(14, 22))), ([5, 6, 7], [IGN, 6, 7])])
    out, stats = apply_length_rules(ds, _cfg(sequence_len=8, excess_length_strategy="truncate"), "d")
    assert out[0]["input_ids"] == list(range(10, 18))
    assert out[0]["labels"] == [IGN] * 4 + list(range(14, 18))
    assert out[0]["length"] == 8
    assert out[1]["input_ids"] == [5, 6, 7]
    assert stats.truncated == 1 and stats.trained_tokens == 4 + 2
    assert out.features["input_ids"] == ds.features["input_ids"]  # dtype kept for concatenation


def test_raise_names_the_source_row():
    ds = _rows_dataset([([1] * 5, [1] * 5), ([1] * 20, [1] * 20), ([1] * 30, [1] * 30)])
    with pytest.raises(DataError, match=r"datasets\[0\] row 1: 20 tokens exceeds sequence_len 16 \(2 rows do\)"):
        apply_length_rules(ds, _cfg(sequence_len=16, excess_length_strategy="raise"), "datasets[0]")


def test_trained_per_row_skips_position_zero_and_honours_selection():
    ds = _rows_dataset([([1, 2, 3], [1, 2, IGN]), ([4, 5], [IGN, IGN]), ([6], [6]), ([7, 8, 9, 10], [7, 8, 9, 10])])
    assert trained_per_row(ds).tolist() == [1, 0, 0, 3]
    assert trained_per_row(ds.select([3, 0])).tolist() == [3, 1]


def test_length_rules_are_columnwise_fast_at_100k_rows():
    import datasets
    import pyarrow as pa

    rng = np.random.default_rng(0)
    n = 100_000
    lengths = np.clip(rng.lognormal(np.log(150), 0.7, n).astype(np.int64), 2, 3000)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
    ids = rng.integers(5, 1000, offsets[-1]).astype(np.int32)
    labels = np.where(rng.random(offsets[-1]) < 0.5, -100, ids).astype(np.int64)
    table = pa.table({
        "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids)),
        "labels": pa.ListArray.from_arrays(pa.array(offsets), pa.array(labels)),
        "length": pa.array(lengths), "_source": pa.array(np.zeros(n, np.int64)), "_row": pa.array(np.arange(n)),
    })
    ds = datasets.Dataset(table)
    start = time.perf_counter()
    out, stats = apply_length_rules(ds, _cfg(sequence_len=2048, min_sample_len=4), "d")
    elapsed = time.perf_counter() - start
    expect_keep = (lengths <= 2048) & (lengths >= 4)
    assert stats.rows_out == int(expect_keep.sum())
    assert stats.tokens == int(lengths[expect_keep].sum())
    assert elapsed < 10, f"length rules took {elapsed:.1f}s for 100k rows"


def test_length_rules_on_paired_rows():
    """Preference pairs: the longer side decides the length, both sides are cut, a side with nothing
    trained drops the pair, and trained tokens add up over both sides."""
    import datasets

    def pair(c, cl, r, rl):
        return {"chosen_input_ids": c, "chosen_labels": cl, "rejected_input_ids": r, "rejected_labels": rl,
                "length": max(len(c), len(r)), "_source": 0, "_row": 0}

    rows = [
        pair([1, 2, 3], [IGN, 2, 3], [1, 2, 4, 5], [IGN, IGN, 4, 5]),  # kept: 2 + 2 trained
        pair([1, 2, 3], [IGN, 2, 3], [1, 9], [IGN, IGN]),  # rejected side trains nothing: dropped
        pair(list(range(10, 22)), [IGN] * 3 + list(range(13, 22)), [1, 2], [IGN, 2]),  # chosen cut to 8
    ]
    ds = datasets.Dataset.from_list(rows)
    out, stats = apply_length_rules(ds, _cfg(sequence_len=8, excess_length_strategy="truncate"), "d")
    assert dict(stats.dropped) == {"no trained tokens": 1} and stats.truncated == 1
    assert out[1]["chosen_input_ids"] == list(range(10, 18))
    assert out[1]["chosen_labels"] == [IGN] * 3 + list(range(13, 18))
    assert out[1]["rejected_input_ids"] == [1, 2] and out[1]["length"] == 8
    assert stats.trained_tokens == (2 + 2) + (5 + 1)
    assert trained_per_row(out).tolist() == [4, 6]


# ---------------------------------------------------------------- packing
def _check_bins(lengths, bins, capacity, max_docs=None):
    flat = [i for b in bins for i in b]
    assert sorted(flat) == list(range(len(lengths))), "every document exactly once"
    for b in bins:
        assert sum(lengths[i] for i in b) <= capacity
        if max_docs:
            assert len(b) <= max_docs


@pytest.mark.parametrize("capacity,max_docs", [(64, None), (100, 3), (2048, 200)])
def test_pack_never_exceeds_capacity_and_places_every_document_once(capacity, max_docs):
    rng = random.Random(capacity)
    lengths = [rng.randint(1, min(capacity, 80)) for _ in range(3000)]
    _check_bins(lengths, pack(lengths, capacity, max_docs), capacity, max_docs)
    _check_bins(lengths, pack_sequential(lengths, capacity, max_docs), capacity, max_docs)


def test_pack_is_best_fit():
    # After 8 | 7 | 5+4 the last document (1) goes to the fullest bin that fits it (1 free), where
    # first-fit would have put it with the 8.
    assert pack([8, 7, 5, 4, 1], 10) == [[0], [1], [2, 3, 4]]


def test_pack_sequential_keeps_dataset_order():
    bins = pack_sequential([4, 4, 4, 9, 1], 10)
    assert bins == [[0, 1], [2], [3, 4]]


def test_pack_rejects_a_document_longer_than_capacity():
    with pytest.raises(ValueError, match="document 1 has 11 tokens"):
        pack([3, 11], 10)


def alpaca_like_lengths(n: int, seed: int = 0) -> list[int]:
    """Lognormal lengths, median ~150 tokens, long tail cut at 1500 (like Alpaca under a Llama tokenizer)."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(150), 0.7, n)), 8, 1500).astype(int).tolist()


def efficiency(lengths: list[int], bins: list[list[int]], capacity: int) -> float:
    """Share of the packed rows' token slots that hold real tokens."""
    if not bins:
        return 0.0
    return sum(lengths[i] for b in bins for i in b) / (len(bins) * capacity)


def test_packing_efficiency_on_alpaca_like_lengths():
    lengths = alpaca_like_lengths(20_000)
    assert 140 <= np.median(lengths) <= 160 and max(lengths) == 1500
    plan = plan_epoch(lengths, epoch=0, seed=42, micro_batch_size=1, packed=True, capacity=2048, max_docs=200)
    rows = [r for mb in plan for r in mb]
    eff = efficiency(lengths, rows, 2048)
    print(f"packing efficiency (alpaca-like, 20k docs, sequence_len 2048): {100 * eff:.2f}%")
    # Lower bound: no packer can use fewer rows than ceil(tokens / capacity).
    assert len(rows) >= -(-sum(lengths) // 2048)
    assert eff >= 0.95
    seq_eff = efficiency(lengths, pack_sequential(lengths, 2048), 2048)
    assert seq_eff < eff  # next-fit in dataset order is the cheaper, less full option


# ---------------------------------------------------------------- epoch plans
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("sequential", [False, True])
def test_plan_epoch_covers_every_document_once(packed, sequential):
    lengths = alpaca_like_lengths(5000, seed=3)
    plan = plan_epoch(lengths, epoch=1, seed=7, micro_batch_size=4, packed=packed, capacity=2048,
                      group_size=1200, max_docs=50, sequential=sequential)
    rows = [r for mb in plan for r in mb]
    assert all(1 <= len(mb) <= 4 for mb in plan)
    _check_bins(lengths, rows, 2048 if packed else max(lengths), 50)
    if not packed:
        assert all(len(r) == 1 for r in rows)
    if sequential:
        assert [i for r in rows for i in r] == list(range(len(lengths)))


def test_plan_epoch_is_deterministic_per_seed_and_epoch():
    lengths = alpaca_like_lengths(3000, seed=5)
    kw = dict(micro_batch_size=2, capacity=2048, max_docs=200)
    for packed in (False, True):
        a = plan_epoch(lengths, epoch=0, seed=1, packed=packed, **kw)
        assert a == plan_epoch(lengths, epoch=0, seed=1, packed=packed, **kw)
        assert a != plan_epoch(lengths, epoch=1, seed=1, packed=packed, **kw)
        assert a != plan_epoch(lengths, epoch=0, seed=2, packed=packed, **kw)


def test_plan_epoch_without_shuffle_keeps_order():
    plan = plan_epoch([5] * 7, epoch=3, seed=0, micro_batch_size=3, packed=False, capacity=8, shuffle=False)
    assert plan == [[[0], [1], [2]], [[3], [4], [5]], [[6]]]


def test_plan_epoch_rejects_rows_longer_than_packed_rows():
    with pytest.raises(DataError, match="eval_sample_packing"):
        plan_epoch([10, 300], epoch=0, seed=0, micro_batch_size=1, packed=True, capacity=256)


def test_plan_epoch_is_fast_at_100k_rows():
    lengths = alpaca_like_lengths(100_000, seed=9)
    start = time.perf_counter()
    plan = plan_epoch(lengths, epoch=0, seed=0, micro_batch_size=4, packed=True, capacity=2048, max_docs=200)
    elapsed = time.perf_counter() - start
    assert sum(len(r) for mb in plan for r in mb) == 100_000
    assert elapsed < 5, f"plan_epoch took {elapsed:.1f}s for 100k rows"


# ---------------------------------------------------------------- split statistics
def test_split_stats_match_the_rows(write_config, write_jsonl, tiny_tokenizer):
    """Totals and per-dataset numbers after length rules, dedup, shuffle and the val split equal a recount."""
    from tuneforge.config import load
    from tuneforge.data.pipeline import prepare

    rows_a = [{"input_ids": ids, "labels": lab} for ids, lab in _random_rows(120, seed=4)]
    rows_b = [{"input_ids": ids, "labels": lab} for ids, lab in _random_rows(60, seed=5)] * 2  # all duplicated
    a, b = write_jsonl(rows_a, "a.jsonl"), write_jsonl(rows_b, "b.jsonl")
    cfg = load(write_config({"datasets": [{"path": str(a)}, {"path": str(b)}], "sequence_len": 40,
                             "val_set_size": 0.25, "dataset_exact_deduplication": True,
                             "skip_prepare_dataset": True}), [])
    data = prepare(cfg, tiny_tokenizer)

    def recount(ds, source):
        picked = [r for r in ds if r["_source"] == source]
        return (len(picked), sum(len(r["input_ids"]) for r in picked),
                sum(sum(t != IGN for t in r["labels"][1:]) for r in picked))

    for split, ds in (("train", data.train), ("eval", data.eval)):
        parts = data.by_dataset[split]
        for source, s in enumerate(parts):
            assert (s.rows_out, s.tokens, s.trained_tokens) == recount(ds, source)
        total = data.stats[split]
        assert total.rows_out == len(ds) and total.tokens == sum(s.tokens for s in parts)
    kept_a, dropped_a, _ = _reference_rules([(r["input_ids"], r["labels"]) for r in rows_a], 40, "drop", None)
    train_a = data.by_dataset["train"][0]
    assert train_a.rows_in == 120 and dict(train_a.dropped) == dict(dropped_a)
    assert train_a.rows_out + train_a.held_out == len(kept_a)
    train_b = data.by_dataset["train"][1]
    kept_b, dropped_b, _ = _reference_rules([(r["input_ids"], r["labels"]) for r in rows_b], 40, "drop", None)
    assert train_b.rows_in == 120
    assert dict(train_b.dropped) == {**dropped_b, "exact duplicate": len(kept_b) // 2}
    assert len(data.train) + len(data.eval) == len(kept_a) + train_b.rows_out + train_b.held_out
    assert len(data.eval) == round(0.25 * (len(data.train) + len(data.eval)))


def _padding_share(lengths: list[int], plan) -> float:
    slots = sum(len(mb) * max(lengths[r[0]] for r in mb) for mb in plan)
    return 1 - sum(lengths) / slots


def test_group_by_length_cuts_padding_covers_every_row_once_and_runs_the_longest_first():
    lengths = alpaca_like_lengths(5000, seed=8)
    kw = dict(epoch=2, seed=4, micro_batch_size=8, packed=False, capacity=2048)
    plain, grouped = plan_epoch(lengths, **kw), plan_epoch(lengths, by_length=True, **kw)
    print(f"padding share, batches of 8: random {_padding_share(lengths, plain):.1%}, "
          f"group_by_length {_padding_share(lengths, grouped):.1%}")
    assert _padding_share(lengths, grouped) < 0.1 < 0.4 < _padding_share(lengths, plain)
    assert sorted(r[0] for mb in grouped for r in mb) == list(range(len(lengths)))
    assert all(len(mb) <= 8 for mb in grouped)
    assert max(lengths[r[0]] for r in grouped[0]) == max(lengths)
    assert grouped == plan_epoch(lengths, by_length=True, **kw)  # deterministic per (seed, epoch): exact resume
    assert grouped != plan_epoch(lengths, by_length=True, **{**kw, "epoch": 3})


def test_length_grouping_and_in_order_sampling_need_their_settings():
    from tuneforge.config import load
    from tuneforge.config.errors import ConfigError

    with pytest.raises(ConfigError, match="group_by_length.*packing already fills rows"):
        load(data={"base_model": "x", "sample_packing": True, "group_by_length": True})
    with pytest.raises(ConfigError, match="group_by_length.*dataset order or grouped by length"):
        load(data={"base_model": "x", "curriculum_sampling": True, "group_by_length": True})


@pytest.mark.parametrize("packing", [False, True])
def test_curriculum_sampling_trains_in_dataset_order_every_epoch(packing):
    from tuneforge.config import load
    from tuneforge.engine.plan import StepPlan

    cfg = load(data={"base_model": "x", "curriculum_sampling": True, "sample_packing": packing, "sequence_len": 64,
                     "micro_batch_size": 2, "num_epochs": 2})
    plan = StepPlan(cfg, [10, 30, 20, 40, 15, 25, 35, 5])
    for epoch in (0, 1):
        order = [i for mb in plan.epoch(epoch) for row in mb for i in row]
        assert order == list(range(8))


def test_batch_flattening_puts_each_micro_batch_in_one_row():
    lengths = alpaca_like_lengths(50, seed=2)
    kw = dict(epoch=0, seed=1, micro_batch_size=4, packed=False, capacity=2048)
    plain, flat = plan_epoch(lengths, **kw), plan_epoch(lengths, flatten=True, **kw)
    assert flat == [[[row[0] for row in mb]] for mb in plain]
    grouped = plan_epoch(lengths, flatten=True, by_length=True, **kw)
    assert grouped == [[[row[0] for row in mb]] for mb in plan_epoch(lengths, by_length=True, **kw)]
