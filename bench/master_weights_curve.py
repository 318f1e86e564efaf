"""Loss curves of bf16 weights with Kahan-compensated AdamW against fp32 master weights (issue #19).

Four arms run back to back in one process through tuneforge's trainer, on the same rows in the same order
and from the same random initialisation:

- `fp32`: fp32 master weights, bf16 autocast, fused AdamW (fp32 states): the reference;
- `kahan`: `bf16_master_weights: kahan` (bf16 weights, torch-optimi's AdamW with Kahan summation);
- `bf16`: `torch_dtype: bfloat16` with plain fused AdamW (small updates round away: the gap Kahan closes);
- `fp32_seed2`: the reference with another seed (another initialisation and row order): the noise.

Text: a synthetic corpus with the statistics of real text, generated here (no download): a Zipf-distributed
vocabulary of made-up words in word classes, sentences from a small probabilistic grammar
(determiner, adjective, noun, verb, adverb, preposition), each noun preferring a few verbs, and each document
drawing its content words from one of 16 topics. A word-level vocabulary counted on the corpus (ids by
frequency) tokenizes it; documents are packed into rows of --seq-len tokens. Model: Llama-3.2-1B's shape
(d=2048, 16 layers, 32/8 heads) with the corpus's vocabulary, random init (`--shape tiny` for CPU).

Output: --out JSON with every arm's per-step losses, its time and peak memory, and a summary (mean loss over
the last 50 steps per arm, each arm minus fp32, the seed noise |fp32_seed2 - fp32|); --plot PNG of the curves.

    python bench/master_weights_curve.py --out master_weights.json --plot master_weights.png   # 1B, one H100
    python bench/master_weights_curve.py --tiny --steps 30 --out r.json                         # CPU smoke run
    python bench/master_weights_curve.py --plot-only master_weights.json --plot master_weights.png
"""

from __future__ import annotations

import argparse
import bisect
import gc
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import SHAPES  # noqa: E402

ARMS = {
    "fp32": {},
    "kahan": {"bf16_master_weights": "kahan"},
    "bf16": {"torch_dtype": "bfloat16"},
    "fp32_seed2": {"seed_offset": 1},
}
COLORS = {"fp32": "black", "kahan": "tab:blue", "bf16": "tab:red", "fp32_seed2": "tab:grey"}
MODEL_SHAPES = {
    "1b": {k: v for k, v in SHAPES["llama-1b"].items() if k != "vocab_size"},
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=1024),
}
# Per shape: words in the corpus vocabulary, sequence length, rows per step, peak learning rate.
DEFAULTS = {"1b": dict(words=8000, seq_len=1024, micro_batch=2, lr=1e-4),
            "tiny": dict(words=400, seq_len=128, micro_batch=2, lr=2e-3)}
LAST = 50  # the summary averages the last LAST steps (all steps of a shorter run)


# ---------------------------------------------------------------- corpus
class Grammar:
    """Word classes with Zipf frequencies, topics that reweight the content words, nouns' preferred verbs."""

    CLASS_SHARES = {"det": 0.002, "prep": 0.01, "adv": 0.09, "adj": 0.25, "verb": 0.25, "noun": 0.398}

    def __init__(self, n_words: int, rng: random.Random, topics: int = 16):
        self.rng = rng
        self.words: dict[str, list[str]] = {}
        made = set()
        for cls, share in self.CLASS_SHARES.items():
            n = max(4, int(n_words * share))
            self.words[cls] = [self._new_word(made) for _ in range(n)]
        self.cum = {cls: _zipf_cum(len(ws)) for cls, ws in self.words.items()}
        # a topic is a random permutation of each content class: its frequent words are its own
        self.topics = [{cls: rng.sample(range(len(self.words[cls])), len(self.words[cls]))
                        for cls in ("noun", "verb", "adj")} for _ in range(topics)]
        n_verbs = len(self.words["verb"])
        self.noun_verbs = [[rng.randrange(n_verbs) for _ in range(3)] for _ in self.words["noun"]]

    def _new_word(self, made: set) -> str:
        while True:
            word = "".join(self.rng.choice("bdfgklmnprstvz") + self.rng.choice("aeiou")
                           for _ in range(self.rng.randint(1, 3)))
            if word not in made:
                made.add(word)
                return word

    def _pick(self, cls: str, topic: dict | None = None) -> int:
        rank = bisect.bisect_left(self.cum[cls], self.rng.random())
        return topic[cls][rank] if topic is not None and cls in topic else rank

    def _noun_phrase(self, topic: dict, out: list[str]) -> int:
        out.append(self.words["det"][self._pick("det")])
        if self.rng.random() < 0.4:
            out.append(self.words["adj"][self._pick("adj", topic)])
        noun = self._pick("noun", topic)
        out.append(self.words["noun"][noun])
        return noun

    def sentence(self, topic: dict, out: list[str]) -> None:
        subject = self._noun_phrase(topic, out)
        verb = (self.rng.choice(self.noun_verbs[subject]) if self.rng.random() < 0.6 else self._pick("verb", topic))
        out.append(self.words["verb"][verb])
        if self.rng.random() < 0.7:
            self._noun_phrase(topic, out)
        else:
            out.append(self.words["adv"][self._pick("adv")])
        if self.rng.random() < 0.3:
            out.append(self.words["prep"][self._pick("prep")])
            self._noun_phrase(topic, out)
        out.append(".")

    def document(self, max_words: int) -> list[str]:
        topic = self.rng.choice(self.topics)
        out: list[str] = []
        for _ in range(self.rng.randint(2, 24)):
            if len(out) >= max_words - 16:
                break
            self.sentence(topic, out)
        return out


