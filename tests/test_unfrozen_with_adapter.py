"""unfrozen_parameters with an adapter: refused, with what Axolotl would do with those patterns and what to do."""

from __future__ import annotations

from config_support import issues_of

ADAPTER = "adapter: qlora\nload_in_4bit: true\nlora_target_linear: true\n"


def test_patterns_anchored_at_plain_names_are_said_to_train_nothing(tmp_path):
    [issue] = issues_of(tmp_path, ADAPTER + "unfrozen_parameters:\n  - ^model.language_model.*\n  - ^lm_head.*\n"
                        "  - ^base_model.model.lm_head.*\n  - ^.*lora_A.*\n")
    assert issue.path == "unfrozen_parameters"
    assert issue.message.startswith(
        "with an adapter, these patterns are matched against the adapter-wrapped parameter names "
        "(`base_model.model.<name>`): `^model.language_model.*`, `^lm_head.*` start at the plain model's names, "
        "which the wrapped names never do, so Axolotl would freeze every parameter, LoRA's included, and train "
        "nothing. tuneforge refuses the combination: remove unfrozen_parameters (LoRA trains its own weights only);")
    assert "list them in lora_modules_to_save" in issue.message


def test_other_patterns_get_the_general_reason(tmp_path):
    [issue] = issues_of(tmp_path, ADAPTER + "unfrozen_parameters:\n  - layers.1.\n")
    assert ("Axolotl would freeze every other parameter, LoRA's included, and base weights that match would train "
            "without being saved in the adapter.") in issue.message


def test_full_fine_tuning_takes_them(tmp_path):
    from config_support import load_text

    assert load_text(tmp_path, "unfrozen_parameters:\n  - ^model.layers.1.\n").unfrozen_parameters == [
        "^model.layers.1."]
