"""The ground truth of EBFT's structured mode: its tokens, as a finished completion would be, and the
per-prompt generation cap it sets (`ebft.adaptive_max_tokens`).

A prompt row carries its reference completion in the `ground_truth` column (kept by the prompt
transforms of `data/formats/grpo.py` among the extra columns). Its tokens are what the policy would
generate if it answered exactly the ground truth: for chat prompts, the assistant turn as the chat
template renders it after the generation prompt, up to and including the end-of-turn token; for plain
text prompts, the text's tokens and EOS. So a completion equal to the ground truth has exactly the
ground truth's features (alignment 1).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

from tuneforge.config.schema import Config
from tuneforge.errors import DataError

from .multiturn import COLUMN as TURNS
from .multiturn import check_renders, check_turns

COLUMN = "ground_truth"
IDS_COLUMN = "gt_ids"  # the ground truth's tokens, added to the prepared prompt rows


def ground_truth_ids(prompt, text: str, tokenizer, cfg: Config, stop_ids: tuple[int, ...]) -> list[int]:
    """The tokens a completion equal to `text` consists of, after the tokenized `prompt`."""
    suffix = text
    if isinstance(prompt, list):  # chat messages: the template's rendering of the assistant turn
        kwargs = (cfg.trl.chat_template_kwargs if cfg.trl else None) or {}
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **kwargs)
        full = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": text}], tokenize=False,
                                             **kwargs)
        if full.startswith(head):  # templates that re-render earlier turns differently keep the plain text
            suffix = full[len(head):]
    ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    stops = set(stop_ids)
    end = next((i for i, t in enumerate(ids) if t in stops), None)
    if end is not None:
        return ids[: end + 1]  # what follows the end of turn (a newline) is never generated
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None else ids


def add_ground_truth(ds, tokenizer, cfg: Config, stop_ids: tuple[int, ...], key: str):
    """`ds` (prepared prompt rows from the entries of `key`) with the `gt_ids` column (the first reply's
    tokens for a multi-turn row); a row without a usable ground truth or with malformed turns stops the
    run naming it."""
    if ds is None:
        return None
    ids = []
    for source, row, prompt_json, columns_json in zip(ds["_source"], ds["_row"], ds["prompt_json"],
                                                      ds["columns_json"], strict=True):
        where = f"{key}[{source}] row {row}"
        columns = json.loads(columns_json)
        text = columns.get(COLUMN)
        if not isinstance(text, str) or not text:
            have = ", ".join(sorted(["prompt", *columns])) or "nothing"
            raise DataError(f"{where}: rl: ebft (structured mode) needs a non-empty string `{COLUMN}` column, the "
                            f"reference completion of the prompt (the row has: {have}). Add it to the data, or map "
                            f"your answer column to `{COLUMN}` in the dataset's transform.")
        prompt = json.loads(prompt_json)
        if columns.get(TURNS):  # checked here, rolled out at scoring time (multiturn.py)
            check_turns(prompt, columns[TURNS], where)
            check_renders(prompt, text, columns[TURNS], tokenizer, cfg, where)
        ids.append(ground_truth_ids(prompt, text, tokenizer, cfg, stop_ids))
    if IDS_COLUMN in ds.column_names:
        ds = ds.remove_columns(IDS_COLUMN)
    return ds.add_column(IDS_COLUMN, ids)


def length_cap(ground_truth_length: int, multiplier: float, max_completion_length: int) -> int:
    """min(max_completion_length, ceil(len(ground truth tokens) x multiplier)), at least 1 token."""
    return max(1, min(max_completion_length, math.ceil(ground_truth_length * multiplier)))


def cap_rollout(rollout, caps: list[int]):
    """The rollout with each prompt's completions cut at that prompt's cap (cut ones count as truncated).

    Sampling is left to right, so the first k tokens of a completion sampled with a larger limit are a
    sample with limit k: generating with the step's largest cap and cutting gives every prompt its own."""
    n = rollout.n
    completions, logprobs, finished = [], [], []
    for i, (ids, lps, done) in enumerate(zip(rollout.completion_ids, rollout.logprobs, rollout.finished, strict=True)):
        cap = caps[i // n]
        cut = len(ids) > cap
        completions.append(list(ids[:cap]) if cut else ids)
        logprobs.append(list(lps[:cap]) if cut else lps)
        finished.append(done and not cut)
    return replace(rollout, completion_ids=completions, logprobs=logprobs, finished=finished)