def _zipf_cum(n: int, s: float = 1.1) -> list[float]:
    weights = list(itertools.accumulate(1.0 / (r + 1) ** s for r in range(n)))
    return [w / weights[-1] for w in weights]


def corpus_rows(n_tokens: int, n_words: int, max_len: int, seed: int = 0) -> tuple[list[list[int]], int]:
    """Documents of at least `n_tokens` tokens in all, as token ids (bos, words, eos); returns the rows and
    the vocabulary size. The vocabulary is counted on the corpus: 0-2 pad/bos/eos, then words by frequency."""
    grammar = Grammar(n_words, random.Random(seed))
    docs, total = [], 0
    while total < n_tokens:
        doc = grammar.document(max_len - 2)
        docs.append(doc)
        total += len(doc) + 2
    counts = Counter(w for doc in docs for w in doc)
    ids = {w: i + 3 for i, (w, _) in enumerate(counts.most_common())}
    return [[1, *(ids[w] for w in doc), 2] for doc in docs], len(ids) + 3


# ---------------------------------------------------------------- training
def make_model_dir(root: Path, shape: str, vocab: int) -> Path:
    from transformers import LlamaConfig

    from tuneforge.tiny import build_tiny_tokenizer

    path = root / f"model-{shape}"
    tokenizer = build_tiny_tokenizer(path)
    if vocab > len(tokenizer):  # pre-tokenized rows are checked against the tokenizer: cover every word id
        tokenizer.add_tokens([f"<word{i}>" for i in range(len(tokenizer), vocab)])
        tokenizer.save_pretrained(str(path))
    size = -(-max(vocab, len(tokenizer)) // 64) * 64  # the embeddings are never resized
    LlamaConfig(**MODEL_SHAPES[shape], vocab_size=size, bos_token_id=1, eos_token_id=2,
                pad_token_id=0).save_pretrained(path)
    return path


def arm_config(args, name: str, model_dir: Path, data: Path, work: Path) -> dict:
    keys = dict(ARMS[name])
    seed = args.seed + keys.pop("seed_offset", 0)
    return {
        "base_model": str(model_dir), "reinit_weights": True, "bf16": True, "seed": seed,
        "datasets": [{"path": str(data)}], "dataset_prepared_path": str(work / "prepared"),
        "sequence_len": args.seq_len, "sample_packing": True, "micro_batch_size": args.micro_batch,
        "gradient_accumulation_steps": 1, "max_steps": args.steps, "learning_rate": args.lr,
        "lr_scheduler": "cosine", "warmup_steps": max(1, args.steps // 20), "weight_decay": 0.0,
        "optimizer": "adamw_torch_fused", "logging_steps": 1, "save_strategy": "no",
        "output_dir": str(work / f"out-{name}"), **keys,
    }


def train_arm(cfg) -> list[dict]:
    """The steps of `tuneforge train` up to the trained model (engine/run.py), without writing the final
    weights (seconds per arm at 1B, nothing to measure): objective, data, model, Trainer. Returns the
    training records."""
    from accelerate.utils import set_seed

    from tuneforge.engine.trainer import Trainer
    from tuneforge.methods import get_objective
    from tuneforge.models.load import load_model
    from tuneforge.models.tokenizer import load_tokenizer

    objective = get_objective(cfg)
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg)
    data = objective.prepare_data(tokenizer)
    set_seed(cfg.seed)
    model = load_model(cfg, tokenizer)
    result = Trainer(cfg, model, tokenizer, objective, data, output_dir=cfg.output_path(), show_progress=False).train()
    return [r for r in result.history if r.get("type") == "train"]


def run_arm(args, name: str, model_dir: Path, data: Path, work: Path) -> dict:
    import torch

    from tuneforge.config import load

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    records = train_arm(load(data=arm_config(args, name, model_dir, data, work)))
    out = {"losses": [round(r["loss"], 5) for r in records], "seconds": round(time.perf_counter() - start, 1),
           "tokens_per_s": round(statistics.median(r["tokens_per_second"] for r in records[1:] or records))}
    if cuda:
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def summarize(arms: dict[str, dict]) -> dict:
    last = {name: statistics.mean(a["losses"][-LAST:]) for name, a in arms.items()}
    ref = last["fp32"]
    summary = {"last_steps": min(LAST, len(arms["fp32"]["losses"])),
               "mean_loss_last": {k: round(v, 4) for k, v in last.items()},
               "minus_fp32": {k: round(v - ref, 4) for k, v in last.items() if k != "fp32"}}
    if "fp32_seed2" in last:
        noise = abs(last["fp32_seed2"] - ref)
        summary["seed_noise"] = round(noise, 4)
        if "kahan" in last:
            summary["kahan_within_noise"] = abs(last["kahan"] - ref) <= noise
    return summary


# ---------------------------------------------------------------- plot
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=[2, 1])
    arms = result["arms"]
    ref = _smooth(arms["fp32"]["losses"])
    for name, arm in arms.items():
        color = COLORS[name]
        curve = _smooth(arm["losses"])
        steps = range(1, len(curve) + 1)
        top.plot(steps, curve, label=name, linewidth=1.2, color=color)
        if name != "fp32":
            bottom.plot(steps, [c - r for c, r in zip(curve, ref, strict=False)], label=f"{name} - fp32",
                        linewidth=1, color=color)
    top.set_ylabel("training loss (EMA 0.9)")
    top.set_title(f"{result['setup']['shape']} shape, {result['setup']['tokens_per_step']:,} tokens per step")
    top.legend()
    bottom.axhline(0, color="grey", linewidth=0.6)
    bottom.set_ylabel("difference to fp32")
    bottom.set_xlabel("optimizer step")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _smooth(values: list[float], keep: float = 0.9) -> list[float]:
    out, level = [], values[0]
    for v in values:
        level = keep * level + (1 - keep) * v
        out.append(level)
    return out


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1b", choices=sorted(MODEL_SHAPES))
    p.add_argument("--tiny", action="store_true", help="--shape tiny (CPU smoke run)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=None, help="packed rows per step")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (cosine, 5%% warm-up)")
    p.add_argument("--words", type=int, default=None, help="words in the corpus vocabulary")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated, from " + ", ".join(ARMS))
    p.add_argument("--out", default=None, help="the JSON of curves and summary")
    p.add_argument("--plot", default=None, help="a PNG of the curves (needs matplotlib)")
    p.add_argument("--plot-only", default=None, help="only draw --plot from this earlier --out JSON")
    args = p.parse_args(argv)
    if args.plot_only:
        plot(json.loads(Path(args.plot_only).read_text()), Path(args.plot or "master_weights.png"))
        return 0
    if args.tiny:
        args.shape = "tiny"
    for key, value in DEFAULTS[args.shape].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    arms = args.arms.split(",")
    if "fp32" not in arms or set(arms) - set(ARMS):
        raise SystemExit(f"--arms: a comma-separated list from {', '.join(ARMS)} that includes fp32")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(args, arms)
    print(json.dumps(result["summary"]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result) + "\n")
    if args.plot:
        try:
            plot(result, Path(args.plot))
        except ImportError:  # a GPU image without matplotlib: the JSON is written, draw it elsewhere
            print(f"no matplotlib here: draw it with --plot-only {args.out or 'RESULT.json'} --plot {args.plot}",
                  file=sys.stderr)
    return 0


