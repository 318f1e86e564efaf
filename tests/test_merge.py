"""merge-lora: the merged model's logits equal the PEFT adapter model's, shard by shard, with clear errors.

Adapters are made directly with PEFT (as a training run leaves them), with every LoRA tensor perturbed so
the update is far from zero; each parity test also checks that the adapter really changes the logits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tuneforge.errors import ModelError, TuneforgeError

TOL = 1e-4  # relative to the largest logit, fp32


def load(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw).eval()


def save_base(src: Path, dest: Path, *, shard: str | None = None, tie: bool = False) -> Path:
    """Re-save the tiny model (optionally sharded or with tied embeddings) with its tokenizer."""
    from transformers import AutoTokenizer

    model = load(src)
    if tie:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(str(dest), **({"max_shard_size": shard} if shard else {}))
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(dest))
    return dest


def make_adapter(base: Path, out: Path, *, resize_to: int | None = None, seed: int = 0, **lora) -> Path:
    """A PEFT adapter with every trainable tensor perturbed, saved as training would save it."""
    from peft import LoraConfig, get_peft_model

    model = load(base)
    if resize_to:
        model.resize_token_embeddings(resize_to)
    peft_model = get_peft_model(model, LoraConfig(**lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * noise)
            elif "lora_" in name:
                p.add_(0.05 * noise)
            elif p.requires_grad:  # modules_to_save copies
                p.add_(0.02 * noise)
    peft_model.save_pretrained(str(out))
    return out


def adapter_logits(base: Path, adapter: Path, ids, resize_to: int | None = None):
    from peft import PeftModel

    model = load(base)
    if resize_to:
        model.resize_token_embeddings(resize_to)
    with torch.no_grad():
        return PeftModel.from_pretrained(model, str(adapter)).eval()(ids).logits


def logits(path: Path, ids):
    with torch.no_grad():
        return load(path)(ids).logits


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def check_parity(base: Path, adapter: Path, dest: Path, resize_to: int | None = None, vocab: int = 1000):
    from tuneforge.merge import merge_adapter

    report = merge_adapter(base, adapter, dest, tokenizer_dir=adapter)
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = adapter_logits(base, adapter, ids, resize_to)
    merged = logits(dest, ids)
    assert merged.shape == ref.shape
    err = rel_err(merged, ref)
    assert err < TOL, f"merged logits differ from the adapter model's: rel err {err:.2e}"
    # The adapter must matter, or parity proves nothing.
    base_model = load(base)
    if resize_to:
        base_model.resize_token_embeddings(resize_to)
    with torch.no_grad():
        assert rel_err(base_model(ids).logits, ref) > 100 * TOL
    return report


@pytest.fixture(scope="module")
def base(tiny_model_dir) -> Path:
    return tiny_model_dir


def test_plain_lora_parity(base, tmp_path):
    adapter = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    report = check_parity(base, adapter, tmp_path / "merged")
    assert report.merged_tensors == 6 and report.replaced_tensors == 0 and report.vocab_size is None


def test_rslora_and_patterns_parity(base, tmp_path):
    adapter = make_adapter(
        base,
        tmp_path / "ad",
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={"v_proj": 2, "layers.1.mlp.up_proj": 4},
        alpha_pattern={"layers.0.self_attn.q_proj": 3, "o_proj": 40},
    )
    check_parity(base, adapter, tmp_path / "merged")


def test_rslora_scale_is_alpha_over_sqrt_r(base, tmp_path):
    """Closed form on one tensor: W' = W + alpha/sqrt(r) * B @ A (and alpha/r without rsLoRA)."""
    from safetensors.torch import load_file

    from tuneforge.merge import merge_adapter, read_adapter

    for rs in (True, False):
        adapter = make_adapter(base, tmp_path / f"ad{rs}", r=4, lora_alpha=6, use_rslora=rs, target_modules=["q_proj"])
        plan = read_adapter(adapter)
        upd = plan.updates["model.layers.0.self_attn.q_proj.weight"]
        assert upd.scale == pytest.approx(6 / 2 if rs else 6 / 4)
        merge_adapter(base, adapter, tmp_path / f"m{rs}")
        w0 = load_file(str(base / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
        w1 = load_file(str(tmp_path / f"m{rs}" / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
        torch.testing.assert_close(w1, w0 + upd.scale * upd.B @ upd.A, rtol=0, atol=1e-6)


def test_dora_parity_and_matches_peft_merge(base, tmp_path):
    from peft import PeftModel

    adapter = make_adapter(
        base, tmp_path / "ad", r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "up_proj", "embed_tokens"]
    )
    check_parity(base, adapter, tmp_path / "merged")
    # Tensor by tensor against PEFT's own merge_and_unload.
    ref = PeftModel.from_pretrained(load(base), str(adapter)).merge_and_unload().state_dict()
    ours = load(tmp_path / "merged").state_dict()
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"):
        torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=1e-6)


def test_modules_to_save_parity(base, tmp_path):
    adapter = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["k_proj"], modules_to_save=["lm_head"])
    report = check_parity(base, adapter, tmp_path / "merged")
    assert report.replaced_tensors == 1


def test_multi_shard_base_parity(base, tmp_path):
    sharded = save_base(base, tmp_path / "base", shard="200KB")
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) >= 4
    adapter = make_adapter(sharded, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"])
    dest = tmp_path / "merged"
    check_parity(sharded, adapter, dest)
    assert sorted(p.name for p in dest.glob("*.safetensors")) == shards
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    base_index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in load(dest).state_dict().values()
    )


