"""Loss and gradient parity with TRL 1.16 on the same tiny model and batch (float32, within 1e-5).

TRL's own trainers are built on a copy of our model (mixed precision off: TRL defaults to bf16, whose
autocast would round its forward) and their public `compute_loss(model, inputs)` is called on the batch
their own data collator builds from the same token ids. Each side then backpropagates; every parameter
gradient is compared. The policy carries seeded noise so that it differs from the reference.
Tolerance: 1e-5, relative to the value when it exceeds 1 (float32 rounding grows with magnitude).

Reference implementations used: `trl.DPOTrainer` (every DPO loss type we support), `trl.KTOTrainer`,
`trl.experimental.cpo.CPOTrainer` with loss_type="simpo" (Axolotl's SimPO), `trl.experimental.orpo.ORPOTrainer`,
`trl.RewardTrainer`. TRL 1.16 has no process-reward trainer: the PRM loss is compared with transformers'
token-classification loss in test_reward_models.py.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from test_pref_support import (
    make_cfg,
    max_grad_diff,
    objective_for,
    one_thread,  # noqa: F401
    pair_doc,
    perturbed,
    random_examples,
    twin,
)

TOL = 1e-5
DUMMY = [{"prompt": "a b", "chosen": " c", "rejected": " d"}]


@pytest.fixture(autouse=True)
def quiet():
    logging.getLogger("transformers").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _args(cls, tmp_path, **kw):
    return cls(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, fp16=False,
               disable_tqdm=True, **kw)


def _ours(model, cfg, tokenizer, docs):
    obj = objective_for(cfg, tokenizer)
    batch = obj.collate([[d] for d in docs], tokenizer.pad_token_id, training=True)
    loss, sums = obj.loss(model, batch, obj.num_items(batch))
    loss.backward()
    return float(loss), obj.summarize(sums, obj.num_items(batch))


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= TOL * max(1.0, abs(b))


def _dpo_trainer(tmp_path, model, ref, tokenizer, **kw):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    return DPOTrainer(model=model, ref_model=ref, args=_args(DPOConfig, tmp_path, **kw),
                      train_dataset=Dataset.from_list(DUMMY), processing_class=tokenizer)


# Each case: our config keys, TRL's DPOConfig keys.
DPO_CASES = {
    "sigmoid": ({}, {}),
    "ipo": ({"rl": "ipo"}, {"loss_type": ["ipo"]}),
    "hinge": ({"dpo_loss_type": ["hinge"]}, {"loss_type": ["hinge"]}),
    "robust": ({"dpo_loss_type": ["robust"], "dpo_label_smoothing": 0.2}, {"loss_type": ["robust"], "label_smoothing": 0.2}),
    "rpo": ({"dpo_loss_type": ["sigmoid", "sft"], "dpo_loss_weights": [1.0, 0.3]},
            {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.3]}),
    "exo_pair": ({"dpo_loss_type": ["exo_pair"], "dpo_label_smoothing": 0.01},
                 {"loss_type": ["exo_pair"], "label_smoothing": 0.01}),
    "others": ({"dpo_loss_type": ["nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "sigmoid_norm"]},
               {"loss_type": ["nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "sigmoid_norm"]}),
}


@pytest.mark.parametrize("case", list(DPO_CASES))
def test_dpo_family_matches_trl(case, tmp_path, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    ours_keys, trl_keys = dict(DPO_CASES[case][0]), DPO_CASES[case][1]
    examples = random_examples(4, seed=3)
    policy = perturbed(tiny_model_dir)
    other = twin(policy)
    cfg = make_cfg(tiny_model_dir, rl=ours_keys.pop("rl", "dpo"), rl_beta=0.3, **ours_keys)
    loss, logged = _ours(policy, cfg, tiny_tokenizer, [pair_doc(e) for e in examples])

    ref = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    trainer = _dpo_trainer(tmp_path, other, ref, tiny_tokenizer, beta=0.3, per_device_train_batch_size=4, **trl_keys)
    trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(examples))
    trl_loss.backward()

    assert _close(loss, float(trl_loss)), (loss, float(trl_loss))
    diff, size = max_grad_diff(policy, other)
    assert size > 1e-3 and diff < TOL * max(1.0, size), (diff, size)
    metrics = {k: sum(v) / len(v) for k, v in trainer._metrics["train"].items()}
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert abs(logged[key] - metrics[key]) < 1e-4, (key, logged[key], metrics[key])


def test_dpo_with_lora_matches_trl_adapter_disabled_reference(tmp_path, tiny_model_dir, tiny_tokenizer):
    """With an adapter, both use the adapter-disabled network as the reference (no second model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    examples = random_examples(4, seed=5)
    lora = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    trainer = DPOTrainer(model=twin(base), args=_args(DPOConfig, tmp_path, beta=0.2, per_device_train_batch_size=4),
                         train_dataset=Dataset.from_list(DUMMY), processing_class=tiny_tokenizer,
                         peft_config=LoraConfig(**lora))
    theirs = trainer.model
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the adapter away from its zero init, so policy != reference
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    ours = get_peft_model(twin(base), LoraConfig(**lora))
    ours.load_state_dict(theirs.state_dict(), strict=False)
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)

    cfg = make_cfg(tiny_model_dir, rl="dpo", rl_beta=0.2, adapter="lora", lora_target_modules=["q_proj", "v_proj"])
    loss, _ = _ours(ours, cfg, tiny_tokenizer, [pair_doc(e) for e in examples])
    trl_loss = trainer.compute_loss(theirs, trainer.data_collator(examples))
    trl_loss.backward()
    assert _close(loss, float(trl_loss)) and abs(loss - 0.6931) > 1e-3, (loss, float(trl_loss))
    diff, size = max_grad_diff(ours, theirs)
    assert size > 1e-4 and diff < TOL * max(1.0, size), (diff, size)


