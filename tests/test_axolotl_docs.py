"""docs/axolotl-compatibility.md's key table is generated from the code that decides each key's fate."""

from __future__ import annotations

from script_support import load_script

gen = load_script("scripts/gen_axolotl_table.py")



def test_axolotl_key_table_is_up_to_date():
    text = gen.DOC.read_text()
    assert gen.BEGIN in text and gen.END in text
    assert gen.updated(text) == text, "out of date: run `python scripts/gen_axolotl_table.py` and commit the result"


def test_every_axolotl_key_has_one_row_and_refusals_say_what_to_do():
    from tuneforge.config.axolotl_keys import TOP_LEVEL

    table = gen.render()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    keys = [line.split("`")[1] for line in rows]
    assert set(TOP_LEVEL) <= set(keys)
    for line in rows:
        status, what = line.split(" | ")[1:3]
        if status == "refused":
            assert what.strip(" |"), line  # never a bare refusal


def test_the_table_follows_the_code():
    rows = {line.split("`")[1]: line.split(" | ")[1] for line in gen.render().splitlines() if line.startswith("| `")}
    assert rows["liger_rms_norm"] == "accepted with a note"  # compiled blocks
    assert rows["fsdp"] == "accepted with a note" and rows["fsdp_config"] == "supported"
    assert rows["activation_offloading"] == "supported" and rows["qat"] == "supported"
    assert rows["use_ray"] == "refused"
    assert rows["experts_implementation"] == "accepted with a note"
    assert rows["learning_rate"] == "supported"
    assert rows["strict"] == "ignored"
    assert rows["CutCrossEntropyPlugin"] == "accepted with a note" and rows["KDPlugin"] == "refused"