def test_resized_embeddings_update_vocab_size(base, tmp_path):
    adapter = make_adapter(
        base, tmp_path / "ad", resize_to=1040, r=4, lora_alpha=8, target_modules=["q_proj"],
        modules_to_save=["embed_tokens", "lm_head"],
    )
    report = check_parity(base, adapter, tmp_path / "merged", resize_to=1040, vocab=1040)
    assert report.vocab_size == 1040
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["vocab_size"] == 1040


def test_tied_embeddings_stay_tied_without_head_changes(base, tmp_path):
    tied = save_base(base, tmp_path / "base", tie=True)
    adapter = make_adapter(tied, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"])
    report = check_parity(tied, adapter, tmp_path / "merged")
    assert not report.untied
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is True


def test_tied_embeddings_untied_when_lm_head_adapted(base, tmp_path):
    """LoRA on a tied lm_head changes the output projection only; the merge must untie to keep parity."""
    from safetensors import safe_open

    tied = save_base(base, tmp_path / "base", tie=True)
    adapter = make_adapter(tied, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"])
    report = check_parity(tied, adapter, tmp_path / "merged")
    assert report.untied
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in set(f.keys())


def test_tied_base_with_resized_vocab(base, tmp_path):
    """Tokens added on a tied model: embed_tokens and lm_head both saved (resized); parity and new vocab_size."""
    tied = save_base(base, tmp_path / "base", tie=True)
    adapter = make_adapter(
        tied, tmp_path / "ad", resize_to=1032, r=4, lora_alpha=8, target_modules=["v_proj"],
        modules_to_save=["embed_tokens", "lm_head"],
    )
    report = check_parity(tied, adapter, tmp_path / "merged", resize_to=1032, vocab=1032)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert report.vocab_size == config["vocab_size"] == 1032
    assert config["tie_word_embeddings"] is (not report.untied)


def test_output_folder_has_training_tokenizer_and_configs(base, tmp_path):
    from transformers import AutoTokenizer

    from tuneforge.merge import merge_adapter

    adapter = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj"])
    tok = AutoTokenizer.from_pretrained(str(base))
    tok.chat_template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    tok.save_pretrained(str(adapter))
    merge_adapter(base, adapter, tmp_path / "merged", tokenizer_dir=adapter, generation_config_dir=base)
    merged_tok = AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
    assert merged_tok.chat_template == tok.chat_template
    assert (tmp_path / "merged" / "generation_config.json").exists()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()


def test_cli_run_uses_output_dir_and_writes_merged(base, tmp_path, write_config):
    from tuneforge.config import load as load_config
    from tuneforge.merge import run

    out = tmp_path / "out"
    make_adapter(base, out, r=4, lora_alpha=8, target_modules=["v_proj"])
    cfg = load_config(write_config({"adapter": "lora", "lora_target_modules": ["v_proj"]}))
    dest = run(cfg)
    assert dest == out / "merged"
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(3))
    assert rel_err(logits(dest, ids), adapter_logits(base, out, ids)) < TOL


# ---------------------------------------------------------------- errors
def test_missing_adapter_folder_and_config(base, tmp_path):
    from tuneforge.merge import merge_adapter

    with pytest.raises(ModelError, match="adapter folder not found"):
        merge_adapter(base, tmp_path / "nope", tmp_path / "merged")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no adapter_config.json"):
        merge_adapter(base, tmp_path / "empty", tmp_path / "merged")
    with pytest.raises(ModelError, match="already a standalone model"):
        merge_adapter(base, base, tmp_path / "merged")  # a full model folder
    assert not (tmp_path / "merged").exists()


def test_shape_mismatch_names_tensor_and_shapes(base, tmp_path):
    from tuneforge.merge import merge_adapter
    from tuneforge.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", intermediate=128)
    adapter = make_adapter(other, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["up_proj"])
    with pytest.raises(ModelError) as err:
        merge_adapter(base, adapter, tmp_path / "merged")
    msg = str(err.value)
    assert "model.layers.0.mlp.up_proj.weight" in msg and "(256, 64)" in msg and "(128, 64)" in msg
    assert not (tmp_path / "merged").exists()


def test_qlora_needs_dequant(base, tmp_path, write_config):
    from tuneforge.config import load as load_config
    from tuneforge.merge import run

    make_adapter(base, tmp_path / "out", r=4, lora_alpha=8, target_modules=["q_proj"])
    cfg = load_config(write_config({"adapter": "qlora", "load_in_4bit": True, "lora_target_linear": True}))
    with pytest.raises(ModelError, match="--dequant") as err:
        run(cfg)
    assert "quantization error" in str(err.value)
    assert run(cfg, dequant=True) == tmp_path / "out" / "merged"


def test_error_midway_leaves_destination_untouched(base, tmp_path, monkeypatch):
    import tuneforge.merge as merge
    import tuneforge.merge.write as merge_write

    adapter = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj"])
    dest = tmp_path / "merged"
    dest.mkdir()
    (dest / "previous.txt").write_text("old merge")
    (dest / ".tuneforge-files.json").write_text('{"files": ["previous.txt"]}')  # an earlier merge's output

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(merge_write, "copy_side_files", boom)  # fails after every shard was written
    with pytest.raises(RuntimeError, match="disk full"):
        merge.merge_adapter(base, adapter, dest, overwrite=True)
    assert sorted(p.name for p in dest.iterdir()) == [".tuneforge-files.json", "previous.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_unsupported_adapter_kind_is_one_clear_error(base, tmp_path):
    from tuneforge.merge import merge_adapter

    adapter = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["alora_invocation_tokens"] = [5, 6]
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TuneforgeError, match="alora_invocation_tokens"):
        merge_adapter(base, adapter, tmp_path / "merged")


# ---------------------------------------------------------------- bounded memory
PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch, safetensors.torch
    from tuneforge.merge import merge_adapter

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    def growth(fn):
        # Reset the peak-RSS mark (VmHWM) to the current RSS, run, and report how far the peak rose.
        Path("/proc/self/clear_refs").write_text("5")
        before = status("VmRSS")
        result = fn()
        return status("VmHWM") - before, result

    # A first merge pays the lazy imports and allocator set-up; the measured one is the second.
    merge_adapter(sys.argv[1], sys.argv[2], sys.argv[3] + "-warmup")
    merge, _ = growth(lambda: merge_adapter(sys.argv[1], sys.argv[2], sys.argv[3]))
    # Control: holding every shard at once must show up as growth, or the measurement proves nothing.
    shards = sorted(Path(sys.argv[1]).glob("*.safetensors"))
    load_all, held = growth(lambda: [{k: v.clone() for k, v in safetensors.torch.load_file(str(p)).items()} for p in shards])
    print(json.dumps({"merge": merge, "load_all": load_all}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads peak RSS from Linux /proc")
def test_peak_memory_is_about_one_shard(tmp_path):
    """A 50-shard, 65 MB model merges with a peak RSS growth of a few shards, not the model's size."""
    from transformers import AutoModelForCausalLM

    from tuneforge.tiny import build_tiny_tokenizer, tiny_llama_config

    base = tmp_path / "medium"
    tok = build_tiny_tokenizer(base)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(len(tok), hidden=256, layers=16, heads=8, kv_heads=4))
    model.save_pretrained(str(base), max_shard_size="2MB")
    del model
    shards = list(base.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in shards)
    largest = max(p.stat().st_size for p in shards)
    adapter = make_adapter(base, tmp_path / "ad", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    # Large blocks go straight to mmap, so freed memory leaves RSS and the peak is the true working set.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(base), str(adapter), str(tmp_path / "merged")],
        capture_output=True, text=True, env=env, check=True,
    )
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\nmerge peak RSS growth {rss['merge'] / 1e6:.1f} MB (loading all shards: {rss['load_all'] / 1e6:.1f} MB) "
          f"for {len(shards)} shards, {total / 1e6:.1f} MB total, largest shard {largest / 1e6:.1f} MB")
    assert len(shards) >= 16
    assert rss["load_all"] > 0.8 * total  # the measurement sees a whole-model load
    assert rss["merge"] < min(total / 4, 8 * largest), f"merge peak grew by {rss['merge'] / 1e6:.1f} MB for a {total / 1e6:.1f} MB model"


# ---------------------------------------------------------------- the destination: never delete what is not ours
def test_merge_never_touches_a_folder_it_did_not_write(base, tmp_path):
    """An existing non-empty destination is refused (with or without --overwrite) when tuneforge did not
    write it; the user's files are all still there, unchanged."""
    from tuneforge.merge import merge_adapter
    from tuneforge.publish import DestinationError

    adapter = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj"])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(DestinationError, match="mine"):
            merge_adapter(base, adapter, mine, overwrite=overwrite)
        assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
        assert (mine / "notes.txt").read_text() == "keep me"
    with pytest.raises(DestinationError):  # the adapter folder itself
        merge_adapter(base, adapter, adapter, overwrite=True)
    assert (adapter / "adapter_model.safetensors").exists()
    assert not list(tmp_path.glob(".*partial*"))


def test_merge_overwrite_replaces_only_its_own_files(base, tmp_path):
    from tuneforge.merge import merge_adapter
    from tuneforge.publish import DestinationError

    ad1 = make_adapter(base, tmp_path / "ad1", r=4, lora_alpha=8, target_modules=["q_proj"], seed=1)
    ad2 = make_adapter(base, tmp_path / "ad2", r=4, lora_alpha=8, target_modules=["q_proj"], seed=2)
    dest = tmp_path / "merged"
    merge_adapter(base, ad1, dest)
    with pytest.raises(DestinationError, match="--overwrite"):
        merge_adapter(base, ad2, dest)  # a second merge needs the explicit overwrite
    (dest / "eval_notes.md").write_text("user's")
    merge_adapter(base, ad2, dest, overwrite=True)
    assert (dest / "eval_notes.md").read_text() == "user's"
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(3))
    assert rel_err(logits(dest, ids), adapter_logits(base, ad2, ids)) < TOL
    # A file with a name a merge writes, which the manifest does not list as tuneforge's, is refused:
    manifest = json.loads((dest / ".tuneforge-files.json").read_text())
    manifest["files"].remove("tokenizer.json")
    (dest / ".tuneforge-files.json").write_text(json.dumps(manifest))
    (dest / "tokenizer.json").write_text("the user's own file now")
    with pytest.raises(DestinationError, match="tokenizer.json"):
        merge_adapter(base, ad1, dest, overwrite=True)
    assert (dest / "tokenizer.json").read_text() == "the user's own file now"


