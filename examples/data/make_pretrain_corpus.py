"""Write the toy corpus of examples/pretrain-tiny.yaml: short documents in a tiny, regular language.

Each document is a few sentences about made-up animals ("the red fox sees two small birds. ..."). The grammar
is regular enough that a tiny model from scratch learns it within a few hundred steps, so the training and
held-out losses fall far below the uniform baseline. Deterministic: `python examples/data/make_pretrain_corpus.py`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
COLOURS = ["red", "blue", "green", "grey", "white", "black"]
ANIMALS = ["fox", "cat", "dog", "owl", "bird", "frog", "goat", "bear"]
VERBS = ["sees", "follows", "finds", "hears", "helps", "watches"]
NUMBERS = ["one", "two", "three", "four", "five"]
SIZES = ["small", "big", "old", "young"]
PLACES = ["near the river", "in the forest", "on the hill", "under the tree", "by the lake"]


def sentence(rng: random.Random) -> str:
    n = rng.choice(NUMBERS)
    animal = rng.choice(ANIMALS) + ("" if n == "one" else "s")
    return (f"the {rng.choice(COLOURS)} {rng.choice(ANIMALS)} {rng.choice(VERBS)} {n} {rng.choice(SIZES)} "
            f"{animal} {rng.choice(PLACES)}.")


def document(rng: random.Random) -> str:
    return " ".join(sentence(rng) for _ in range(rng.randint(1, 4)))


def main() -> None:
    rng = random.Random(11)
    for name, n in (("pretrain_corpus.jsonl", 1500), ("pretrain_test.jsonl", 100)):
        with open(HERE / name, "w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": document(rng)}) + "\n")


if __name__ == "__main__":
    main()
