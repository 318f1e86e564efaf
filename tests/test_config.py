"""Strict config loading: unknown keys, unsupported keys, aliases, cross-field rules, overrides."""

from __future__ import annotations

import logging

import pytest

from tuneforge.config import ConfigError, dump, load, parse_overrides

BASE = "base_model: some/model\n"


def _load_text(tmp_path, text: str, overrides=None):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load(path, overrides)


def _issues(tmp_path, text: str, overrides=None):
    with pytest.raises(ConfigError) as exc:
        _load_text(tmp_path, text, overrides)
    return exc.value.issues


def test_minimal_config_fills_defaults(tmp_path):
    cfg = _load_text(tmp_path, BASE)
    assert cfg.base_model == "some/model"
    assert cfg.sequence_len == 512 and cfg.micro_batch_size == 1 and cfg.grad_accum == 1
    assert cfg.lr_scheduler == "cosine" and cfg.optimizer == "adamw_torch_fused"


def test_unknown_key_names_line_and_suggestion(tmp_path):
    issues = _issues(tmp_path, BASE + "sequence_length: 1024\nlearning_rate: 1e-4\n")
    assert len(issues) == 1
    issue = issues[0]
    assert issue.path == "sequence_length" and issue.line == 2
    assert "did you mean `sequence_len`" in issue.message


def test_unknown_nested_key_in_dataset_entry(tmp_path):
    text = BASE + "datasets:\n  - path: a.jsonl\n    type: chat_template\n    roles_to_trian: [assistant]\n"
    (issue,) = _issues(tmp_path, text)
    assert issue.path == "datasets.0.roles_to_trian" and issue.line == 5
    assert "roles_to_train" in issue.message


def test_unknown_key_in_user_defined_type(tmp_path):
    text = BASE + "datasets:\n  - path: a.jsonl\n    type:\n      field_instrucion: q\n"
    (issue,) = _issues(tmp_path, text)
    assert issue.path == "datasets.0.type.field_instrucion"
    assert "field_instruction" in issue.message


def test_not_supported_yet_is_distinct_from_unknown(tmp_path):
    (issue,) = _issues(tmp_path, BASE + "use_ray: true\n")
    assert "not supported yet" in issue.message and "unknown" not in issue.message
    assert issue.line == 2


def test_not_supported_key_with_noop_value_is_accepted(tmp_path):
    cfg = _load_text(tmp_path, BASE + "relora: false\nstrict: false\nfsdp:\ndeepspeed:\n")
    assert cfg.base_model == "some/model"


def test_switches_for_what_tuneforge_always_does_are_accepted_with_a_note(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="tuneforge"):
        cfg = _load_text(tmp_path, BASE + "liger_fused_linear_cross_entropy: true\nsdpa_varlen: false\n"
                         "dataloader_num_workers: 4\n")
    assert cfg.base_model == "some/model"
    notes = [r.message for r in caplog.records]
    assert any("`liger_fused_linear_cross_entropy` is not needed" in m and "without the full logits" in m for m in notes)
    assert not any("sdpa_varlen" in m for m in notes)  # false: nothing to say
    assert any("`dataloader_num_workers` is not needed" in m for m in notes)


def test_deprecated_attention_alias_maps_with_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="tuneforge"):
        cfg = _load_text(tmp_path, BASE + "flash_attention: true\n")
    assert cfg.attn_implementation == "flash_attention_2"
    assert any("deprecated" in r.message and "attn_implementation" in r.message for r in caplog.records)


def test_sharegpt_type_maps_to_chat_template(tmp_path):
    cfg = _load_text(tmp_path, BASE + "datasets:\n  - path: a.jsonl\n    type: sharegpt\n")
    entry = cfg.datasets[0]
    assert entry.type == "chat_template" and entry.field_messages == "conversations"
    assert entry.message_property_mappings == {"role": "from", "content": "value"}


def test_old_message_field_keys_map_into_property_mappings(tmp_path):
    text = BASE + "datasets:\n  - path: a.jsonl\n    type: chat_template\n    message_field_role: from\n"
    cfg = _load_text(tmp_path, text)
    assert cfg.datasets[0].message_property_mappings == {"role": "from"}


