"""QLoRA under FSDP2 (torchao NF4 base), run for real on CPU processes (torchrun, gloo): two sharded processes
train exactly like one process accumulating the same micro-batches of the same NF4 model, each process holds
half of the 4-bit base, the NF4 model is the 16-bit one within NF4's rounding, checkpoints leave the frozen
base out and resume, and the final folder is a PEFT adapter that loads onto the 16-bit base."""

from __future__ import annotations

import textwrap

import pytest
import torch

from test_engine_support import losses, make_config, make_rows, train
from test_fsdp import FSDP, _close, _script_reports, _torchrun, _train_records
from tuneforge.config import load
from tuneforge.config.errors import ConfigError

pytest.importorskip("torchao")

QLORA = {"adapter": "qlora", "load_in_4bit": True, "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True}
RUN = {"micro_batch_size": 2, "max_steps": 4, "learning_rate": 1e-3, "lr_scheduler": "constant",
       "optimizer": "adamw_torch", "logging_steps": 1}
LINEARS = 7  # q, k, v, o, gate, up, down in each of the tiny model's 2 decoder layers


@pytest.fixture(scope="module")
def nf4_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny Llama with hidden size 256 (the tiny tokenizer, copied): every linear weight of its layers
    splits into whole NF4 blocks (64 values, scales by 256) on 2 processes (k/v: 128 x 256 = 2 x 16384)."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.tiny import tiny_llama_config

    folder = tmp_path_factory.mktemp("tiny-nf4")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer), hidden=256)).save_pretrained(str(folder))
    return folder