def test_kto_matches_trl(tmp_path, tiny_model_dir, tiny_tokenizer):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import KTOConfig, KTOTrainer

    raw = random_examples(6, seed=11)
    labels = [True, False, True, True, False, True]
    examples, docs = [], []
    for i, (e, good) in enumerate(zip(raw, labels, strict=True)):
        prev = raw[i - 1]  # the mismatched completion: the previous example's, cyclically (TRL's rotation)
        examples.append({"prompt_ids": e["prompt_ids"], "completion_ids": e["chosen_ids"],
                         "KL_completion_ids": prev["chosen_ids"], "label": good})
        p = e["prompt_ids"]
        docs.append({"input_ids": p + e["chosen_ids"], "labels": [-100] * len(p) + e["chosen_ids"], "label": good,
                     "kl_input_ids": p + prev["chosen_ids"], "kl_labels": [-100] * len(p) + prev["chosen_ids"]})
    policy = perturbed(tiny_model_dir, scale=0.03)
    other = twin(policy)
    cfg = make_cfg(tiny_model_dir, rl="kto", rl_beta=0.4, kto_desirable_weight=1.3, kto_undesirable_weight=0.7,
                   micro_batch_size=6)
    loss, logged = _ours(policy, cfg, tiny_tokenizer, docs)

    ref = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    args = _args(KTOConfig, tmp_path, beta=0.4, desirable_weight=1.3, undesirable_weight=0.7,
                 per_device_train_batch_size=6)
    data = Dataset.from_list([{"prompt": "a", "completion": " b", "label": True}, {"prompt": "c", "completion": " d", "label": False}])
    trainer = KTOTrainer(model=other, ref_model=ref, args=args, train_dataset=data, processing_class=tiny_tokenizer)
    trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(examples))
    trl_loss.backward()
    assert _close(loss, float(trl_loss)), (loss, float(trl_loss))
    diff, size = max_grad_diff(policy, other)
    assert size > 1e-3 and diff < TOL * max(1.0, size), (diff, size)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    for key in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert abs(logged[key] - metrics[key]) < 1e-4, (key, logged[key], metrics[key])
    assert logged["kl"] > 0  # the noisy policy moved away from the reference: the estimate is not clamped to 0


