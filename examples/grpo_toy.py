"""Dataset transform and reward function of examples/grpo-tiny.yaml (a toy verifiable task).

Task: whatever the prompt, a completion earns reward 1 when its text contains the digit in the
row's `answer` column ("7"), else 0. A random tiny model does this by chance in ~13% of 8-token
completions; GRPO raises that to nearly always within a few dozen steps on a CPU.
"""


def prompts(cfg):
    """`type: grpo_toy.prompts`: plain-text prompts; `answer` stays as a column for the reward."""

    def mapper(example, tokenizer=None):
        return {"prompt": example["question"] + " ->", "answer": example["answer"]}

    return mapper, {"remove_columns": ["question"]}


def contains_answer(completions, answer, **kwargs):
    """1.0 if the completion contains the answer string, else 0.0 (one value per completion)."""
    return [1.0 if a in c else 0.0 for c, a in zip(completions, answer, strict=True)]