# ---------------------------------------------------------------- training on 2 processes
@pytest.mark.slow
def test_two_processes_train_like_one_save_an_adapter_and_resume(tmp_path, nf4_model_dir):
    from safetensors.torch import load_file

    rows = make_rows(n=24, seed=4)
    keys = {**RUN, **QLORA, **FSDP, "save_strategy": "steps", "save_steps": 2}
    single = train(make_config(tmp_path / "single", nf4_model_dir, rows, gradient_accumulation_steps=2, **keys))
    make_config(tmp_path / "fsdp", nf4_model_dir, rows, gradient_accumulation_steps=1, **keys)
    config = str(tmp_path / "fsdp" / "config.yaml")
    done = _torchrun("-m", "tuneforge.cli", "train", config)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Failed to load" not in done.stderr  # torchao's and bitsandbytes' import notices are dropped
    out = tmp_path / "fsdp" / "out"
    whole = _train_records(out)
    _close(whole, losses(single))

    # The final folder is the PEFT adapter (the same as one process's); it loads onto the 16-bit base.
    a, b = load_file(str(out / "adapter_model.safetensors")), load_file(
        str(tmp_path / "single" / "out" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and len([k for k in a if "lora_B" in k]) == 2 * LINEARS
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 0  # it trained (B starts at zero)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(nf4_model_dir)), str(out))

    # Checkpoints hold the adapter and its optimizer states, not the frozen 4-bit base.
    import torch.distributed.checkpoint as dcp

    ckpt = out / "checkpoint-2"
    names = list(dcp.FileSystemReader(str(ckpt / "sharded")).read_metadata().state_dict_metadata)
    assert any("lora_A" in n for n in names) and not any("base_layer" in n for n in names), names

    # Resume on one process accumulating both micro-batches: the uninterrupted run's losses for steps 3-4.
    one = train(load(config, ["--output-dir", str(tmp_path / "r1"), "--gradient-accumulation-steps", "2",
                              "--resume-from-checkpoint", str(ckpt)]))
    _close(losses(one), {s: v for s, v in whole.items() if s > 2})


SHARE_SCRIPT = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from tuneforge.config import load
    from tuneforge.distributed import fsdp
    from tuneforge.models import nf4
    from tuneforge.models.adapters import apply_adapter
    from tuneforge.models.load import load_model

    dist.init_process_group("gloo")
    cfg = load(data={"base_model": sys.argv[1], "datasets": [{"path": "d.jsonl"}], "adapter": "qlora",
                     "load_in_4bit": True, "lora_target_linear": True, "fsdp_version": 2})
    model = apply_adapter(cfg, load_model(cfg, None))
    base = [p for p in model.parameters() if nf4.is_nf4(p)]
    whole = {"nf4": sum(nf4.nf4_bytes(p) for p in base), "bf16": sum(2 * p.numel() for p in base)}

    class Root(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.model = m

        def forward(self, ids):
            return self.model(input_ids=ids, labels=ids).loss

    root = Root(model)
    fsdp.shard(root, model, cfg.fsdp_config)
    root(torch.randint(0, 900, (2, 16))).backward()  # the sharded 4-bit base computes
    shards = [p for p in root.parameters() if nf4.is_nf4(p)]
    print(json.dumps({"count": len(shards), "held": sum(nf4.nf4_bytes(p) for p in shards), **whole,
                      "rows": sorted({tuple(p.to_local().shape) for p in shards})}), flush=True)
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_each_process_holds_half_of_the_4bit_base(tmp_path, nf4_model_dir):
    for r in _script_reports(tmp_path, SHARE_SCRIPT, str(nf4_model_dir)):
        assert r["count"] == 2 * LINEARS
        assert r["rows"] == [[64, 256], [128, 256], [128, 1024], [512, 256]], r  # half the rows of each weight
        # Half of the 4-bit base each (the 16 NF4 levels and the scale mean are the only replicated values) ...
        assert abs(r["held"] - r["nf4"] / 2) <= 0.01 * r["nf4"] / 2, r
        # ... which is a quarter of the bf16 weights' half: 4 bits + an 8-bit scale per 64 + fp32 per 16384.
        assert 0.25 <= r["held"] / (r["bf16"] / 2) <= 0.27, r


# ---------------------------------------------------------------- the NF4 model itself
def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_nf4_model_is_the_16bit_one_within_nf4_rounding(nf4_model_dir):
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.models import nf4
    from tuneforge.models.lora_fuse import why_not

    full = AutoModelForCausalLM.from_pretrained(str(nf4_model_dir), dtype=torch.float32)
    quant = copy.deepcopy(full)
    assert nf4.quantize_decoder_linears(quant) == 2 * LINEARS
    assert not nf4.is_nf4(quant.lm_head.weight) and not nf4.is_nf4(quant.model.embed_tokens.weight)
    # Each weight is within NF4's rounding of the 16-bit one: every value within half the widest gap between
    # NF4 levels (-1 and -0.696) of its block's absmax (plus the 8-bit absmax's own rounding), about 9% RMS
    # error for normal weights; torchao's dequantized copies give the reference layers.
    rounded = copy.deepcopy(full)
    pairs = [(n, m) for n, m in quant.model.layers.named_modules() if type(m) is torch.nn.Linear]
    for name, module in pairs:
        w, d = full.model.layers.get_submodule(name).weight, module.weight.get_original_weight()
        blocks, errors = w.reshape(-1, 64), (d - w).reshape(-1, 64)
        assert (errors.abs().amax(1) <= 0.16 * blocks.abs().amax(1)).all(), name
        assert 0.05 < ((d - w).norm() / w.norm()).item() < 0.12, name
        rounded.model.layers.get_submodule(name).weight.data = d
    ids = torch.randint(0, 900, (2, 12), generator=torch.Generator().manual_seed(0))
    a, q, r = _logits(full, ids), _logits(quant, ids), _logits(rounded, ids)
    assert (q - r).abs().max().item() <= 1e-5  # NF4 layers compute with exactly the rounded weights
    assert ((q - a).norm() / a.norm()).item() > 1e-3  # the model really is quantized ...
    assert torch.nn.functional.cosine_similarity(q.flatten(), a.flatten(), dim=0).item() > 0.95  # ... and close

    # PEFT's LoRA wraps the NF4 layers: with B = 0 it adds nothing; the fused kernels leave them to PEFT.
    peft_model = get_peft_model(quant, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    assert torch.equal(_logits(peft_model, ids), q)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    reason = why_not(layer)
    assert reason is not None and "NF4" in reason
    # GRPO's fused decoding would fold the weights into a 16-bit copy: it decodes through transformers instead.
    from tuneforge.rollout.fused_decode import Unsupported, _effective_linear

    with pytest.raises(Unsupported, match="NF4"):
        _effective_linear(layer, None)


def test_weights_that_do_not_split_into_whole_blocks_stay_16bit(tiny_model_dir, caplog):
    from transformers import AutoModelForCausalLM

    from tuneforge.models import nf4

    assert nf4.quantizable(torch.empty(256, 256), 2) and nf4.quantizable(torch.empty(128, 256), 2)
    assert not nf4.quantizable(torch.empty(64, 256), 2)  # 16384 values: one scale block, not one per process
    assert not nf4.quantizable(torch.empty(1, 32768), 2)  # one row cannot be split over two processes
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))  # hidden 64: attention 64 x 64 is too small
    with caplog.at_level("DEBUG", logger="tuneforge"):
        assert nf4.quantize_decoder_linears(model) == 2 * 3  # gate, up, down: 256 x 64 = 16384 values
    assert not nf4.is_nf4(model.model.layers[0].self_attn.q_proj.weight)
    assert "q_proj (64, 64)" in caplog.text


def test_missing_torchao_is_one_message_with_the_install_command(monkeypatch):
    import importlib.util

    from tuneforge.errors import ModelError
    from tuneforge.models import nf4

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(ModelError, match=r"pip install 'tuneforge\[torchao\]'"):
        nf4.torchao_nf4()


# ---------------------------------------------------------------- configuration and plan
AXOLOTL_SHAPED = {  # the keys of Axolotl's llama-3 / qwen qlora-fsdp examples (FSDP1 spellings)
    "base_model": "x", "datasets": [{"path": "d.jsonl", "type": "alpaca"}], "load_in_8bit": False,
    "load_in_4bit": True, "adapter": "qlora", "lora_r": 8, "lora_alpha": 16, "lora_target_linear": True,
    "gradient_checkpointing": True, "fsdp": ["full_shard", "auto_wrap"],
    "fsdp_config": {"fsdp_limit_all_gathers": True, "fsdp_sync_module_states": True, "fsdp_offload_params": True,
                    "fsdp_use_orig_params": False, "fsdp_cpu_ram_efficient_loading": True,
                    "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                    "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
                    "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_sharding_strategy": "FULL_SHARD"},
}


def test_axolotl_qlora_fsdp_config_validates_and_8bit_is_refused():
    cfg = load(data=AXOLOTL_SHAPED)
    assert cfg.fsdp_enabled and cfg.load_in_4bit and cfg.fsdp_config.offload_params
    with pytest.raises(ConfigError) as err:
        load(data={**AXOLOTL_SHAPED, "load_in_4bit": False, "load_in_8bit": True, "adapter": "lora"})
    text = str(err.value)
    assert "load_in_8bit" in text and "load_in_4bit: true under FSDP2" in text and "one GPU" in text, text


def test_planner_counts_the_4bit_base_sharded_and_the_rest_16bit(tiny_model_dir):
    from tuneforge.planner import plan
    from tuneforge.planner.model import count, model_config

    data = {"base_model": str(tiny_model_dir), "datasets": [{"path": "d.jsonl"}], "bf16": True, **QLORA}
    cfg = load(data={**data, "fsdp_version": 2})
    plain, quant = (count(cfg, model_config(cfg), torch.bfloat16, q, upcast=False) for q in (None, "nf4"))
    quantized = plain.matmul_params
    per_weight = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits, an 8-bit scale per 64, an fp32 constant per 256 scales
    assert quant.frozen.bytes == pytest.approx(quantized * per_weight + 2 * (plain.frozen.count - quantized), abs=100)
    assert plan(cfg, gpus=2, with_suggestions=False).estimate.part("weights") == -(-quant.weight_bytes // 2)
    # An 8B shape on 2 GPUs: each holds half of the 4-bit layers and of the 16-bit embeddings and head.
    two = plan(cfg, gpus=2, model="llama-3.1-8b", with_suggestions=False).estimate
    lora = plan(load(data={**data, "adapter": "lora", "load_in_4bit": False, "fsdp_version": 2}), gpus=2,
                model="llama-3.1-8b", with_suggestions=False).estimate
    assert two.settings.quantized == "nf4" and two.settings.fsdp
    assert 0.3 < two.part("weights") / lora.part("weights") < 0.36  # (7.0e9 x 0.52 + 1.05e9 x 2) / (8.0e9 x 2)
    # Each process loads the 16-bit model into host memory before quantizing it.
    assert two.host_at_load >= 2 * 2 * (two.extra["trainable"] + two.extra["frozen"]) > lora.host_at_load / 2
