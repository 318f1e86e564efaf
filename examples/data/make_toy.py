"""Generate the toy datasets of the tiny examples (deterministic; re-run to regenerate the .jsonl files).

Tasks a from-scratch tiny model learns in a minute on a laptop CPU, with a held-out split whose
sequences never occur in training, so the reported exact-match accuracy measures generalisation:

- reverse_{train,test}.jsonl         chat `messages`: "reverse: c a f e" -> "e f a c"  (sft-tiny, lora-tiny)
- sort_{train,test}.jsonl            alpaca rows: "Sort the letters." + input "d b a" -> "a b d" (alpaca-tiny)

Sorting needs no word order, only which letters occur. That matters for alpaca-tiny: behind the
~100-token Alpaca preamble, a from-scratch model learns order-dependent tasks (copy, reverse) far more
slowly, because its initially uniform attention spreads over the whole preamble.

    python examples/data/make_toy.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
LETTERS = "abcdefghijklmnop"


def sequences(rng: random.Random, n: int, lo: int = 3, hi: int = 6) -> list[list[str]]:
    seen, out = set(), []
    while len(out) < n:
        seq = tuple(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))
        if seq not in seen:
            seen.add(seq)
            out.append(list(seq))
    return out


def reverse_row(seq: list[str]) -> dict:
    return {"messages": [
        {"role": "user", "content": "reverse: " + " ".join(seq)},
        {"role": "assistant", "content": " ".join(reversed(seq))},
    ]}


def sort_row(seq: list[str]) -> dict:
    return {"instruction": "Sort the letters.", "input": " ".join(seq), "output": " ".join(sorted(seq))}


def write(name: str, rows: list[dict]) -> None:
    (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(n_train: int = 4000, n_test: int = 200, seed: int = 0) -> None:
    rng = random.Random(seed)
    seqs = sequences(rng, n_train + n_test)  # distinct: test sequences never appear in training
    train, test = seqs[:n_train], seqs[n_train:]
    write("reverse_train.jsonl", [reverse_row(s) for s in train])
    write("reverse_test.jsonl", [reverse_row(s) for s in test])
    write("sort_train.jsonl", [sort_row(s) for s in train])
    write("sort_test.jsonl", [sort_row(s) for s in test])


if __name__ == "__main__":
    main()
