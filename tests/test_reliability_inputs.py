"""Issue 20, items 7, 12 and 13: bounded inputs and clear messages for bad configs (YAML alias bombs,
non-UTF-8 files, numeric values out of range, contradictions)."""

from __future__ import annotations

import time

import pytest

from tuneforge.config import load
from tuneforge.config.errors import ConfigError

BOMB = """base_model: x
a: &a [x, x, x, x, x, x, x, x, x, x]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load(path)
    assert time.monotonic() - start < 5
    assert "the YAML expands to more than 100,000 values (aliases repeating aliases?)" in str(err.value)


def test_aliases_of_normal_size_still_work(tmp_path, write_config):
    path = write_config({"micro_batch_size": 2})
    path.write_text(path.read_text() + "lora_target_modules: &mods [q_proj, v_proj]\nadapter: lora\n"
                    "lora_modules_to_save: *mods\n")
    assert load(path).lora_modules_to_save == ["q_proj", "v_proj"]


def test_a_config_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("base_model: x\n# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load(path)
    assert "the file is not UTF-8 text (byte 0xe9 at offset 19); save it as UTF-8" in str(err.value)
    assert "latin1.yaml" in str(err.value) and ":2" in str(err.value)


@pytest.mark.parametrize(("values", "key", "message"), [
    ({"adam_beta1": 5}, "adam_beta1", "Input should be less than 1"),
    ({"adam_beta2": -0.1}, "adam_beta2", "Input should be greater than or equal to 0"),
    ({"adam_epsilon": -1}, "adam_epsilon", "Input should be greater than 0"),
    ({"seed": -5}, "seed", "Input should be greater than or equal to 0"),
    ({"sequence_len": 10**12, "sample_packing": True}, "sequence_len", "Input should be less than or equal to 16777216"),
    ({"adapter": "lora", "lora_alpha": 0}, "lora_alpha", "Input should be greater than 0"),
    ({"micro_batch_size": True}, "micro_batch_size", "must be a number, not true"),
    ({"learning_rate": False}, "learning_rate", "must be a number, not false"),
    ({"warmup_steps": 1000, "max_steps": 10}, "warmup_steps",
     "(1000) is more than max_steps (10): the learning rate would never reach its peak; lower warmup_steps."),
    ({"save_strategy": "no", "save_steps": 1}, "save_steps",
     "is set while save_strategy is \"no\" (no checkpoints); remove one of them."),
])
def test_out_of_range_and_contradicting_values_are_refused(write_config, values, key, message):
    with pytest.raises(ConfigError) as err:
        load(write_config({"datasets": [{"path": "x.jsonl"}], **values}))
    assert any(i.path == key and message in i.message for i in err.value.issues), err.value


def test_packing_longer_than_the_machine_can_hold(write_config, monkeypatch):
    from tuneforge.config import ranges

    monkeypatch.setattr(ranges, "_memory_bytes", lambda: 2**30)
    with pytest.raises(ConfigError) as err:
        load(write_config({"datasets": [{"path": "x.jsonl"}], "sequence_len": 2**22, "micro_batch_size": 16,
                           "sample_packing": True}))
    assert ("(4,194,304) x micro_batch_size with sample_packing needs about 2 GiB for the packed rows alone; this "
            "machine has 1 GiB. Lower sequence_len.") in str(err.value)


def test_data_that_is_not_utf8_names_the_file_and_line(tmp_path, write_config):
    from tuneforge.data.sources import load_source
    from tuneforge.errors import DataError

    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    cfg = load(write_config({"datasets": [{"path": "bad.jsonl", "type": "completion"}]}))
    with pytest.raises(DataError) as err:
        load_source(cfg.datasets[0], cfg, "datasets[0]")
    assert str(err.value) == "datasets[0]: bad.jsonl line 2 is not UTF-8 text (byte 0xe9); save the file as UTF-8."