def _padded(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def _cpo_style_batch(examples, pad_id: int) -> dict:
    """The tokenized-pair batch CPOTrainer/ORPOTrainer consume (their collator's output)."""
    out = {}
    for side in ("chosen", "rejected"):
        ids = [e["prompt_ids"] + e[f"{side}_ids"] for e in examples]
        labels = [[-100] * len(e["prompt_ids"]) + e[f"{side}_ids"] for e in examples]
        out[f"{side}_input_ids"] = _padded(ids, pad_id)
        out[f"{side}_attention_mask"] = _padded([[1] * len(r) for r in ids], 0)
        out[f"{side}_labels"] = _padded(labels, -100)
    return out


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_simpo_matches_trl_cpo_trainer(alpha, tmp_path, tiny_model_dir, tiny_tokenizer):
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    examples = random_examples(4, seed=7)
    policy = perturbed(tiny_model_dir)
    other = twin(policy)
    cfg = make_cfg(tiny_model_dir, rl="simpo", rl_beta=2.0, simpo_gamma=0.7, cpo_alpha=alpha)
    loss, logged = _ours(policy, cfg, tiny_tokenizer, [pair_doc(e) for e in examples])
    args = _args(CPOConfig, tmp_path, loss_type="simpo", beta=2.0, simpo_gamma=0.7, cpo_alpha=alpha,
                 per_device_train_batch_size=4, max_length=128)
    trainer = CPOTrainer(model=other, args=args, train_dataset=Dataset.from_list(DUMMY), processing_class=tiny_tokenizer)
    trl_loss = trainer.compute_loss(other, _cpo_style_batch(examples, tiny_tokenizer.pad_token_id))
    trl_loss.backward()
    assert _close(loss, float(trl_loss)), (loss, float(trl_loss))
    diff, size = max_grad_diff(policy, other)
    assert size > 1e-3 and diff < TOL * max(1.0, size), (diff, size)
    stored = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert abs(logged[key] - stored[key]) < 1e-4, (key, logged[key], stored[key])


def test_orpo_matches_trl_with_train_on_inputs(tmp_path, tiny_model_dir, tiny_tokenizer):
    """TRL's ORPO NLL covers prompt + answer: that is our ORPO with train_on_inputs: true."""
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    examples = random_examples(4, seed=9)
    policy = perturbed(tiny_model_dir)
    other = twin(policy)
    cfg = make_cfg(tiny_model_dir, rl="orpo", orpo_alpha=0.25, train_on_inputs=True)
    loss, logged = _ours(policy, cfg, tiny_tokenizer, [pair_doc(e) for e in examples])
    args = _args(ORPOConfig, tmp_path, beta=0.25, per_device_train_batch_size=4, max_length=128)
    trainer = ORPOTrainer(model=other, args=args, train_dataset=Dataset.from_list(DUMMY), processing_class=tiny_tokenizer)
    trl_loss = trainer.compute_loss(other, _cpo_style_batch(examples, tiny_tokenizer.pad_token_id))
    trl_loss.backward()
    assert _close(loss, float(trl_loss)), (loss, float(trl_loss))
    diff, size = max_grad_diff(policy, other)
    assert size > 1e-3 and diff < TOL * max(1.0, size), (diff, size)
    stored = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}
    for key in ("nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/margins"):
        assert abs(logged[key] - stored[key]) < 1e-4, (key, logged[key], stored[key])


@pytest.mark.parametrize("center,margin", [(None, False), (0.01, True)])
def test_reward_model_matches_trl_reward_trainer(center, margin, tmp_path, tiny_model_dir, tiny_tokenizer):
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    examples = random_examples(4, seed=13)
    docs = [pair_doc(e) for e in examples]
    margins = [0.5, -0.25, 1.0, 0.0]
    if margin:
        for d, m in zip(docs, margins, strict=True):
            d["margin"] = m
    keys = {"reward_model": True, "center_rewards_coefficient": center}
    model = perturbed(tiny_model_dir, cls=AutoModelForSequenceClassification, num_labels=1)
    model.config.pad_token_id = tiny_tokenizer.pad_token_id
    other = twin(model)
    cfg = make_cfg(tiny_model_dir, **keys)
    loss, logged = _ours(model, cfg, tiny_tokenizer, docs)

    args = _args(RewardConfig, tmp_path, center_rewards_coefficient=center, per_device_train_batch_size=4)
    trainer = RewardTrainer(model=other, args=args, train_dataset=Dataset.from_list([{"chosen": "a b", "rejected": "c"}]),
                            processing_class=tiny_tokenizer)
    seqs = [d["chosen_input_ids"] for d in docs] + [d["rejected_input_ids"] for d in docs]
    inputs = {"input_ids": _padded(seqs, tiny_tokenizer.pad_token_id), "attention_mask": _padded([[1] * len(s) for s in seqs], 0)}
    if margin:
        inputs["margin"] = torch.tensor(margins)
    trl_loss = trainer.compute_loss(other, inputs)
    trl_loss.backward()
    assert _close(loss, float(trl_loss)), (loss, float(trl_loss))
    diff, size = max_grad_diff(model, other)
    assert size > 1e-3 and diff < TOL * max(1.0, size), (diff, size)
    assert abs(logged["accuracy"] - trainer._metrics["train"]["accuracy"][-1]) < 1e-6
