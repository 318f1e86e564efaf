"""Issue #19's benchmark scripts on CPU with tiny models: time to first step from shards on disk, the
compiled first step with a cold and a warm compile cache (two fresh processes), and the loss curves of
Kahan-compensated bf16 weights against fp32 master weights. The numbers are measured on a GPU
(docs/benchmarks.md); these runs check that the scripts measure what they say."""

from __future__ import annotations

import json

import pytest

from script_support import load_script
from test_engine_support import one_thread  # noqa: F401


def test_first_step_from_disk_loads_sharded_weights(tmp_path):
    bench = load_script("bench/first_step.py")
    out = tmp_path / "r.json"
    bench.main(["--tiny", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["reinit"] is False and result["weight_shards"] > 1  # a random model saved as several shards
    assert 0 < result["model_start"] < result["model_built"] < result["step_1"] < result["step_2"]
    assert abs(result["first_step_s"] - (result["step_1"] - result["model_built"])) <= 0.011  # rounding


@pytest.mark.slow  # two fresh Python processes (imports alone take seconds each)
def test_compile_cache_mode_runs_two_processes_on_one_cache(tmp_path, monkeypatch):
    bench = load_script("bench/first_step.py")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the children's tiny models train faster on one thread
    cache, out = tmp_path / "inductor", tmp_path / "r.json"
    bench.main(["--tiny", "--rows", "8", "--seq-len", "64", "--compile-cache", "--cache-dir", str(cache), "--out", str(out)])
    result = json.loads(out.read_text())
    cold, warm = result["cold"], result["warm"]
    assert result["cache_dir"] == str(cache)
    # both runs compiled from random init and saw the same cache; the cold one started from an empty one
    assert cold["compile"] is warm["compile"] is True and cold["reinit"] is warm["reinit"] is True
    assert cold["compile_cache_dir"] == warm["compile_cache_dir"] == str(cache)
    assert cold["cache_files_before"] == 0
    assert warm["cache_files_before"] == cold["cache_files_after"]  # on CPU nothing compiles: 0 and 0
    assert result["first_step_saved_s"] == round(cold["first_step_s"] - warm["first_step_s"], 2)


def test_master_weights_curve_runs_every_arm_on_the_same_rows(tmp_path):
    bench = load_script("bench/master_weights_curve.py")
    out = tmp_path / "r.json"
    bench.main(["--tiny", "--steps", "30", "--out", str(out)])
    result = json.loads(out.read_text())
    arms = result["arms"]
    assert list(arms) == ["fp32", "kahan", "bf16", "fp32_seed2"]
    assert all(len(a["losses"]) == 30 for a in arms.values())
    # same initialisation and first batch in the three arms of seed 0 (bf16 rounding apart); another seed differs
    assert abs(arms["kahan"]["losses"][0] - arms["fp32"]["losses"][0]) < 2e-3
    assert abs(arms["fp32_seed2"]["losses"][0] - arms["fp32"]["losses"][0]) > 1e-3
    kahan = arms["kahan"]["losses"]
    assert sum(kahan[-5:]) / 5 < sum(kahan[:5]) / 5 - 0.8  # it learns (from ln(vocab) ~ 6.9 nats)
    summary = result["summary"]
    means = {k: sum(a["losses"]) / 30 for k, a in arms.items()}
    assert summary["last_steps"] == 30 and summary["mean_loss_last"] == {k: round(v, 4) for k, v in means.items()}
    assert summary["minus_fp32"]["kahan"] == round(means["kahan"] - means["fp32"], 4)
    assert summary["seed_noise"] == round(abs(means["fp32_seed2"] - means["fp32"]), 4)
    assert summary["kahan_within_noise"] == (abs(means["kahan"] - means["fp32"]) <= abs(means["fp32_seed2"] - means["fp32"]))
    assert result["setup"]["tokens_per_step"] == 256 and result["setup"]["corpus_tokens"] >= 256 * 30


def test_synthetic_corpus_has_zipf_words_and_grammar():
    bench = load_script("bench/master_weights_curve.py")
    rows, vocab = bench.corpus_rows(20_000, 400, 128, seed=0)
    assert all(r[0] == 1 and r[-1] == 2 and len(r) <= 128 for r in rows)
    assert rows == bench.corpus_rows(20_000, 400, 128, seed=0)[0]  # seeded
    from collections import Counter

    counts = Counter(t for r in rows for t in r[1:-1])
    ranked = [c for _, c in counts.most_common()]
    assert max(counts) < vocab and ranked == sorted(ranked, reverse=True)
    assert counts.most_common(1)[0][0] == 3  # ids are frequency ranks: the most frequent word is id 3
    # a heavy head and a long tail, as in text: the top 1% of word types cover far more than 1% of tokens
    top = sum(ranked[: max(1, len(ranked) // 100)]) / sum(ranked)
    assert top > 0.1 and len(ranked) > 200


def test_master_weights_model_dir_covers_a_corpus_larger_than_the_tiny_tokenizer(tmp_path):
    # the 1B arm's corpus has 8000 word ids; pre-tokenized rows are checked against len(tokenizer)
    bench = load_script("bench/master_weights_curve.py")
    from transformers import AutoConfig, AutoTokenizer

    path = bench.make_model_dir(tmp_path, "tiny", 1500)
    assert len(AutoTokenizer.from_pretrained(path)) == 1500
    assert AutoConfig.from_pretrained(path).vocab_size == 1536
