"""Issue 20: property-based fuzz. No config and no dataset row produces a traceback: each either works or
raises tuneforge's own error (one message naming the key or row). Validate-only and format-only (no model),
2,000 generated configs and 2,000 generated rows."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tuneforge.config import load
from tuneforge.config.schema import Config
from tuneforge.errors import TuneforgeError

FUZZ = settings(max_examples=2000, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["", "no", "auto", "lora", "qlora", "grpo", "dpo", "chatml", "steps", "epoch", "1e-4",
                     "../x", "/", "~", "\x00", "é", "true"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)
TOP_KEYS = sorted(Config.model_fields)
TRL_KEYS = sorted(Config.model_fields["trl"].annotation.__args__[0].model_fields)
DATASET = st.fixed_dictionaries({"path": st.sampled_from(["data.jsonl", "", "x/y"])},
                                optional={"type": st.one_of(st.sampled_from(["alpaca", "chat_template", "completion",
                                                                             "input_output", "prompt", "chatml.intel",
                                                                             "nope", "a.b"]), VALUES),
                                          "split": VALUES, "field": VALUES, "shards": VALUES})
CONFIGS = st.fixed_dictionaries(
    {"base_model": st.sampled_from(["./model", "org/model"])},
    optional={"datasets": st.one_of(st.lists(DATASET, max_size=2), VALUES),
              "trl": st.one_of(st.dictionaries(st.sampled_from(TRL_KEYS), VALUES, max_size=4), VALUES),
              "extra_keys": st.dictionaries(st.sampled_from(TOP_KEYS), VALUES, max_size=6)},
)


def _validate(raw: dict) -> None:
    """What `tuneforge validate` does, without the file: load, then the method's own checks (no user code)."""
    from tuneforge.methods import get_objective
    from tuneforge.methods.rewards import without_importing

    cfg = load(data=raw)
    with without_importing():
        get_objective(cfg).close()


@FUZZ
@given(CONFIGS)
def test_no_config_value_produces_a_traceback(generated):
    raw = dict(generated)
    raw.update(raw.pop("extra_keys", {}))
    with contextlib.suppress(TuneforgeError):
        _validate(raw)


TEXT = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "\x00", "\ud7ff", "<|im_end|>", "{", "}" * 5]))
FIELD = st.one_of(TEXT, SCALARS, VALUES)
MESSAGE = st.one_of(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "x"]),
                                           "content": FIELD}), VALUES)
# Rows of the right shape with odd text (most should format), and rows of any shape (most should be refused).
GOOD_TEXT = st.text(max_size=30)
WELL_FORMED = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries({
        "role": st.sampled_from(["user", "assistant", "system"]), "content": GOOD_TEXT}), min_size=1, max_size=4)}),
    st.fixed_dictionaries({"segments": st.lists(st.fixed_dictionaries({"text": GOOD_TEXT, "label": st.booleans()}),
                                                min_size=1, max_size=4)}),
    st.fixed_dictionaries({"instruction": GOOD_TEXT, "output": GOOD_TEXT}, optional={"input": GOOD_TEXT}),
    st.fixed_dictionaries({"text": GOOD_TEXT}),
    st.fixed_dictionaries({"question": GOOD_TEXT, "chosen": GOOD_TEXT, "rejected": GOOD_TEXT},
                          optional={"system": GOOD_TEXT}),
)
ANY_SHAPE = st.fixed_dictionaries({}, optional={
    "instruction": FIELD, "input": FIELD, "output": FIELD, "text": FIELD, "prompt": FIELD, "completion": FIELD,
    "messages": st.one_of(st.lists(MESSAGE, max_size=4), FIELD), "conversations": FIELD, "segments": FIELD,
    "chosen": FIELD, "rejected": FIELD, "label": FIELD, "answer": FIELD, "system": FIELD, "question": FIELD,
})
ROWS = st.one_of(WELL_FORMED, ANY_SHAPE)
FORMATS = ["alpaca", "chat_template", "completion", "input_output", "chatml.intel"]


@pytest.fixture(scope="module")
def row_fns(tiny_tokenizer):
    from tuneforge.data import formats
    from tuneforge.data.formats import FormatContext

    fns = {}
    for name in FORMATS:
        rl = {"rl": "dpo"} if name == "chatml.intel" else {}
        cfg = load(data={"base_model": "unused", "datasets": [{"path": "data.jsonl", "type": name}],
                         "chat_template": "chatml", **rl})
        fmt, style = formats.resolve(cfg.datasets[0].type)
        fns[name] = fmt.builder(FormatContext(cfg=cfg, entry=cfg.datasets[0], tokenizer=tiny_tokenizer, style=style))
    return fns


@FUZZ
@given(row=ROWS, which=st.sampled_from(FORMATS))
def test_no_dataset_row_produces_a_traceback(row_fns, row, which):
    try:
        out = row_fns[which](row)
    except TuneforgeError:
        return
    assert isinstance(out, list)


YAML_PIECES = st.sampled_from(["base_model: m\n", "datasets:\n", "  - path: d.jsonl\n", "a: &a [1, 2]\n",
                               "b: [*a, *a]\n", "c: *nope\n", "{", "]", ": :", "\t", "- x\n", "!!python/object:os.system\n",
                               "seed: 1e9\n", "micro_batch_size: yes\n", "\xff", "caf\u00e9: 1\n", "---\n", "...\n"])
YAML_FILES = st.one_of(st.lists(YAML_PIECES, max_size=8).map("".join).map(str.encode), st.binary(max_size=200))


@settings(FUZZ, max_examples=500)
@given(YAML_FILES)
def test_no_config_file_produces_a_traceback(tmp_path_factory, content):
    path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    path.write_bytes(content)
    with contextlib.suppress(TuneforgeError):
        load(path)
