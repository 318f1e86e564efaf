"""Peak memory and disk of `tuneforge preprocess` on map-style chat data, at two corpus sizes.

For each size it writes N synthetic conversations (bench/preprocess_throughput.py's generator, `--turns`
messages each) to a jsonl file, builds the tiny byte-level BPE tokenizer (`tuneforge.tiny`), and runs
`tuneforge preprocess` on a `type: chat_template` config in a child process whose memory is sampled every
0.1 s (VmRSS summed over the process and its workers, and the anonymous part alone: file pages mapped from
Arrow files count in VmRSS but the kernel can drop them). The datasets library's cache goes to a folder of
its own (HF_DATASETS_CACHE), so the files a run leaves there are counted too.

    python bench/preprocess_memory.py --rows 100000 1000000 --json results.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preprocess_throughput import WORDS, bench_workdir  # noqa: E402  (the same words as the throughput bench)


def write_conversations(path: Path, n: int, turns: int, seed: int = 0) -> None:
    """n rows of `turns` alternating user/assistant messages, written as generated (never all in memory)."""
    rng = random.Random(seed)

    def text(median_words: float) -> str:
        k = max(1, min(200, int(rng.lognormvariate(0, 0.8) * median_words)))
        return " ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + "."

    with open(path, "w") as f:
        for _ in range(n):
            messages = [{"role": "user" if t % 2 == 0 else "assistant", "content": text(12 if t % 2 == 0 else 25)}
                        for t in range(turns)]
            f.write(json.dumps({"messages": messages}) + "\n")


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):  # the process ended meanwhile
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
    return out


def _kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_sampled(command: list[str], env: dict) -> dict:
    """Run `command`; the peak of the summed VmRSS / RssAnon of its process tree, in MiB, and the wall time."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"rss": 0, "anon": 0}

    def sample() -> None:
        while proc.poll() is None:
            pids = _tree(proc.pid)
            peak["rss"] = max(peak["rss"], sum(_kib(p, "VmRSS") for p in pids))
            peak["anon"] = max(peak["anon"], sum(_kib(p, "RssAnon") for p in pids))
            time.sleep(0.1)

    start = time.perf_counter()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    output, _ = proc.communicate()
    thread.join()
    if proc.returncode:
        raise SystemExit(f"preprocess failed ({proc.returncode}):\n{output[-3000:]}")
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_mib": round(peak["rss"] / 1024),
            "peak_anon_mib": round(peak["anon"] / 1024), "output_tail": output[-400:]}


def _size(folder: Path, pattern: str = "*") -> tuple[int, int]:
    files = [f for f in folder.rglob(pattern) if f.is_file()]
    return len(files), sum(f.stat().st_size for f in files)


def measure(work: Path, rows: int, turns: int, num_proc: int | None) -> dict:
    import yaml

    data = work / f"chat-{rows}.jsonl"
    if not data.exists():
        write_conversations(data, rows, turns)
    hf_cache, prepared = work / f"hf-cache-{rows}", work / f"prepared-{rows}"
    cfg = work / f"config-{rows}.yaml"
    cfg.write_text(yaml.safe_dump({
        "base_model": str(work / "tok"), "chat_template": "chatml", "sequence_len": 2048,
        "datasets": [{"path": str(data), "type": "chat_template"}], "dataset_prepared_path": str(prepared),
        **({"dataset_num_proc": num_proc} if num_proc else {}),
    }))
    env = {**os.environ, "HF_DATASETS_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    result = run_sampled([sys.executable, "-m", "tuneforge.cli", "preprocess", str(cfg)], env)
    left_n, left_bytes = _size(hf_cache, "cache-*.arrow")
    result.update(rows=rows, data_mb=round(data.stat().st_size / 1e6, 1),
                  prepared_mb=round(_size(prepared)[1] / 1e6, 1), datasets_cache_files_left=left_n,
                  datasets_cache_mb_left=round(left_bytes / 1e6, 1),
                  datasets_cache_mb_all=round(_size(hf_cache)[1] / 1e6, 1))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--turns", type=int, default=2, help="Messages per conversation.")
    ap.add_argument("--num-proc", type=int, default=None, help="dataset_num_proc (default: tuneforge's default).")
    ap.add_argument("--workdir", type=Path, default=None, help="Where data and caches go (default: a temp dir).")
    ap.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = ap.parse_args()

    work = bench_workdir(args.workdir, "tf-prep-mem-")
    results = []
    for rows in args.rows:
        r = measure(work, rows, args.turns, args.num_proc)
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "output_tail"}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
