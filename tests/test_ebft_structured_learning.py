"""A tiny EBFT run learns (issue #18's acceptance): the alignment metric and the greedy exact-match rate rise.

Task: "last: b d a ->" has the ground truth " a" (the prompt's last letter; 6 letters, 216 prompts).
The tiny Llama is first SFT-trained for 25 steps here, so that its greedy answers are right about a
third of the time and its samples are not noise; EBFT then trains it 20 steps on the ground truths
alone (no reward function, no verifier).

Features: the embedding layer (`feature_layers: [0.0]`) pooled over the completion. The deeper hidden
states of a 2-layer model this close to random are dominated by one direction shared by every
sequence (any completion scores cosine ~0.98 with any ground truth there), which leaves no signal;
with a pretrained model the default layers are the right choice (docs/ebft.md). The task has one right
answer, so `diversity_coef: 0`. Measured (seed 0): greedy exact match 0.36 -> 0.50, mean alignment of
the first 5 steps 0.69 -> last 5 steps 0.72.
"""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

LETTERS = "abcdef"
ROWS = [(f"last: {' '.join(s)} ->", " " + s[-1]) for s in itertools.product(LETTERS, repeat=3)]


def _encoded(tok):
    return [(tok(p, add_special_tokens=False)["input_ids"], tok(g, add_special_tokens=False)["input_ids"]
             + [tok.eos_token_id]) for p, g in ROWS]


@torch.no_grad()
def exact_match(model, tok) -> float:
    """Share of the 216 prompts whose greedy completion is exactly the ground truth and EOS."""
    was, hits = model.training, 0
    model.eval()
    enc = _encoded(tok)
    x = torch.tensor([p for p, _ in enc])  # every prompt has the same length
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    for row, (_, gt) in zip(out, enc, strict=True):
        hits += row[x.shape[1]: x.shape[1] + len(gt)].tolist() == gt
    model.train(was)
    return hits / len(enc)


@pytest.fixture
def warm_start(tmp_path, tiny_model_dir, tiny_tokenizer):
    """The tiny model after 25 SFT steps on the task (batch 32, AdamW 3e-3), saved as a base model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    enc, rng = _encoded(tiny_tokenizer), random.Random(0)
    for _ in range(25):
        batch = rng.sample(enc, 32)
        ids = torch.tensor([p + g for p, g in batch])
        labels = torch.tensor([[-100] * len(p) + g for p, g in batch])
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path / "warm"
    model.save_pretrained(str(out))
    tiny_tokenizer.save_pretrained(str(out))
    (tmp_path / "last.jsonl").write_text("".join(json.dumps({"prompt": p, "ground_truth": g}) + "\n" for p, g in ROWS))
    return out


@pytest.mark.slow
def test_alignment_and_greedy_exact_match_rise(warm_start, write_config, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from tuneforge.config import load
    from tuneforge.engine.run import train

    before = exact_match(AutoModelForCausalLM.from_pretrained(str(warm_start)), tiny_tokenizer)
    cfg = load(write_config({
        "base_model": str(warm_start), "rl": "ebft", "datasets": [{"path": "last.jsonl", "type": "prompt"}],
        "ebft": {"feature_layers": [0.0], "embed_method": "completion_mean", "diversity_coef": 0.0},
        "trl": {"num_generations": 8, "max_completion_length": 8, "temperature": 0.7},
        "micro_batch_size": 32, "max_steps": 20, "learning_rate": 1e-3, "lr_scheduler": "constant",
        "optimizer": "adamw_torch", "weight_decay": 0.0, "logging_steps": 1, "save_strategy": "no", "seed": 0,
    }))
    result = train(cfg, show_progress=False)
    alignment = [r["ebft/alignment"] for r in result.history if r["type"] == "train"]
    after = exact_match(result.model, tiny_tokenizer)
    assert 0.2 < before < 0.45, before  # partly trained: room to rise
    assert after >= before + 0.1, (before, after)
    first, last = sum(alignment[:5]) / 5, sum(alignment[-5:]) / 5
    assert last > first + 0.02, alignment
