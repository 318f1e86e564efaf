"""Preprocessing throughput: tuneforge's `prepare` vs a plain `datasets.map` + `apply_chat_template`.

Both sides read the same jsonl of synthetic multi-turn conversations (2-6 messages after an optional
system prompt, lognormal message lengths) with the same tiny byte-level BPE tokenizer and the chatml
template, in the same process:

  baseline   datasets.map(batched) of tokenizer.apply_chat_template(messages, tokenize=True): token
             ids only, no labels, no length rules.
  tuneforge  pipeline.build: `type: chat_template` formatting + per-turn label masking + length rules
             (the work `prepare` does before caching); the cache key (it hashes the data file's
             contents) and the cache write are timed separately.

It also reports how many rows get exactly the baseline's token ids (our masking tokenizes the rendered
text piece by piece, so a different token boundary would show up here).

    python bench/preprocess_throughput.py --rows 100000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_TEXT = (
    "the a of to and in is it you that he was for on are with as his they be at one have this from or had "
    "by word but what some we can out other were all there when up use your how said each she which do "
    "their time if will way about many then them write would like so these her long make thing see him two "
    "has look more day could go come did number sound no most people my over know water than call first "
    "who may down side been now find any new work part take get place made live where after back little "
    "only round man year came show every good me give our under name very through just form sentence great "
    "think say help low line differ turn cause much mean before move right boy old too same tell does set"
)
WORDS = _TEXT.split(" ")


def synth_conversations(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)

    def text(median_words: float) -> str:
        k = max(1, min(400, int(rng.lognormvariate(0, 0.8) * median_words)))
        return " ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + rng.choice([".", "?", "!"])

    rows = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": text(12)})
        for t in range(rng.randint(2, 6)):
            role = "user" if t % 2 == 0 else "assistant"
            messages.append({"role": role, "content": text(20 if role == "user" else 45)})
        if messages[-1]["role"] != "assistant":
            messages.append({"role": "assistant", "content": text(45)})
        rows.append({"messages": messages})
    return rows


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bench_workdir(workdir: Path | None, prefix: str) -> Path:
    """The memory benches' work folder (a fresh temp folder unless given) with the tiny tokenizer built once in
    it; prints the machine line every result starts with."""
    from tuneforge.tiny import build_tiny_tokenizer

    work = workdir or Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "tok").exists():
        build_tiny_tokenizer(work / "tok")
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs; work dir {work}")
    return work


def baseline(data: Path, tokenizer, num_proc: int | None, fingerprint: str | None = None):
    import datasets

    ds = datasets.load_dataset("json", data_files=str(data), split="train")

    def encode(batch):
        out = tokenizer.apply_chat_template(batch["messages"], tokenize=True)
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
        return {"input_ids": ids}

    return ds.map(encode, batched=True, remove_columns=ds.column_names, num_proc=num_proc,
                  load_from_cache_file=False, new_fingerprint=fingerprint)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-proc", type=int, default=None, help="dataset_num_proc for both sides (default: 1).")
    ap.add_argument("--repeat", type=int, default=1, help="Time each side this many times; keep the best.")
    ap.add_argument("--sequence-len", type=int, default=8192)
    ap.add_argument("--workdir", type=Path, default=None, help="Where the data/cache go (default: a temp dir).")
    ap.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = ap.parse_args()

    import datasets
    import yaml

    from tuneforge.config import load
    from tuneforge.data import cache
    from tuneforge.data.pipeline import build
    from tuneforge.models.tokenizer import load_tokenizer
    from tuneforge.tiny import build_tiny_tokenizer

    datasets.disable_progress_bars()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="tf-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(work / "tok")
    data = work / "conversations.jsonl"
    t = time.perf_counter()
    data.write_text("".join(json.dumps(r) + "\n" for r in synth_conversations(args.rows, args.seed)))
    print(f"wrote {args.rows:,} conversations ({data.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t:.1f}s")
    cfg_path = work / "config.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "base_model": str(work / "tok"), "chat_template": "chatml", "sequence_len": args.sequence_len,
        "datasets": [{"path": str(data), "type": "chat_template"}],
        "dataset_prepared_path": str(work / "prepared"), "dataset_num_proc": args.num_proc,
    }))
    cfg = load(cfg_path, [])
    tokenizer = load_tokenizer(cfg)
    datasets.load_dataset("json", data_files=str(data), split="train")  # JSON -> Arrow once, for both sides

    # Sides alternate and each keeps its best time: the machine may be shared, and noise only adds time.
    # "baseline, fixed fingerprint" is the same baseline with new_fingerprint set, so datasets skips
    # dill-hashing the closure (tokenizer included), as our pipeline does.
    times: dict[str, list[float]] = {"baseline": [], "baseline_fp": [], "tuneforge": []}
    for _ in range(args.repeat):
        t = time.perf_counter()
        base = baseline(data, tokenizer, args.num_proc)
        times["baseline"].append(time.perf_counter() - t)
        t = time.perf_counter()
        baseline(data, tokenizer, args.num_proc, fingerprint="bench-baseline")
        times["baseline_fp"].append(time.perf_counter() - t)
        t = time.perf_counter()
        ours = build(cfg, tokenizer)
        times["tuneforge"].append(time.perf_counter() - t)
    t_base, t_base_fp, t_ours = (min(times[k]) for k in ("baseline", "baseline_fp", "tuneforge"))
    base_tokens = sum(len(x) for x in base["input_ids"])
    st = ours.stats["train"]

    t = time.perf_counter()
    key, material = cache.cache_key(cfg, tokenizer)
    t_key = time.perf_counter() - t
    t = time.perf_counter()
    payload = {"splits": {k: v.as_dict() for k, v in ours.stats.items()},
               "by_dataset": {k: [x.as_dict() for x in v] for k, v in ours.by_dataset.items()}}
    cache.save(cache.cache_root(cfg), key, material, {"train": ours.train}, payload)
    t_write = time.perf_counter() - t

    # Same token ids as the plain rendering? Compare by source row.
    by_row = dict(zip(ours.train["_row"], ours.train["input_ids"], strict=True))
    base_ids = base["input_ids"]
    same = sum(1 for r, ids in by_row.items() if base_ids[r] == ids)

    res = {
        "rows": args.rows, "machine": f"{cpu_name()}, {os.cpu_count()} CPUs",
        "python": sys.version.split()[0], "num_proc": args.num_proc or 1,
        "baseline_s": t_base, "baseline_rows_per_s": args.rows / t_base, "baseline_tokens_per_s": base_tokens / t_base,
        "baseline_fixed_fingerprint_s": t_base_fp,
        "tuneforge_s": t_ours, "tuneforge_rows_per_s": args.rows / t_ours, "tuneforge_tokens_per_s": st.tokens / t_ours,
        "tuneforge_vs_baseline_time": t_ours / t_base, "rows_out": st.rows_out, "tokens": st.tokens,
        "trained_share": st.trained_tokens / st.tokens, "cache_key_s": t_key,
        "cache_write_s": t_write,
        "identical_ids_rows": same, "all_times_s": times, "baseline_tokens": base_tokens,
    }
    print(f"baseline  (map + apply_chat_template): {t_base:7.1f}s  {res['baseline_rows_per_s']:9,.0f} rows/s  "
          f"{res['baseline_tokens_per_s']:11,.0f} tokens/s")
    print(f"baseline, fixed fingerprint:           {t_base_fp:7.1f}s  {args.rows / t_base_fp:9,.0f} rows/s  "
          f"{base_tokens / t_base_fp:11,.0f} tokens/s")
    print(f"tuneforge (format + mask + lengths):   {t_ours:7.1f}s  {res['tuneforge_rows_per_s']:9,.0f} rows/s  "
          f"{res['tuneforge_tokens_per_s']:11,.0f} tokens/s")
    print(f"time ratio tuneforge / baseline: {res['tuneforge_vs_baseline_time']:.2f}x")
    print(f"cache key (content hash of {data.stat().st_size / 1e6:.0f} MB): {t_key:.2f}s; "
          f"cache write (atomic save_to_disk + marker): {t_write:.1f}s")
    print(f"rows out {st.rows_out:,}, tokens {st.tokens:,} (baseline {base_tokens:,}), trained share "
          f"{100 * res['trained_share']:.1f}%, rows with ids identical to the baseline: {same:,}/{len(by_row):,}")
    print(f"machine: {res['machine']}, Python {res['python']}, num_proc {res['num_proc']}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
