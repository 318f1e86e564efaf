"""Axolotl keys: plugins, kernel switches, older keys, real-but-unsupported keys vs typos, optimizer names,
evaluation schedules without evaluation data, duplicate YAML keys."""

from __future__ import annotations

import pytest

from config_support import issues_of as _issues
from config_support import load_text as _load
from config_support import notes_of as _notes


# ---------------------------------------------------------------- plugins and kernel switches
def test_liger_and_cut_cross_entropy_plugins_are_accepted_with_one_note_each(tmp_path, caplog):
    cfg, notes = _notes(tmp_path, caplog, "plugins:\n  - axolotl.integrations.liger.LigerPlugin\n"
                        "  - axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin\n")
    assert len(notes) == 2 and notes == cfg.notes
    assert "LigerPlugin` is not needed" in notes[0] and "torch_compile" in notes[0]
    assert "CutCrossEntropyPlugin` is not needed" in notes[1] and "without the full logits" in notes[1]
    assert cfg.torch_compile is False  # the plugin alone asks for the fused loss only


def test_liger_fusion_switches_turn_on_compile_with_a_note(tmp_path, caplog):
    cfg, notes = _notes(tmp_path, caplog, "liger_rms_norm: true\nliger_glu_activation: true\nliger_rope: false\n")
    assert cfg.torch_compile == "auto"
    (note,) = notes
    assert "`liger_rms_norm`, `liger_glu_activation`" in note and "torch_compile: auto" in note
    assert "liger_rope" not in note  # false asks for nothing


def test_fusion_switch_with_compile_off_says_it_stays_unfused(tmp_path, caplog):
    cfg, notes = _notes(tmp_path, caplog, "liger_rms_norm: true\ntorch_compile: false\n")
    assert cfg.torch_compile is False
    assert any("keeps them unfused" in n for n in notes)


@pytest.mark.parametrize("plugin, words", [
    ("axolotl.integrations.spectrum.SpectrumPlugin", "unfrozen_parameters"),
    ("axolotl.integrations.kd.KDPlugin", "distillation"),
])
def test_plugins_without_an_equivalent_are_refused_by_name(tmp_path, plugin, words):
    (issue,) = _issues(tmp_path, f"plugins:\n  - {plugin}\n")
    assert issue.path == "plugins" and issue.line == 2
    assert plugin in issue.message and words in issue.message


def test_unknown_plugin_is_an_error_naming_it(tmp_path):
    (issue,) = _issues(tmp_path, "plugins:\n  - my_company.plugins.FastPlugin\n")
    assert "unknown plugin `my_company.plugins.FastPlugin`" in issue.message


# ---------------------------------------------------------------- Axolotl keys vs typos
def test_real_axolotl_key_says_so_instead_of_a_misleading_did_you_mean(tmp_path):
    # difflib alone would suggest `model_revision`, a different setting
    (issue,) = _issues(tmp_path, "hub_revision: main\n")
    assert issue.message.startswith("Axolotl key, not supported yet by tuneforge: `hub_revision`")
    assert "did you mean" not in issue.message and "huggingface-cli upload" in issue.message


def test_axolotl_dataset_key_is_known_too(tmp_path):
    (issue,) = _issues(tmp_path, "datasets:\n  - path: a.jsonl\n    type: chat_template\n    split_thinking: true\n")
    assert issue.path == "datasets.0.split_thinking"
    assert "Axolotl key" in issue.message and "did you mean" not in issue.message


def test_a_typo_still_gets_did_you_mean(tmp_path):
    (issue,) = _issues(tmp_path, "lora_alhpa: 16\n")
    assert issue.message == "unknown key `lora_alhpa`; did you mean `lora_alpha`?"


def test_empty_axolotl_keys_are_accepted(tmp_path):
    cfg = _load(tmp_path, "hub_model_id:\ncomet_project_name:\ngradio_share: false\n")
    assert cfg.base_model == "some/model"


@pytest.mark.parametrize("text, words", [
    ("gptq: true\n", "unquantized model with adapter: qlora"),
    ("use_mora: true\n", "use adapter: lora"),
])
def test_older_methods_are_refused_with_the_migration(tmp_path, text, words):
    (issue,) = _issues(tmp_path, text)
    assert "Axolotl key" in issue.message and words in issue.message


