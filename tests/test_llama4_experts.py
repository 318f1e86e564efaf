"""llama4_linearized_experts: per-expert nn.Linear modules with the fused experts' function, LoRA on them, and
outputs in transformers' fused layout."""

from __future__ import annotations

import pytest
import torch

from test_engine_support import make_config, make_rows, one_thread, train  # noqa: F401
from tuneforge.errors import TuneforgeError
from tuneforge.models.llama4_experts import LinearizedExperts, fuse, linearize

EXPERTS = r".*feed_forward\.experts\.\d+\.(gate_proj|up_proj|down_proj)"


def _config(vocab: int = 128):
    from transformers import Llama4TextConfig

    return Llama4TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=16, intermediate_size_mlp=48,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_local_experts=3, num_experts_per_tok=1, interleave_moe_layer_step=1,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def llama4_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama 4 text model saved with the tiny tokenizer (loads with from_pretrained)."""
    from transformers import Llama4ForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama4")
    tiny_tokenizer.save_pretrained(str(path))
    torch.manual_seed(0)
    Llama4ForCausalLM(_config(len(tiny_tokenizer))).save_pretrained(str(path))
    return path


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_same_function_and_exact_round_trip():
    from transformers import Llama4ForCausalLM

    torch.manual_seed(0)
    model = Llama4ForCausalLM(_config()).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    ref = _logits(model, ids)
    assert linearize(model) == 2
    names = {n for n, _ in model.named_parameters()}
    assert "model.layers.1.feed_forward.experts.2.down_proj.weight" in names
    assert not any("gate_up_proj" in n for n in names)
    assert (_logits(model, ids) - ref).abs().max().item() <= 1e-6
    assert fuse(model) == 2
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_linearize_refuses_a_model_without_llama4_experts(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    with pytest.raises(TuneforgeError, match="llama4_linearized_experts: the model \\(LlamaForCausalLM\\)"):
        linearize(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)))


def test_lora_on_experts_trains_and_the_merged_output_reloads_with_transformers(tmp_path, llama4_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg = make_config(tmp_path, llama4_dir, make_rows(n=8, seed=1), llama4_linearized_experts=True, adapter="lora",
                      lora_r=4, lora_alpha=8, lora_target_modules=EXPERTS, max_steps=3, learning_rate=1e-2,
                      merge_lora=True)
    train(cfg)
    out = tmp_path / "out"
    adapter = load_file(str(out / "adapter_model.safetensors"))
    trained = [k for k in adapter if ".experts.2.down_proj.lora_B" in k]
    assert trained and all(adapter[k].abs().max() > 0 for k in trained)  # the experts' adapters learned
    # The adapter on a linearized base == the merged, fused model as transformers loads it
    base = AutoModelForCausalLM.from_pretrained(str(llama4_dir))
    linearize(base)
    assert isinstance(base.model.layers[0].feed_forward.experts, LinearizedExperts)
    with_adapter = PeftModel.from_pretrained(base, str(out)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
    assert any("gate_up_proj" in n for n, _ in merged.named_parameters())
    ids = torch.randint(3, 900, (2, 12), generator=torch.Generator().manual_seed(2))
    a, b = _logits(with_adapter, ids), _logits(merged, ids)
    assert (a - b).abs().max().item() <= 1e-5
    original = AutoModelForCausalLM.from_pretrained(str(llama4_dir)).eval()
    assert (_logits(original, ids) - b).abs().max().item() > 1e-4  # the merge changed the model
