"""Axolotl keys tuneforge refuses say what to do instead; `test_value` (a stray key of one example) is a note."""

from __future__ import annotations

import pytest

from config_support import issues_of, notes_of


@pytest.mark.parametrize(("text", "key", "instead"), [
    ("flash_optimum: true\n", "flash_optimum", "attn_implementation: sdpa, the default"),
    ("use_ray: true\n", "use_ray", "`tuneforge train` starts one process per visible GPU itself"),
    ("ray_num_workers: 4\n", "ray_num_workers", "--num-processes N; several machines: --nnodes"),
    ("use_otel_metrics: true\n", "use_otel_metrics", "use_tensorboard, wandb_project, use_mlflow or use_swanlab"),
    ("otel_metrics_port: 8000\n", "otel_metrics_port", "the metrics are in output_dir/metrics.jsonl"),
    ("llmcompressor:\n  recipe: x\n", "llmcompressor", "fine-tune the model densely here, then sparsify"),
    ("gptq: true\n", "gptq", "start from the unquantized model with adapter: qlora and load_in_4bit: true"),
    ("nvfp4_merge_aware: true\n", "nvfp4_merge_aware", "merge with `tuneforge merge-lora`, then quantize"),
    ("diffusion:\n  eps: 0.001\n", "diffusion", "train the model as a causal LM (next-token loss)"),
    ("plugins: [axolotl.integrations.diffusion.DiffusionPlugin]\n", "plugins", "remove the plugin and the diffusion"),
])
def test_each_refusal_names_the_key_and_what_to_do(tmp_path, text, key, instead):
    [issue] = issues_of(tmp_path, text)
    assert issue.path == key and instead in issue.message


def test_test_value_is_accepted_with_a_note(tmp_path, caplog):
    _, notes = notes_of(tmp_path, caplog, "test_value: true\n")
    assert "`test_value` is not needed: it is not an Axolotl key either (a stray key in one of Axolotl's " \
           "examples; Axolotl drops keys it does not know)" in notes
