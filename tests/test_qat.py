"""Quantization-aware training (qat:) and FP8 training (fp8:): the fake quantization is the textbook formula, it
switches on at exactly fake_quant_after_n_steps (resume included), and the saved model is a plain one."""

from __future__ import annotations

import sys

import pytest
import torch

from test_engine_support import losses, make_config, make_rows, one_thread, train  # noqa: F401
from tuneforge.config import load
from tuneforge.config.errors import ConfigError
from tuneforge.config.quantization import QATBlock
from tuneforge.errors import NotSupportedYet
from tuneforge.models import fp8, qat

RUN = {"max_steps": 4, "logging_steps": 1, "save_strategy": "no", "learning_rate": 3e-3, "seed": 3}


def _int4_per_group(w: torch.Tensor, group: int) -> torch.Tensor:
    """Symmetric int4 per group of `group` input weights: scale = max|w| / 7.5 (half of the 16 levels), q = round(w /
    scale) clamped to [-8, 7], w' = q * scale."""
    g = w.reshape(w.shape[0], -1, group)
    scale = g.abs().amax(dim=-1, keepdim=True) / 7.5
    return (torch.clamp(torch.round(g / scale), -8, 7) * scale).reshape(w.shape)


def test_prepared_linear_is_int4_per_group_fake_quantization():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 8))
    x = torch.randn(3, 64)
    plain = model(x).detach()
    qat.prepare(QATBlock(weight_dtype="int4", group_size=32), model)
    layer = model[0]
    expected = x @ _int4_per_group(layer.weight.detach(), 32).T + layer.bias.detach()
    got = model(x).detach()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the rounding is visible: the test can tell it from no quantization
    assert qat.remove(model) == 1 and type(model[0]) is torch.nn.Linear
    torch.testing.assert_close(model(x), plain, rtol=0, atol=0)  # the same weights, no rounding


def test_layers_whose_input_is_not_a_multiple_of_the_group_stay_plain():
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 8))
    skipped = qat.prepare(QATBlock(weight_dtype="int4", activation_dtype="int8", group_size=32), model)
    assert skipped == ["1"] and type(model[1]) is torch.nn.Linear
    assert len(qat.quantizers(model)) == 2  # weight and activation quantizers of layer 0


def test_output_head_and_embedding_are_quantized_only_with_quantize_embedding():
    from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear
    from transformers import AutoModelForCausalLM

    from tuneforge.tiny import tiny_llama_config

    for with_embedding in (False, True):
        model = AutoModelForCausalLM.from_config(tiny_llama_config(96, layers=1))
        qat.prepare(QATBlock(weight_dtype="int4", group_size=32, quantize_embedding=with_embedding), model)
        assert isinstance(model.model.layers[0].mlp.down_proj, FakeQuantizedLinear)
        assert isinstance(model.lm_head, FakeQuantizedLinear) is with_embedding
        assert isinstance(model.model.embed_tokens, FakeQuantizedEmbedding) is with_embedding


def test_qat_run_learns_saves_a_plain_model_and_a_quantized_one_computing_the_same(tmp_path, tiny_model_dir):
    """The saved folder is a plain transformers model; `quantization:` with the qat settings writes
    output_dir/quantized, whose int4 weights / int8 activations give the logits the fake-quantized model gave."""
    from transformers import AutoModelForCausalLM

    rows = make_rows(n=4, seed=4, vocab=60)  # few rows over a small vocabulary: learnable in a few steps
    keys = {**RUN, "max_steps": 8, "learning_rate": 1e-2}
    scheme = {"weight_dtype": "int4", "activation_dtype": "int8", "group_size": 32, "quantize_embedding": True}
    cfg = make_config(tmp_path / "q", tiny_model_dir, rows, qat=scheme, quantization=scheme, **keys)
    run = losses(train(cfg))
    plain = losses(train(make_config(tmp_path / "p", tiny_model_dir, rows, **keys)))
    assert run[1] != pytest.approx(plain[1], abs=1e-5)  # fake quantization from the first step
    assert run[8] < run[1] - 1.0, run
    out = tmp_path / "q" / "out"
    saved = AutoModelForCausalLM.from_pretrained(str(out))
    names = {type(m).__name__ for m in saved.modules()}
    assert not any("FakeQuantized" in n for n in names) and "Linear" in names and "Embedding" in names
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert set(saved.state_dict()) == set(base.state_dict())
    assert (saved.model.embed_tokens.weight - base.model.embed_tokens.weight).abs().max() > 0  # trained

    ids = torch.tensor([rows[0]["input_ids"][:20]])
    quantized = AutoModelForCausalLM.from_pretrained(str(out / "quantized"))
    assert "Int" in type(quantized.lm_head.weight).__name__  # torchao's int tensor, not a float Parameter
    with torch.no_grad():
        sixteen_bit = saved(ids).logits
        qat.prepare(QATBlock(**scheme), saved)
        fake = saved(ids).logits
        real = quantized(ids).logits
    torch.testing.assert_close(real, fake, rtol=0, atol=1e-5)
    assert (real - sixteen_bit).abs().max() > 1e-2


