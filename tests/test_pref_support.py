"""Helpers shared by the preference/reward-model tests, and checks of the pair batch layout itself."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
import yaml

IGNORE = -100


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and the test machine's cores are shared; import this fixture."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- data
def random_examples(n: int = 4, seed: int = 0, vocab: int = 900, prompt=(2, 6), answer=(2, 7)) -> list[dict]:
    """TRL-shaped token examples: prompt_ids, chosen_ids, rejected_ids of varied lengths."""
    rng = random.Random(seed)

    def ids(lo_hi):
        return [rng.randint(10, vocab) for _ in range(rng.randint(*lo_hi))]

    return [{"prompt_ids": ids(prompt), "chosen_ids": ids(answer), "rejected_ids": ids(answer)} for _ in range(n)]


def pair_doc(e: dict) -> dict:
    """Our pair row for a TRL example: prompt masked, answer labelled."""
    p = e["prompt_ids"]
    return {"chosen_input_ids": p + e["chosen_ids"], "chosen_labels": [IGNORE] * len(p) + e["chosen_ids"],
            "rejected_input_ids": p + e["rejected_ids"], "rejected_labels": [IGNORE] * len(p) + e["rejected_ids"]}


def reverse_task(n: int, seed: int, letters: str = "abcdefgh", k: int = 4) -> list[dict]:
    """Toy preference task: prompt = k random letters, chosen = the prompt reversed, rejected = random letters."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = [rng.choice(letters) for _ in range(k)]
        rows.append({"prompt": " ".join(p) + " =", "chosen": " " + " ".join(reversed(p)),
                     "rejected": " " + " ".join(rng.choice(letters) for _ in range(k))})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- configs and models
def make_cfg(model_dir: Path, folder: Path | None = None, **keys):
    """A validated Config for the tiny model (written to folder/config.yaml when a folder is given)."""
    from tuneforge.config import load

    data = {"base_model": str(model_dir), "datasets": [{"path": "unused.jsonl"}], "micro_batch_size": 4,
            "sequence_len": 128, "seed": 7, "save_strategy": "no", **keys}
    if folder is None:
        return load(data=data)
    folder.mkdir(parents=True, exist_ok=True)
    data.setdefault("output_dir", str(folder / "out"))
    data.setdefault("dataset_prepared_path", str(folder / "prepared"))
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load(path)


def objective_for(cfg, tokenizer):
    from tuneforge.methods import get_objective

    obj = get_objective(cfg)
    if getattr(obj, "reference", None) is not None:
        obj.reference.tokenizer = tokenizer
    return obj


def perturbed(model_dir: Path, seed: int = 1, scale: float = 0.02, cls=None, **kwargs):
    """The tiny model with seeded noise on every weight (so that policy != reference)."""
    from transformers import AutoModelForCausalLM

    cls = cls or AutoModelForCausalLM
    torch.manual_seed(seed)  # a new classification head is initialised from the global RNG
    model = cls.from_pretrained(str(model_dir), dtype=torch.float32, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model.train()


def twin(model):
    return copy.deepcopy(model)


def max_grad_diff(a, b) -> tuple[float, float]:
    """(largest |grad_a - grad_b| over all trainable parameters, largest |grad_a|)."""
    pa = [p for p in a.parameters() if p.requires_grad]
    pb = [p for p in b.parameters() if p.requires_grad]
    assert len(pa) == len(pb) and pa
    diff = max((x.grad - y.grad).abs().max().item() for x, y in zip(pa, pb, strict=True))
    size = max(x.grad.abs().max().item() for x in pa)
    return diff, size


def train_run(cfg):
    from tuneforge.engine.run import train

    return train(cfg, None, show_progress=False)


# ---------------------------------------------------------------- the layout itself
def test_unpacked_layout_is_trl_order_and_packed_layout_keeps_pairs_together():
    from tuneforge.methods.pairs import collate_pairs

    ex = [{"prompt_ids": [5, 6], "chosen_ids": [7, 8, 9], "rejected_ids": [10]},
          {"prompt_ids": [11], "chosen_ids": [12], "rejected_ids": [13, 14]}]
    docs = [pair_doc(e) for e in ex]
    flat = collate_pairs([[d] for d in docs], 0, packed=False)
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9], [11, 12, 0, 0, 0], [5, 6, 10, 0, 0], [11, 13, 14, 0, 0]]
    assert flat["chosen_doc"].tolist() == [0, 1] and flat["rejected_doc"].tolist() == [2, 3]
    assert flat["target_ids"][0].tolist() == [IGNORE, 7, 8, 9, IGNORE]
    assert flat["doc_ids"].tolist() == [[0] * 5, [1, 1, -1, -1, -1], [2, 2, 2, -1, -1], [3, 3, 3, -1, -1]]

    packed = collate_pairs([docs], 0, packed=True)  # one packed row holding both pairs
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9, 5, 6, 10, 11, 12, 11, 13, 14]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 0, 1, 2]]
    assert packed["doc_ids"].tolist() == [[0] * 5 + [1] * 3 + [2] * 2 + [3] * 3]
    assert packed["chosen_doc"].tolist() == [0, 2] and packed["rejected_doc"].tolist() == [1, 3]
    # targets never cross a sequence boundary: each sequence's last token has none
    assert packed["target_ids"][0].tolist() == [IGNORE, 7, 8, 9, IGNORE, IGNORE, 10, IGNORE, 12, IGNORE, 13, 14, IGNORE]
    assert packed["doc_last"].tolist() == [4, 7, 9, 12]


def test_method_settings_fail_with_one_clear_message(tiny_model_dir):
    from tuneforge.config.errors import ConfigError
    from tuneforge.errors import NotSupportedYet
    from tuneforge.methods import get_objective

    cases = [
        ({"rl": "dpo", "dpo_loss_type": ["sigmoid", "aot"]}, ConfigError, "dpo_loss_type.*aot.*not supported"),
        ({"rl": "dpo", "dpo_loss_type": ["exo_pair"]}, ConfigError, "exo_pair needs it > 0"),
        ({"rl": "dpo", "dpo_use_weighting": True}, NotSupportedYet, "dpo_use_weighting"),
        ({"rl": "kto", "micro_batch_size": 1}, ConfigError, "micro_batch_size to 2 or more"),
        ({"rl": "dpo", "rl_beta": 0.0}, ConfigError, "beta must be positive"),
    ]
    for keys, error, message in cases:
        with pytest.raises(error, match=message):
            get_objective(make_cfg(tiny_model_dir, **keys))


def test_beta_precedence_and_method_defaults(tiny_model_dir):
    from tuneforge.methods import get_objective

    assert get_objective(make_cfg(tiny_model_dir, rl="dpo")).beta == 0.1
    assert get_objective(make_cfg(tiny_model_dir, rl="dpo", rl_beta=0.3, trl={"beta": 0.7})).beta == 0.7
    assert get_objective(make_cfg(tiny_model_dir, rl="ipo")).loss_types == ["ipo"]
    simpo = get_objective(make_cfg(tiny_model_dir, rl="simpo"))
    assert (simpo.beta, simpo.gamma, simpo.alpha) == (0.1, 0.5, 1.0)  # TRL's CPOConfig defaults
    assert get_objective(make_cfg(tiny_model_dir, rl="orpo")).lam == 0.1
    assert get_objective(make_cfg(tiny_model_dir, rl="orpo", orpo_alpha=0.4, rl_beta=0.9)).lam == 0.4