def test_merge_into_a_file_is_refused(base, tmp_path):
    from tuneforge.merge import merge_adapter
    from tuneforge.publish import DestinationError

    adapter = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj"])
    target = tmp_path / "a-file"
    target.write_text("x")
    with pytest.raises(DestinationError, match="not a folder"):
        merge_adapter(base, adapter, target, overwrite=True)
    assert target.read_text() == "x"


def test_merged_generation_config_stops_at_end_of_turn_and_modes_follow_umask(base, tmp_path, write_config):
    """A chatml-trained adapter: plain `generate` on the merged model must stop at <|im_end|>, not only </s>;
    the merged folder and files get the modes the umask gives (mkdtemp alone makes them private)."""
    import json
    import os

    from transformers import AutoTokenizer

    from tuneforge.chat_templates import template
    from tuneforge.config import load as load_config
    from tuneforge.merge import run

    out = tmp_path / "out"
    make_adapter(base, out, r=4, lora_alpha=8, target_modules=["v_proj"])
    tok = AutoTokenizer.from_pretrained(str(base))
    tok.chat_template = template("chatml")
    tok.save_pretrained(str(out))
    cfg = load_config(write_config({"adapter": "lora", "lora_target_modules": ["v_proj"], "chat_template": "chatml"}))
    old = os.umask(0o022)
    try:
        dest = run(cfg)
    finally:
        os.umask(old)
    gen = json.loads((dest / "generation_config.json").read_text())
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert gen["eos_token_id"] == [tok.eos_token_id, im_end]
    assert dest.stat().st_mode & 0o777 == 0o755
    assert (dest / "model.safetensors").stat().st_mode & 0o777 == 0o644
