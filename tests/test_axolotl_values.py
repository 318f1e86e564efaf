"""Axolotl values that tuneforge translates (config/axolotl_values.py): each becomes the exact tuneforge
setting, with one note, or is refused naming the key and what to do instead."""

from __future__ import annotations

import pytest

from config_support import issues_of as _issues
from config_support import load_text as _load
from config_support import notes_of as _notes
from tuneforge import chat_templates


@pytest.mark.parametrize(("strategy", "reshard"), [("FULL_SHARD", True), ("SHARD_GRAD_OP", False)])
def test_fsdp1_sharding_strategy_becomes_reshard_after_forward(tmp_path, caplog, strategy, reshard):
    cfg, notes = _notes(tmp_path, caplog, f"fsdp_version: 2\nfsdp_config:\n  sharding_strategy: {strategy}\n")
    assert cfg.fsdp_config.reshard_after_forward is reshard
    assert any(n.startswith(f"fsdp_config.sharding_strategy: {strategy} is FSDP1's setting") for n in notes)


def test_sharding_strategy_with_the_fsdp1_list_and_prefixed_names_is_no_conflict(tmp_path, caplog):
    # the list form, fsdp_-prefixed keys and the strategy all say the same thing
    cfg, _ = _notes(tmp_path, caplog, "fsdp:\n  - full_shard\n  - auto_wrap\nfsdp_config:\n  fsdp_version: 2\n"
                    "  fsdp_sharding_strategy: FULL_SHARD\n  fsdp_reshard_after_forward: true\n"
                    "  fsdp_state_dict_type: FULL_STATE_DICT\n")
    assert cfg.fsdp_version == 2 and cfg.fsdp_config.reshard_after_forward is True
    assert cfg.fsdp_config.state_dict_type == "FULL_STATE_DICT"


def test_conflicting_or_unsupported_sharding_strategies_are_refused(tmp_path):
    (issue,) = _issues(tmp_path, "fsdp_version: 2\nfsdp_config:\n  sharding_strategy: SHARD_GRAD_OP\n"
                       "  reshard_after_forward: true\n")
    assert issue.path == "fsdp_config.sharding_strategy" and "conflicts with" in issue.message
    (issue,) = _issues(tmp_path, "fsdp_version: 2\nfsdp_config:\n  sharding_strategy: HYBRID_SHARD\n")
    assert "HSDP" in issue.message
    (issue,) = _issues(tmp_path, "fsdp_version: 2\nfsdp_config:\n  sharding_strategy: NO_SHARD\n")
    assert "remove fsdp_config" in issue.message


@pytest.mark.parametrize(("value", "expected"), [
    ("xformers", "sdpa"), ("kernels-community/vllm-flash-attn3", "flash_attention_2"), ("eager", "eager")])
def test_attention_spellings(tmp_path, caplog, value, expected):
    cfg, notes = _notes(tmp_path, caplog, f"attn_implementation: {value}\n")
    assert cfg.attn_implementation == expected
    assert any(n.startswith(f"attn_implementation: {value}") for n in notes) == (value != expected)


def test_an_unknown_hub_kernel_is_still_an_error(tmp_path):
    (issue,) = _issues(tmp_path, "attn_implementation: kernels-community/some-other-kernel\n")
    assert issue.path == "attn_implementation"


@pytest.mark.parametrize(("text", "expected"), [
    ("experts_implementation: scattermoe\n", "grouped_mm"),
    ("experts_implementation: batched_mm\n", "batched_mm"),
    ("use_scattermoe: true\n", "grouped_mm"),
    ("use_sonicmoe: true\nmodel_kwargs:\n  foo: 1\n", "grouped_mm"),
])
def test_moe_kernels_become_transformers_experts_implementation(tmp_path, caplog, text, expected):
    cfg, notes = _notes(tmp_path, caplog, text)
    assert cfg.model_kwargs["experts_implementation"] == expected
    assert sum("experts_implementation" in n for n in notes) == 1
    if "foo" in text:
        assert cfg.model_kwargs["foo"] == 1  # the user's own kwargs are kept


def test_unknown_experts_implementation_is_refused(tmp_path):
    (issue,) = _issues(tmp_path, "experts_implementation: magic\n")
    assert issue.path == "experts_implementation" and "grouped_mm" in issue.message


def test_mxfp4_dequantized_is_passed_to_from_pretrained(tmp_path, caplog):
    cfg, notes = _notes(tmp_path, caplog, "model_quantization_config: Mxfp4Config\n"
                        "model_quantization_config_kwargs:\n  dequantize: true\n")
    assert cfg.model_kwargs == {"quantization_config": {"quant_method": "mxfp4", "dequantize": True}}
    assert any("dequantized" in n for n in notes)


def test_the_mxfp4_kwargs_build_transformers_config():
    from transformers.quantizers.auto import AutoQuantizationConfig

    config = AutoQuantizationConfig.from_dict({"quant_method": "mxfp4", "dequantize": True})
    assert type(config).__name__ == "Mxfp4Config" and config.dequantize is True


@pytest.mark.parametrize("text", ["model_quantization_config: Mxfp4Config\n",
                                  "model_quantization_config: TorchAoConfig\n"
                                  "model_quantization_config_kwargs:\n  dequantize: true\n"])
def test_quantized_weights_that_would_stay_quantized_are_refused(tmp_path, text):
    (issue,) = _issues(tmp_path, text)
    assert issue.path == "model_quantization_config" and "load_in_4bit" in issue.message


