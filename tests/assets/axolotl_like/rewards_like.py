"""Reward function and prompt transform for ok_grpo.yaml (the shape of Axolotl's GRPO examples)."""


def length_reward(completions, **kwargs):
    return [float(len(str(c))) for c in completions]


def to_prompt(cfg, *args, **kwargs):
    def mapper(example, tokenizer=None):
        return {"prompt": [{"role": "user", "content": example["question"]}], "answer": example["answer"]}

    return mapper
