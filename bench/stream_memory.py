"""Memory and throughput of the pretraining stream (data/streaming.py) while the corpus grows 10x.

For each corpus size it writes N generated text documents (JSON lines, lognormal lengths, the words of
bench/preprocess_throughput.py), then reads the whole corpus once through one process's stream, exactly
as training does (`pretraining_dataset:` -> tokenize -> pack into sequence_len rows), sampling this process's
resident memory (VmRSS) every 1,000 rows. It reports the peak and the tokens per second the stream delivers
(one process; with --world W it is process 0 of W, which reads every W-th document). The stream is shuffled in
windows of --buffer rows (streaming_multipack_buffer_size, default 10,000, as a config that does not set it;
0: shuffle_merged_datasets false, read in order).

    python bench/stream_memory.py --docs 20000 200000 --json results.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preprocess_throughput import WORDS, bench_workdir  # noqa: E402  (the same words as the throughput bench)


def write_corpus(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            k = max(1, min(2000, int(rng.lognormvariate(0, 0.9) * 120)))
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(k))}) + "\n")


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def read_once(cfg, tokenizer, rank: int, world: int) -> dict:
    """Read one whole pass of this process's shard; the peak VmRSS and the token rate."""
    from tuneforge.data.streaming import StreamSpec

    stream = StreamSpec(cfg, tokenizer).open(rank, world)
    tokens, rows, peak, start_rss = 0, 0, 0.0, rss_mib()
    start = time.perf_counter()
    while stream.passes == 0:
        tokens += sum(len(d["input_ids"]) for d in stream.next_row())
        rows += 1
        if rows % 1000 == 0:
            peak = max(peak, rss_mib())
    seconds = time.perf_counter() - start
    return {"rows": rows, "tokens": tokens, "seconds": round(seconds, 1),
            "tokens_per_s": round(tokens / seconds), "rss_start_mib": round(start_rss, 1),
            "rss_peak_mib": round(max(peak, rss_mib()), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, nargs="+", default=[20_000, 200_000])
    ap.add_argument("--sequence-len", type=int, default=2048)
    ap.add_argument("--world", type=int, default=1, help="Read as process 0 of this many.")
    ap.add_argument("--buffer", type=int, default=10_000, help="Shuffle window in rows (0: no shuffling).")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import yaml

    from tuneforge.config import load
    from tuneforge.models.tokenizer import load_tokenizer

    work = bench_workdir(args.workdir, "tf-stream-mem-")
    results = []
    for n in args.docs:
        corpus = work / f"corpus-{n}.jsonl"
        if not corpus.exists():
            write_corpus(corpus, n)
        cfg_path = work / f"config-{n}.yaml"
        cfg_path.write_text(yaml.safe_dump({
            "base_model": str(work / "tok"), "sequence_len": args.sequence_len, "max_steps": 1,
            "pretraining_dataset": [{"path": str(corpus), "type": "pretrain"}],
            "shuffle_merged_datasets": args.buffer > 0, "streaming_multipack_buffer_size": max(args.buffer, 1),
        }))
        cfg = load(cfg_path, [])
        result = {"docs": n, "buffer": args.buffer, "corpus_mb": round(corpus.stat().st_size / 1e6, 1),
                  **read_once(cfg, load_tokenizer(cfg), 0, args.world)}
        results.append(result)
        print(json.dumps(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