def test_older_tokens_mapping_is_special_tokens(tmp_path, caplog):
    cfg, notes = _notes(tmp_path, caplog, "tokens:\n  pad_token: <pad>\n  bos_token: <s>\n"
                        "special_tokens:\n  bos_token: <bos>\n")
    assert cfg.special_tokens.pad_token == "<pad>" and cfg.special_tokens.bos_token == "<bos>"  # explicit one wins
    assert cfg.tokens is None and any("`tokens:` as a mapping" in n for n in notes)


def test_tokens_as_a_list_are_still_plain_tokens(tmp_path):
    assert _load(tmp_path, "tokens:\n  - <x>\n").tokens == ["<x>"]


def test_fractional_warmup_steps_is_a_ratio(tmp_path, caplog):
    cfg, notes = _notes(tmp_path, caplog, "warmup_steps: 0.1\n")
    assert cfg.warmup_ratio == 0.1 and cfg.warmup_steps is None
    assert any(n.startswith("warmup_steps: 0.1") for n in notes)
    assert _load(tmp_path, "warmup_steps: 10\n").warmup_steps == 10


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("legacy", True), ("false", False)])
def test_activation_offloading_values(tmp_path, value, expected):
    assert _load(tmp_path, f"activation_offloading: {value}\n").activation_offloading is expected


def test_activation_offloading_to_disk_is_refused(tmp_path):
    (issue,) = _issues(tmp_path, "activation_offloading: disk\n")
    assert issue.path == "activation_offloading" and "activation_offloading: true" in issue.message


@pytest.mark.parametrize("text", ["gradient_checkpointing: offload\n", "gradient_checkpointing: unsloth\n",
                                  "activation_offloading: hidden_states\n",
                                  "activation_offloading: hidden_states\ngradient_checkpointing: true\n"])
def test_offloaded_checkpointing_is_checkpointing_with_offloading(tmp_path, caplog, text):
    cfg, notes = _notes(tmp_path, caplog, text)
    assert cfg.gradient_checkpointing is True and cfg.activation_offloading is True
    assert any("waits in CPU memory for its recompute" in n for n in notes)


@pytest.mark.parametrize(("text", "key", "fix"), [
    ("gradient_checkpointing: offload_disk\n", "gradient_checkpointing", "gradient_checkpointing: offload"),
    ("gradient_checkpointing: offload\nactivation_offloading: false\n", "gradient_checkpointing",
     "gradient_checkpointing: true"),
    ("activation_offloading: hidden_states\ngradient_checkpointing: false\n", "activation_offloading",
     "gradient_checkpointing: true"),
])
def test_offloading_that_cannot_be_done_is_refused(tmp_path, text, key, fix):
    (issue,) = _issues(tmp_path, text)
    assert issue.path == key and fix in issue.message


def test_thinking_fields_map_the_reasoning_key(tmp_path, caplog):
    cfg, notes = _notes(tmp_path, caplog, "datasets:\n  - path: a.jsonl\n    type: chat_template\n"
                        "    field_thinking: reasoning\n    template_thinking_key: thinking\n")
    assert cfg.datasets[0].message_property_mappings == {"thinking": "reasoning"}
    assert any("`reasoning` reaches the chat template as `thinking`" in n for n in notes)


def test_equal_thinking_fields_need_no_mapping(tmp_path):
    cfg = _load(tmp_path, "datasets:\n  - path: a.jsonl\n    type: chat_template\n"
                "    field_thinking: thinking\n    template_thinking_key: thinking\n")
    assert cfg.datasets[0].message_property_mappings is None


def test_mapped_thinking_reaches_the_template(tmp_path):
    from tuneforge.config.data import DatasetEntry
    from tuneforge.data.formats.chat_template import MessageReader

    cfg = _load(tmp_path, "datasets:\n  - path: a.jsonl\n    type: chat_template\n"
                "    field_thinking: reasoning\n    template_thinking_key: thinking\n")
    reader = MessageReader(cfg, DatasetEntry.model_validate(cfg.datasets[0].model_dump()))
    messages, _, _ = reader({"messages": [{"role": "user", "content": "q"},
                                          {"role": "assistant", "content": "a", "reasoning": "r"}]})
    assert messages[1] == {"role": "assistant", "content": "a", "thinking": "r"}


@pytest.mark.parametrize(("text", "note"), [
    ("tokenizer_use_mistral_common: true\n", "tokenizer.json"),
    ("cls_model_config: LlamaConfig\n", "config.json"),
    ("revision_of_model: abc123\n", "model_revision"),
    ("hub_model_id: me/model\n", "huggingface-cli upload"),
    ("use_kernels: true\n", "torch_compile: auto"),
    ("eta_min: 1.0e-6\n", "cosine_min_lr_ratio"),
])
def test_keys_accepted_with_a_note(tmp_path, caplog, text, note):
    _, notes = _notes(tmp_path, caplog, text)
    assert any(note in n for n in notes), notes


def test_revision_of_model_is_the_model_revision(tmp_path):
    assert _load(tmp_path, "revision_of_model: abc123\n").model_revision == "abc123"


def test_a_misspelt_axolotl_key_names_it(tmp_path):
    (issue,) = _issues(tmp_path, "context_parapllel_size: 2\n")
    assert issue.message.startswith("unknown key `context_parapllel_size`; did you mean Axolotl's "
                                    "`context_parallel_size`? (not supported here: context parallelism")


def test_gemma4_unified_is_gemma4():
    assert chat_templates.canonical("gemma4_unified") == "gemma4"
    assert chat_templates.template("gemma4_unified") == chat_templates.template("gemma4")
