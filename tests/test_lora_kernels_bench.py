"""The benchmark scripts of issue #19 import and run on CPU with the tiny shape (smoke runs; the numbers
are measured on a GPU, docs/benchmarks.md)."""

from __future__ import annotations

import json

import pytest

from script_support import load_script


def test_engine_names_parse_and_unknown_ones_fail():
    bench = load_script("bench/train_throughput.py")
    assert bench.variants("tuneforge-kernels-compile") == {"kernels", "compile"}
    assert bench.variants("tuneforge") == set()
    with pytest.raises(SystemExit, match="unknown engine"):
        bench.variants("tuneforge-fast")
    ratios = bench.ratios([{"engine": "hf", "tokens_per_s": 2.0, "peak_gib": 4.0},
                           {"engine": "tuneforge-kernels", "tokens_per_s": 5.0, "peak_gib": 3.0}])
    assert ratios == {"tokens_per_s_over_hf": {"hf": 1.0, "tuneforge-kernels": 2.5},
                      "peak_gib_over_hf": {"hf": 1.0, "tuneforge-kernels": 0.75}}


@pytest.mark.slow
def test_throughput_preset_smoke(tmp_path, capsys):
    bench = load_script("bench/train_throughput.py")
    out = tmp_path / "r.jsonl"
    bench.main(["--preset", "8b-lora", "--shape", "tiny", "--seq-len", "128", "--steps", "2", "--rows", "80",
                "--engines", "tuneforge,tuneforge-kernels", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["engine"] for r in rows] == ["tuneforge", "tuneforge-kernels"]
    assert rows[0]["first_losses"] == pytest.approx(rows[1]["first_losses"], abs=1e-3)  # same training
    assert "tokens_per_s_over_tuneforge" in capsys.readouterr().out
