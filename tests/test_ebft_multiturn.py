"""Multi-turn rows of EBFT's structured mode (methods/ebft/multiturn.py): the turns after the first reply are
rolled out with the policy, and the whole generated conversation is scored against the whole reference one.

Checked: the exact prompts each later reply is sampled from (chatml, written out by hand), the exact
tokens of a conversation after its prompt, the rewards against eq. 7 on features computed here by hand
from those hand-written conversations, and a tiny run that trains on multi-turn rows.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from test_ebft_structured import _hand_features
from tuneforge import chat_templates
from tuneforge.methods.ebft import multiturn
from tuneforge.methods.ebft.reward import batch_rewards
from tuneforge.rollout.base import Rollout

G = 4
NO_TRL = SimpleNamespace(trl=None)  # conversation_ids reads only trl.chat_template_kwargs of the config
END = "<|im_end|>\n"


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture
def chatml(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = chat_templates.template("chatml")
    return tok


def test_later_replies_are_sampled_in_order_from_the_conversation_so_far(chatml):
    prompt = [{"role": "system", "content": "sys"}, _user("u1")]
    turns = [[_user("u2"), _assistant("a2"), _user("u3"), _assistant("a3")],  # two replies to roll out
             [_user("v2")],                                                 # nothing to generate
             [_assistant("x2")]]                                            # a reply right after the first
    seen = []

    def reply(prompt_ids):
        seen.append([chatml.decode(p) for p in prompt_ids])
        return [f"g{len(seen)}.{k}" for k in range(len(prompt_ids))]

    def tokenize(messages):
        text = chatml.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return chatml(text, add_special_tokens=False)["input_ids"]

    out = multiturn.roll_out(reply, tokenize, [prompt] * 3, ["A", "B", "C"], turns)
    head = f"<|im_start|>system\nsys{END}<|im_start|>user\nu1{END}<|im_start|>assistant\n"
    assert seen == [
        [head + f"A{END}<|im_start|>user\nu2{END}<|im_start|>assistant\n", head + f"C{END}<|im_start|>assistant\n"],
        [head + f"A{END}<|im_start|>user\nu2{END}<|im_start|>assistant\ng1.0{END}<|im_start|>user\nu3{END}"
         "<|im_start|>assistant\n"],
    ]
    assert out == [[_assistant("A"), _user("u2"), _assistant("g1.0"), _user("u3"), _assistant("g2.0")],
                   [_assistant("B"), _user("v2")],
                   [_assistant("C"), _assistant("g1.1")]]


def test_a_conversation_is_its_rendering_after_the_prompt_up_to_its_last_end_of_turn(chatml):
    stops = chat_templates.stop_token_ids(chatml)
    prompt = [_user("u1")]
    ids = multiturn.conversation_ids(prompt, [_assistant("a1"), _user("u2"), _assistant("a2")], chatml, NO_TRL, stops)
    text = f"a1{END}<|im_start|>user\nu2{END}<|im_start|>assistant\na2<|im_end|>"  # no newline after the last
    assert ids == chatml(text, add_special_tokens=False)["input_ids"]
    ending_on_a_user_turn = multiturn.conversation_ids(prompt, [_assistant("a1"), _user("u2")], chatml, NO_TRL, stops)
    assert ending_on_a_user_turn == chatml(f"a1{END}<|im_start|>user\nu2<|im_end|>", add_special_tokens=False)["input_ids"]
    plain = copy.deepcopy(chatml)  # a tokenizer without end-of-turn tokens: EOS closes the conversation
    assert multiturn.conversation_ids(prompt, [_assistant("a1")], plain, NO_TRL, ())[-1] == chatml.eos_token_id


CONVERSATIONS = [
    [_user("name a fruit"), _assistant(" apple"), _user("and a colour"), _assistant(" red")],
    [_user("say one"), _assistant(" one"), _user("say two"), _assistant(" two"), _user("thanks")],
]


@pytest.fixture
def objective(write_config, write_jsonl):
    from tuneforge.config import load
    from tuneforge.methods import get_objective

    write_jsonl([{"messages": m} for m in CONVERSATIONS], "chat.jsonl")

    def make(**ebft):
        cfg = load(write_config({"rl": "ebft", "chat_template": "chatml",
                                 "datasets": [{"path": "chat.jsonl", "type": "ebft_chat_multiturn.transform"}],
                                 "trl": {"num_generations": G, "max_completion_length": 6},
                                 "ebft": {"embed_method": "completion_mean", **ebft},
                                 "micro_batch_size": 8, "seed": 0, "save_strategy": "no"}))
        return get_objective(cfg)

    return make


def test_rewards_compare_the_rolled_out_conversation_with_the_reference_one(objective, chatml, tiny_model_dir):
    """Sample 0 of each prompt is the reference first reply and the stub policy then answers like the
    reference, so its conversation is the reference's (alignment 1); the others diverge from the first reply
    on. Expected rewards: eq. 7 on features of the hand-written conversations through the starting model."""
    from transformers import AutoModelForCausalLM

    obj = objective(diversity_coef=0.5)
    data = obj.prepare_data(chatml)
    batch = obj.collate([[data.train[i] for i in range(2)]], chatml.pad_token_id, training=True)
    firsts = [[" apple", " pear", " no", "x"], [" one", " 1", " two", "?"]]
    completions = [chatml(t, add_special_tokens=False)["input_ids"] + [5] for f in firsts for t in f]  # 5: <|im_end|>
    rollout = Rollout(prompt_ids=batch["prompt_ids"], completion_ids=completions,
                      logprobs=[[0.0] * len(c) for c in completions], finished=[True] * len(completions), n=G)
    right = {"and a colour": " red", "say two": " two"}

    def stub_reply(prompt_ids):  # the reference's answer after a right first reply, else "wrong"
        texts = [chatml.decode(p) for p in prompt_ids]
        return [next((v for k, v in right.items() if k in t), "?") if ("assistant\n apple<" in t or "assistant\n one<" in t)
                else "wrong"
                for t in texts]

    obj._reply = stub_reply
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    obj._model = model
    _, per_func = obj._score(batch, rollout)

    def after_prompt(text):
        return chatml(text, add_special_tokens=False)["input_ids"]

    gen = [after_prompt(f"{f}{END}<|im_start|>user\nand a colour{END}<|im_start|>assistant\n"
                        f"{' red' if f == ' apple' else 'wrong'}<|im_end|>") for f in firsts[0]]
    gen += [after_prompt(f"{f}{END}<|im_start|>user\nsay two{END}<|im_start|>assistant\n"
                         f"{' two' if f == ' one' else 'wrong'}{END}<|im_start|>user\nthanks<|im_end|>") for f in firsts[1]]
    truth = [gen[0], gen[G]]
    prompts = [p for p in batch["prompt_ids"] for _ in range(G)]
    expected = batch_rewards(_hand_features(model, prompts, gen, [0.25, 0.5, 0.75], "completion_mean"),
                             _hand_features(model, batch["prompt_ids"], truth, [0.25, 0.5, 0.75], "completion_mean"),
                             G, diversity_coef=0.5)
    assert torch.allclose(per_func[:, 0].float(), expected.rewards, atol=1e-5)
    assert obj._scores.alignment[0] == pytest.approx(1.0, abs=1e-6)
    assert obj._scores.alignment[G] == pytest.approx(1.0, abs=1e-6)
    assert obj._scores.alignment[1] < 0.999  # a different conversation: the check above can fail
    # The first reply's ground truth (its own tokens) still sets the generation cap.
    assert batch["gt_ids"][0] == after_prompt(" apple<|im_end|>")


def test_bad_turns_name_the_row(objective, chatml, write_jsonl):
    from tuneforge.errors import DataError

    obj = objective()
    write_jsonl([{"messages": CONVERSATIONS[0]}, {"messages": [_user("q"), _assistant("a"), {"role": "user"}]}],
                "chat.jsonl")
    with pytest.raises(DataError, match=r"datasets\[0\] row 1: `messages` must be"):
        obj.prepare_data(chatml)  # the transform's own check
    with pytest.raises(DataError, match=r"row 7: `remaining_turns` must be a list of \{role, content\}"):
        multiturn.check_turns([_user("q")], [{"role": "user"}], "row 7")  # a transform of your own
    strict = copy.deepcopy(chatml)  # a template that refuses a role: the row is named before training starts
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}"
                            "{% endif %}{{ m['content'] }}{% endfor %}")
    write_jsonl([{"messages": CONVERSATIONS[0]}, {"messages": [_user("q"), _assistant("a"), _user("t"),
                                                               {"role": "tool", "content": "x"}]}], "chat.jsonl")
    with pytest.raises(DataError, match=r"datasets\[0\] row 1: the chat template cannot render.*no tools"):
        obj.prepare_data(strict)


def test_a_tiny_multi_turn_run_trains(write_config, write_jsonl, monkeypatch):
    from transformers import AutoModelForCausalLM

    from tuneforge.config import load
    from tuneforge.engine.run import train
    from tuneforge.methods.ebft.structured import StructuredEBFTObjective

    calls = []
    original = StructuredEBFTObjective._reply

    def counted(self, prompt_ids):
        calls.append(len(prompt_ids))
        return original(self, prompt_ids)

    monkeypatch.setattr(StructuredEBFTObjective, "_reply", counted)
    write_jsonl([{"messages": m} for m in CONVERSATIONS], "chat.jsonl")
    cfg = load(write_config({"rl": "ebft", "chat_template": "chatml",
                             "datasets": [{"path": "chat.jsonl", "type": "ebft_chat_multiturn.transform"}],
                             "trl": {"num_generations": G, "max_completion_length": 4},
                             "micro_batch_size": 8, "max_steps": 2, "learning_rate": 1e-2, "logging_steps": 1,
                             "save_strategy": "no", "seed": 0}, name="run.yaml"))
    start = AutoModelForCausalLM.from_pretrained(cfg.base_model).state_dict()
    result = train(cfg, show_progress=False)
    records = [r for r in result.history if r["type"] == "train"]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert r["ebft/reward"] == pytest.approx(2 * r["ebft/alignment"] - 2 * r["ebft/diversity"], abs=1e-5)
    # each step (both conversations, G samples each) rolls out one later reply per sample
    assert calls == [2 * G, 2 * G]
    moved = max((v - start[k]).abs().max().item() for k, v in result.model.state_dict().items())
    assert moved > 0