def test_quantize_command_uses_the_qat_scheme(tmp_path, tiny_model_dir):
    """`tuneforge quantize` on a model folder: the qat block's scheme (weights only here), and clear refusals."""
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from tuneforge.cli import app

    config = tmp_path / "c.yaml"
    config.write_text(f"base_model: {tiny_model_dir}\noutput_dir: {tmp_path / 'out'}\n"
                      "qat:\n  weight_dtype: int8\n  group_size: 32\n  fake_quant_after_n_steps: 5\n")
    result = CliRunner().invoke(app, ["quantize", str(config), "--model", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output or repr(result.exception)
    ids = torch.tensor([[5, 17, 99, 3, 250, 7]])
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    qat.prepare(QATBlock(weight_dtype="int8", group_size=32), model)
    quantized = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "quantized"))
    with torch.no_grad():
        torch.testing.assert_close(quantized(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    assert (tmp_path / "out" / "quantized" / "tokenizer_config.json").exists()  # servable as it is
    config.write_text(f"base_model: {tiny_model_dir}\noutput_dir: {tmp_path / 'none'}\n")
    result = CliRunner().invoke(app, ["quantize", str(config), "--model", str(tiny_model_dir)])
    assert "quantize: the config has no `quantization:` block (nor `qat:`)" in str(result.exception)
    config.write_text(f"base_model: {tiny_model_dir}\noutput_dir: {tmp_path / 'none'}\nqat:\n  weight_dtype: int4\n")
    result = CliRunner().invoke(app, ["quantize", str(config)])
    assert f"quantize: no model in {tmp_path / 'none'} (no config.json); train first" in str(result.exception)


def test_fake_quant_switches_on_at_the_step_and_resume_across_it_is_exact(tmp_path, tiny_model_dir):
    """Switched on after 2 steps: steps 1-2 repeat a run whose switch never comes (the same layers, quantizers off),
    step 3 differs; a run resumed from checkpoint-1 switches at the same step and repeats the losses exactly."""
    rows = make_rows(n=16, seed=4)
    block = {"weight_dtype": "int4", "group_size": 32}
    keys = {**RUN, "save_strategy": "steps", "save_steps": 1}
    never = losses(train(make_config(tmp_path / "n", tiny_model_dir, rows, **RUN,
                                     qat={**block, "fake_quant_after_n_steps": 100})))
    block["fake_quant_after_n_steps"] = 2
    late = losses(train(make_config(tmp_path / "late", tiny_model_dir, rows, qat=block, **keys)))
    assert [late[1], late[2]] == [never[1], never[2]]
    assert abs(late[3] - never[3]) > 1e-4
    ckpt = tmp_path / "late" / "out" / "checkpoint-1"
    resumed = losses(train(make_config(tmp_path / "r", tiny_model_dir, rows, qat=block, **keys,
                                       resume_from_checkpoint=str(ckpt))))
    assert sorted(resumed) == [2, 3, 4]
    for step in (2, 3, 4):
        assert abs(resumed[step] - late[step]) <= 1e-6, (step, resumed[step], late[step])


def test_qat_config_rules():
    base = {"base_model": "x"}
    cfg = load(data={**base, "qat": {"weight_dtype": "fp8", "activation_dtype": "float8_e4m3fn"}})
    assert (cfg.qat.weight_dtype, cfg.qat.activation_dtype, cfg.qat.group_size) == ("float8", "float8", 32)
    with pytest.raises(ConfigError, match="qat: quantization-aware training .* cannot be combined with an adapter"):
        load(data={**base, "adapter": "lora", "qat": {"weight_dtype": "int4"}})
    with pytest.raises(ConfigError, match="weight_dtype int8 with activation_dtype int4 is not a scheme"):
        load(data={**base, "qat": {"weight_dtype": "int8", "activation_dtype": "int4"}})
    with pytest.raises(ConfigError, match="nvfp4 quantizes blocks of 16 weights; set group_size: 16"):
        load(data={**base, "qat": {"weight_dtype": "nvfp4", "activation_dtype": "nvfp4", "group_size": 32}})
    with pytest.raises(ConfigError, match="fake_quant_after_n_steps: torchao's nvfp4 training layers"):
        load(data={**base, "qat": {"weight_dtype": "nvfp4", "activation_dtype": "nvfp4", "group_size": 16,
                                   "fake_quant_after_n_steps": 10}})
    with pytest.raises(ConfigError, match="qat.quantize_embedding: embeddings are quantized per group in int4 or int8"):
        load(data={**base, "qat": {"weight_dtype": "float8", "activation_dtype": "float8", "quantize_embedding": True}})
    with pytest.raises(ConfigError, match="quantization: the quantized export writes int4/int8 weights .* not float8"):
        load(data={**base, "quantization": {"weight_dtype": "float8", "activation_dtype": "float8"}})
    with pytest.raises(ConfigError, match="qat: is not available with DeepSpeed.* shard with FSDP2 instead"):
        load(data={**base, "deepspeed": {"zero_optimization": {"stage": 3}}, "qat": {"weight_dtype": "int4"}})
    with pytest.raises(ConfigError, match="quantization: the export quantizes a whole model, not an adapter"):
        load(data={**base, "adapter": "lora", "quantization": {"weight_dtype": "int4"}})


def test_nvfp4_refuses_a_machine_without_blackwell(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(NotSupportedYet, match="nvfp4 training .* Blackwell .* this machine has no CUDA GPU"):
        qat.prepare(QATBlock(weight_dtype="nvfp4", activation_dtype="nvfp4", group_size=16),
                    torch.nn.Sequential(torch.nn.Linear(32, 16)))


def test_missing_torchao_is_one_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.quantization.qat", None)  # `import` then raises ImportError
    with pytest.raises(NotSupportedYet, match=r"qat: needs torchao.*pip install 'tuneforge\[torchao\]'"):
        qat.prepare(QATBlock(weight_dtype="int4"), torch.nn.Sequential(torch.nn.Linear(32, 16)))
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(NotSupportedYet, match=r"fp8: needs torchao.*pip install 'tuneforge\[torchao\]'"):
        fp8.convert(torch.nn.Sequential(torch.nn.Linear(32, 16)))


# ------------------------------------------------------------------------------------------------ on a GPU
def _sft_tiny(tmp_path, monkeypatch, *overrides: str):
    from pathlib import Path

    from tuneforge.engine.run import train as run_train

    examples = Path(__file__).resolve().parents[1] / "examples"
    tmp_path.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(tmp_path)
    cfg = load(examples / "sft-tiny.yaml", ["--bf16", "true", "--num-epochs", "1", "--logging-steps", "1",
                                            *overrides])
    return losses(run_train(cfg, show_progress=False))


@pytest.mark.gpu
def test_qat_training_on_gpu_learns(tmp_path, monkeypatch):
    """int8 activations / int4 weights fake-quantized under bf16 autocast on CUDA, with compiled blocks."""
    run = _sft_tiny(tmp_path, monkeypatch, "--torch-compile", "true", "--qat.weight-dtype", "int4",
                    "--qat.activation-dtype", "int8", "--qat.group-size", "32")
    assert run[max(run)] < 0.5 * run[min(run)], run


@pytest.mark.slow
def test_qat_with_fsdp2_matches_one_process_and_saves_a_plain_model(tmp_path, tiny_model_dir):
    """Two sharded CPU processes (torchrun, gloo) with fake quantization switched on after step 2 train like one
    process accumulating the same micro-batches, and the gathered final folder is a plain model with the same
    weights (up to Adam's sign flips). Before the switch the runs agree exactly; after it to 1e-3 only: rounding to 16 levels amplifies the
    ~1e-7 differences of sharded sums where a weight sits on a rounding boundary (on this random tiny model that
    is as large as the quantization's own effect on the loss, so the switch itself is checked by the
    single-process test above)."""
    import os
    import subprocess

    from safetensors.torch import load_file

    rows = make_rows(n=24, seed=3, vocab=60)
    keys = {"micro_batch_size": 2, "max_steps": 4, "lr_scheduler": "constant", "save_strategy": "no",
            "learning_rate": 1e-2,
            "logging_steps": 1, "qat": {"weight_dtype": "int4", "activation_dtype": "int8", "group_size": 32,
                                        "fake_quant_after_n_steps": 2}}
    single = losses(train(make_config(tmp_path / "single", tiny_model_dir, rows, gradient_accumulation_steps=2,
                                      **keys)))
    make_config(tmp_path / "fsdp", tiny_model_dir, rows, gradient_accumulation_steps=1, fsdp_version=2,
                fsdp_config={"reshard_after_forward": True}, **keys)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                           "tuneforge.cli", "train", str(tmp_path / "fsdp" / "config.yaml")], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    records = [json.loads(line) for line in (tmp_path / "fsdp" / "out" / "metrics.jsonl").read_text().splitlines()]
    sharded = {r["step"]: r["loss"] for r in records if r["type"] == "train"}
    assert sorted(sharded) == sorted(single)
    assert [sharded[1], sharded[2]] == [single[1], single[2]]
    assert all(abs(sharded[s] - single[s]) <= 1e-3 for s in (3, 4)), (sharded, single)
    a = load_file(str(tmp_path / "fsdp" / "out" / "model.safetensors"))
    b = load_file(str(tmp_path / "single" / "out" / "model.safetensors"))
    assert set(a) == set(b)
    # Adam turns a flipped sign of a near-zero gradient into a full step (lr = 1e-2): a few weights differ by that
    # much (observed: 0.4% by more than 1e-3), the rest agree (observed mean difference 7e-5).
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diffs.mean() <= 2e-4 and (diffs > 1e-3).float().mean() <= 0.01, (diffs.mean(), diffs.max())