# ---------------------------------------------------------------- older keys that map
def test_older_keys_map_with_notes(tmp_path, caplog):
    cfg, notes = _notes(tmp_path, caplog, "max_packed_sequence_len: 1024\nadam_eps: 1.0e-6\nbfloat16: true\n"
                        "xformers_attention: true\nlr_quadratic_warmup: true\ntorchdistx_path: /x\n")
    assert cfg.sample_packing is True and cfg.sequence_len == 1024
    assert cfg.adam_epsilon == 1e-6 and cfg.torch_dtype == "bfloat16"
    assert len(notes) == 6
    assert any("max_packed_sequence_len" in n and "sample_packing: true" in n for n in notes)


def test_flash_attn_norm_and_mlp_switches_ask_for_compile(tmp_path, caplog):
    cfg, notes = _notes(tmp_path, caplog, "flash_attn_rms_norm: true\nflash_attn_fuse_mlp: true\n")
    assert cfg.torch_compile == "auto" and len(notes) == 1


# ---------------------------------------------------------------- optimizer names
@pytest.mark.parametrize("name, family, closest", [
    ("adamw_torch_fp8", "torchao", "adamw_torch_8bit"),
    ("rmsprop_bnb_8bit", "bitsandbytes", "adamw_8bit"),
    ("optimi_lamb", "optimi", "optimi_adamw"),
    ("galore_adamw", "GaLore", "adamw_8bit"),
])
def test_unknown_optimizer_names_its_family_and_the_closest_choice(tmp_path, name, family, closest):
    (issue,) = _issues(tmp_path, f"optimizer: {name}\n")
    assert family in issue.message and f"closest supported choice is `{closest}`" in issue.message
    assert "'sgd'" not in issue.message  # not the list of every name


# ---------------------------------------------------------------- rules
@pytest.mark.parametrize("text", ["evals_per_epoch: 4\n", "eval_steps: 10\n", "evals_per_epoch: 0\n"])
def test_evaluation_schedule_without_evaluation_data_is_a_warning(tmp_path, caplog, text):
    cfg, notes = _notes(tmp_path, caplog, text)
    assert cfg.evals_per_epoch is None and cfg.eval_steps is None
    assert len(notes) == 1 and "ignored" in notes[0]


def test_evaluation_schedule_with_data_is_kept(tmp_path):
    cfg = _load(tmp_path, "val_set_size: 0.1\nevals_per_epoch: 4\n")
    assert cfg.evals_per_epoch == 4


def test_duplicate_yaml_key_names_both_lines(tmp_path):
    (issue,) = _issues(tmp_path, "learning_rate: 1.0e-4\nmicro_batch_size: 2\nlearning_rate: 2.0e-4\n")
    assert issue.path == "learning_rate" and issue.line == 4
    assert "lines 2 and 4" in issue.message


def test_duplicate_nested_key(tmp_path):
    (issue,) = _issues(tmp_path, "datasets:\n  - path: a.jsonl\n    path: b.jsonl\n")
    assert issue.path == "datasets.0.path" and "lines 3 and 4" in issue.message


def test_unsloth_kernel_switches_ask_for_compiled_blocks(tmp_path, caplog):
    cfg, notes = _notes(tmp_path, caplog, "adapter: lora\nlora_target_linear: true\nunsloth_lora_mlp: true\n"
                        "unsloth_lora_qkv: true\nunsloth_lora_o: false\n")
    assert cfg.torch_compile == "auto"
    (note,) = notes
    assert "`unsloth_lora_mlp`, `unsloth_lora_qkv`" in note and "unsloth_lora_o`" not in note


def test_lora_kernel_switches_are_fused_lora_keys(tmp_path, caplog):
    """Axolotl's lora_*_kernel keys select the fused LoRA blocks (models/lora_fuse.py), without compiling."""
    cfg, notes = _notes(tmp_path, caplog, "adapter: lora\nlora_target_linear: true\nlora_mlp_kernel: true\n"
                        "lora_qkv_kernel: true\nlora_o_kernel: false\n")
    assert (cfg.lora_mlp_kernel, cfg.lora_qkv_kernel, cfg.lora_o_kernel) == (True, True, False)
    assert cfg.torch_compile != "auto" and notes == []