@pytest.mark.parametrize(
    "text, key, words",
    [
        ("adapter: qlora\nlora_target_linear: true\n", "adapter", "load_in_4bit"),
        ("warmup_steps: 10\nwarmup_ratio: 0.1\n", "warmup_ratio", "cannot both be set"),
        ("val_set_size: 0.1\ntest_datasets:\n  - path: t.jsonl\n", "test_datasets", "not both"),
        ("load_in_4bit: true\n", "load_in_4bit", "adapter: qlora"),
        ("adapter: lora\n", "lora_target_modules", "lora_target_linear"),
        ("save_steps: 10\nsaves_per_epoch: 2\n", "saves_per_epoch", "cannot both"),
        ("gradient_accumulation_steps: 2\nbatch_size: 8\n", "batch_size", "give one"),
        ("bf16: true\nfp16: true\n", "fp16", "conflict"),
        ("load_best_model_at_end: true\n", "load_best_model_at_end", "val_set_size"),
        ("rl: dpo\nreward_model: true\n", "rl", "keep one"),
    ],
)
def test_cross_field_rules(tmp_path, text, key, words):
    issues = _issues(tmp_path, BASE + text)
    match = [i for i in issues if i.path == key]
    assert match, [i.render() for i in issues]
    assert words in match[0].message


def test_all_errors_reported_at_once(tmp_path):
    text = BASE + "learning_rat: 1\nmicro_batch_size: 0\nwarmup_steps: 1\nwarmup_ratio: 0.1\ndeepspeed: z.json\n"
    issues = _issues(tmp_path, text)
    paths = {i.path for i in issues}
    assert {"learning_rat", "micro_batch_size", "warmup_ratio", "deepspeed"} <= paths


def test_type_error_names_value(tmp_path):
    (issue,) = _issues(tmp_path, BASE + "sequence_len: lots\n")
    assert issue.path == "sequence_len" and "lots" in issue.message and issue.line == 2


def test_missing_base_model(tmp_path):
    (issue,) = _issues(tmp_path, "learning_rate: 1e-4\n")
    assert issue.path == "base_model" and "required" in issue.message


def test_overrides_parse_kebab_and_dotted():
    got = parse_overrides(["--learning-rate", "3e-4", "--trl.beta", "0.1", "--sample-packing", "--lora-target-modules=[q_proj, v_proj]"])
    assert got == {"learning_rate": 3e-4, "trl": {"beta": 0.1}, "sample_packing": True,
                   "lora_target_modules": ["q_proj", "v_proj"]}


def test_overrides_apply_and_are_validated(tmp_path):
    cfg = _load_text(tmp_path, BASE + "learning_rate: 1e-5\n", ["--learning-rate", "3e-4", "--trl.beta", "0.1"])
    assert cfg.learning_rate == 3e-4 and cfg.trl.beta == 0.1
    (issue,) = _issues(tmp_path, BASE, ["--learnin-rate", "1"])
    assert issue.source == "command line" and "learning_rate" in issue.message


def test_switching_off_on_the_command_line_wins_over_the_files_companion_keys(tmp_path, caplog):
    text = BASE + "save_steps: 50\n"
    cfg = _load_text(tmp_path, text, ["--save-strategy", "no"])
    assert cfg.save_strategy == "no" and not cfg.save_steps
    assert any("save_steps: 50 from the file is not used" in r.message for r in caplog.records)
    # in the file itself the same pair is still a contradiction
    (issue,) = _issues(tmp_path, text + "save_strategy: 'no'\n")
    assert issue.path == "save_steps"
    # and both on the command line too
    (issue,) = _issues(tmp_path, BASE, ["--save-strategy", "no", "--save-steps", "5"])
    assert issue.path == "save_steps"


def test_invalid_yaml_reports_line(tmp_path):
    (issue,) = _issues(tmp_path, BASE + "datasets: [\n  - path: x\n")
    assert "invalid YAML" in issue.message and issue.line is not None


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load("/nonexistent/config.yaml")


def test_dump_roundtrips_with_axolotl_names(tmp_path):
    cfg = _load_text(tmp_path, BASE + "model_config:\n  num_hidden_layers: 2\n")
    data = dump(cfg)
    assert data["model_config"] == {"num_hidden_layers": 2}
    again = load(data=data)
    assert again.model_config_overrides == {"num_hidden_layers": 2}


def test_batch_size_sets_grad_accum(tmp_path):
    cfg = _load_text(tmp_path, BASE + "micro_batch_size: 2\nbatch_size: 8\n")
    assert cfg.grad_accum == 4


def test_relative_paths_resolve_next_to_config(tmp_path):
    (tmp_path / "data.jsonl").write_text("{}\n")
    cfg = _load_text(tmp_path, BASE)
    assert cfg.resolve_path("data.jsonl") == str(tmp_path / "data.jsonl")
    assert cfg.resolve_path("not-there.jsonl") == "not-there.jsonl"


