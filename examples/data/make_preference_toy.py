"""Generate the toy data of the preference and reward-model examples (deterministic; re-run to regenerate).

The task is the one of sft-tiny: "reverse: c a f e" -> "e f a c". A preference pair holds the reversed
letters as the chosen answer and random letters as the rejected one. Held-out prompts never occur in
training, so the logged eval rewards/accuracies (the share of held-out pairs whose chosen answer gets
the higher implicit reward) measures generalisation.

- pref_{train,test}.jsonl    chatml.prompt_pairs rows {prompt, chosen, rejected}  (dpo, ipo, simpo, orpo)
- kto_{train,test}.jsonl     chatml.prompt_pairs KTO rows {prompt, completion, label}: both answers, labelled
- bt_{train,test}.jsonl      bradley_terry.chat_template rows {input, chosen, rejected}  (reward model)
- steps_{train,test}.jsonl   stepwise_supervised rows {prompt, completions, labels}: a step is correct when
                             it repeats the prompt's word (process reward model)

    python examples/data/make_preference_toy.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
LETTERS = "abcdefghijklmnop"
WORDS = ["apple", "house", "water", "light", "green", "table", "river", "stone"]


def prompts(rng: random.Random, n: int, lo: int = 3, hi: int = 5) -> list[list[str]]:
    seen, out = set(), []
    while len(out) < n:
        seq = tuple(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))
        if seq not in seen:
            seen.add(seq)
            out.append(list(seq))
    return out


def wrong(rng: random.Random, seq: list[str]) -> list[str]:
    while True:
        other = [rng.choice(LETTERS) for _ in seq]
        if other != seq[::-1]:
            return other


def pair(rng: random.Random, seq: list[str]) -> dict:
    return {"prompt": "reverse: " + " ".join(seq), "chosen": " ".join(seq[::-1]), "rejected": " ".join(wrong(rng, seq))}


def steps(rng: random.Random, seq: list[str]) -> dict:
    word = rng.choice(WORDS)
    completions, labels = [], []
    for _ in seq:
        good = rng.random() < 0.5
        completions.append(word if good else rng.choice([w for w in WORDS if w != word]))
        labels.append(good)
    return {"prompt": "repeat: " + word, "completions": completions, "labels": labels}


def write(name: str, rows: list[dict]) -> None:
    (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(n_train: int = 2000, n_test: int = 128, seed: int = 1) -> None:
    rng = random.Random(seed)
    seqs = prompts(rng, n_train + n_test)
    for split, part in (("train", seqs[:n_train]), ("test", seqs[n_train:])):
        pairs = [pair(rng, s) for s in part]
        write(f"pref_{split}.jsonl", pairs)
        write(f"kto_{split}.jsonl", [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
                                     for p in pairs for side in ("chosen", "rejected")])
        write(f"bt_{split}.jsonl", [{"input": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}
                                    for p in pairs])
        write(f"steps_{split}.jsonl", [steps(rng, s) for s in part])


if __name__ == "__main__":
    main()