def run(args, arms: list[str]) -> dict:
    tokens_per_step = args.seq_len * args.micro_batch
    start = time.perf_counter()
    # 10% more text than the steps consume: packing leaves a little of each row empty
    rows, vocab = corpus_rows(int(tokens_per_step * args.steps * 1.1), args.words, args.seq_len, args.seed)
    setup = {"shape": args.shape, "steps": args.steps, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
             "tokens_per_step": tokens_per_step, "lr": args.lr, "vocab": vocab, "documents": len(rows),
             "corpus_tokens": sum(map(len, rows)), "corpus_s": round(time.perf_counter() - start, 1)}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "rows.jsonl"
        data.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
        model_dir = make_model_dir(work, args.shape, vocab)
        for name in arms:
            results[name] = run_arm(args, name, model_dir, data, work)
            print(json.dumps({"arm": name, **{k: v for k, v in results[name].items() if k != "losses"},
                              "first_loss": results[name]["losses"][0], "last_loss": results[name]["losses"][-1]}),
                  flush=True)
    setup["total_s"] = round(time.perf_counter() - start, 1)
    import torch

    if torch.cuda.is_available():
        setup["device"] = torch.cuda.get_device_name()
    setup["torch"] = torch.__version__
    return {"setup": setup, "arms": results, "summary": summarize(results)}


if __name__ == "__main__":
    sys.exit(main())