def test_validate_cli_prints_resolved_config(tmp_path):
    from typer.testing import CliRunner

    from tuneforge.cli import app

    path = tmp_path / "c.yaml"
    path.write_text(BASE + "learning_rate: 1e-4\n")
    result = CliRunner().invoke(app, ["validate", str(path), "--micro-batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "micro_batch_size: 4" in result.output and "learning_rate: 0.0001" in result.output


def test_validate_cli_lists_every_problem(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "c.yaml"
    path.write_text(BASE + "learning_rat: 1\nwarmup_steps: 1\nwarmup_ratio: 0.5\n")
    proc = subprocess.run([sys.executable, "-m", "tuneforge.cli", "validate", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "2 problems" in proc.stderr and "Traceback" not in proc.stderr


def test_unquoted_no_strategy_means_no(tmp_path):
    cfg = _load_text(tmp_path, BASE + "save_strategy: no\neval_strategy: no\n")
    assert cfg.save_strategy == "no" and cfg.eval_strategy == "no"


def test_do_causal_lm_eval_needs_sft_evaluation_data_and_offline_metrics():
    ok = load(data={"base_model": "x", "val_set_size": 0.1, "do_causal_lm_eval": True, "eval_max_new_tokens": 32})
    assert ok.eval_causal_lm_metrics == ["sacrebleu", "chrf", "ter"]
    assert ok.generation_max_new_tokens == 32  # Axolotl's older name for the generation length
    with pytest.raises(ConfigError, match="do_causal_lm_eval.*supervised fine-tuning only"):
        load(data={"base_model": "x", "rl": "dpo", "val_set_size": 0.1, "do_causal_lm_eval": True})
    with pytest.raises(ConfigError, match="do_causal_lm_eval.*set val_set_size or test_datasets"):
        load(data={"base_model": "x", "do_causal_lm_eval": True})
    with pytest.raises(ConfigError, match="eval_causal_lm_metrics.*comet.*Hugging Face Hub"):
        load(data={"base_model": "x", "val_set_size": 0.1, "do_causal_lm_eval": True,
                   "eval_causal_lm_metrics": ["sacrebleu", "comet"]})
    with pytest.raises(ConfigError, match="eval_causal_lm_metrics"):
        load(data={"base_model": "x", "val_set_size": 0.1, "eval_causal_lm_metrics": ["bleurt"]})


def test_missing_sacrebleu_is_named_before_training(monkeypatch):
    import sys

    from tuneforge.engine import text_metrics
    from tuneforge.errors import TuneforgeError

    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # import fails as if not installed
    with pytest.raises(TuneforgeError, match="pip install sacrebleu"):
        text_metrics.require_sacrebleu(["chrf"])
    text_metrics.require_sacrebleu(["perplexity"])  # needs nothing


def test_generate_samples_needs_sft_and_evaluation_data():
    from tuneforge.config import load
    from tuneforge.config.errors import ConfigError

    with pytest.raises(ConfigError, match="generate_samples.*supervised fine-tuning only"):
        load(data={"base_model": "x", "rl": "dpo", "val_set_size": 0.1, "generate_samples": True})
    with pytest.raises(ConfigError, match="generate_samples.*set val_set_size or test_datasets"):
        load(data={"base_model": "x", "generate_samples": True})


def test_an_empty_key_means_its_default_unless_null_means_something(tmp_path):
    """Axolotl's example configs leave keys empty (`lora_fan_in_fan_out:`): a key that cannot be null takes its
    default; one where null has a meaning (max_grad_norm: no clipping) keeps it."""
    cfg = _load_text(tmp_path, BASE + "lora_fan_in_fan_out:\nnum_epochs:\nmax_grad_norm:\n"
                     "datasets:\n  - path: a.jsonl\n    type: alpaca\n    shards:\n")
    assert cfg.lora_fan_in_fan_out is False and cfg.num_epochs == 1.0
    assert cfg.max_grad_norm is None


def test_dynamic_checkpoint_trigger_is_a_file_name():
    from tuneforge.config import load
    from tuneforge.config.errors import ConfigError

    with pytest.raises(ConfigError, match="dynamic_checkpoint.trigger_file_path.*a file name"):
        load(data={"base_model": "x", "dynamic_checkpoint": {"enabled": True, "trigger_file_path": "/tmp/go"}})
