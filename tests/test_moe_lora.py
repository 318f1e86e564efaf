"""lora_target_parameters: LoRA on a mixture-of-experts model's expert weights (3-D parameters, which no
Linear module holds), trained, saved, and merged equal to PEFT's merge."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from test_engine_support import losses, make_config, make_rows, one_thread, train  # noqa: F401
from tuneforge.config import ConfigError, load

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def tiny_moe_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A saved tiny Qwen3-MoE (4 experts, 2 per token, random weights) with the tiny tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeConfig

    folder = tmp_path_factory.mktemp("tiny-moe")
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    config = Qwen3MoeConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(folder))
    for item in Path(tiny_model_dir).iterdir():  # the tokenizer files
        if item.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(item, folder / item.name)
    return folder


def test_expert_lora_trains_saves_and_merges_like_peft(tmp_path, tiny_moe_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneforge.merge import run as merge

    cfg = make_config(tmp_path, tiny_moe_dir, make_rows(n=32, seed=1), adapter="lora", lora_r=4, lora_alpha=8,
                      lora_target_parameters=EXPERTS, micro_batch_size=4, max_steps=16, learning_rate=1e-2,
                      save_strategy="no", logging_steps=1)
    result = train(cfg)
    trained = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert trained and all("mlp.experts" in n and ".lora_" in n for n in trained), trained  # the experts only
    seen = losses(result)
    assert sum(list(seen.values())[-4:]) < sum(list(seen.values())[:4]) - 0.1, seen  # it learned

    merged_dir = merge(cfg)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))(ids).logits
        base = AutoModelForCausalLM.from_pretrained(str(tiny_moe_dir))
        expected = PeftModel.from_pretrained(base, str(tmp_path / "out"))(ids).logits
        untouched = AutoModelForCausalLM.from_pretrained(str(tiny_moe_dir))(ids).logits
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    assert (merged - untouched).abs().max() > 1e-3  # the merge changed the experts
    assert (merged_dir / "tokenizer.json").exists() or (merged_dir / "tokenizer_config.json").exists()


def test_expert_lora_refuses_what_peft_cannot_apply_to_parameters():
    base = {"base_model": "x", "adapter": "lora", "lora_target_parameters": EXPERTS}
    load(data=base)  # targets enough on their own
    with pytest.raises(ConfigError, match="lora_dropout.*lora_target_parameters.*set it to 0"):
        load(data={**base, "lora_dropout": 0.05})
    with pytest.raises(ConfigError, match="peft_use_dora.*lora_target_parameters"):
        load(data={**base, "peft_use_dora": True})


def test_the_router_auxiliary_loss_equals_transformers(tiny_moe_dir, tiny_tokenizer):
    """With output_router_logits the SFT loss of a padded micro-batch is transformers' loss + coef x aux."""
    from transformers import AutoModelForCausalLM

    from tuneforge.data.collate import collate
    from tuneforge.methods.sft import SFTObjective

    model = AutoModelForCausalLM.from_pretrained(str(tiny_moe_dir), output_router_logits=True,
                                                 router_aux_loss_coef=0.5)  # large, so that it shows
    rows = [[{"input_ids": [5, 17, 42, 99, 7, 3], "labels": [-100, -100, 42, 99, 7, 3]}],
            [{"input_ids": [8, 9, 10, 11], "labels": [-100, 9, 10, 11]}]]  # padded to 6
    batch = collate(rows, pad_id=0)
    cfg = load(data={"base_model": "x"})
    ours, metrics = SFTObjective(cfg).loss(model, batch, batch["num_target_tokens"])
    labels = torch.tensor([[-100, -100, 42, 99, 7, 3], [-100, 9, 10, 11, -100, -100]])
    theirs = model(input_ids=batch["input_ids"], attention_mask=batch["real_tokens"].long(), labels=labels)
    torch.testing.assert_close(ours, theirs.loss, rtol=1e-5, atol=1e-6)
    assert theirs.aux_loss > 0.1 and abs(metrics["router_aux_loss_sum"] / 7 - theirs.aux_loss.item()) < 1e-5
    model.config.output_router_logits = False  # and without it, the plain cross-entropy
    plain, _ = SFTObjective(cfg).loss(model, batch, batch["num_target_tokens"])
    assert (ours - plain).item() == pytest.approx(0.5 * theirs.aux_loss.item(), rel=1e-4)


def test_the_router_auxiliary_loss_is_refused_where_it_would_be_dropped(tmp_path, tiny_moe_dir):
    """Other objectives compute their losses from hidden states too, without the router's loss."""
    from tuneforge.errors import NotSupportedYet

    pairs = [{"prompt": f"say {i}", "chosen": f"{i}", "rejected": f"{i + 1}"} for i in range(8)]
    cfg = make_config(tmp_path, tiny_moe_dir, pairs, max_steps=1, rl="dpo", model_config={"output_router_logits": True})
    with pytest.raises(NotSupportedYet, match=r"supervised fine-tuning only.*output_router_logits: false"):
        train(cfg)


def test_flops_count_the_experts_a_token_uses(tiny_moe_dir):
    """MFU's model FLOPs: of the fused expert weights (4 experts, 2 per token) half count per token."""
    from transformers import AutoModelForCausalLM

    from tuneforge.engine.metrics import FlopCounter

    model = AutoModelForCausalLM.from_pretrained(str(tiny_moe_dir))
    c = model.config
    attention = 64 * (4 * 16) * 2 + 64 * (2 * 16) * 2  # q, o and k, v projections
    experts = 2 * (64 * 2 * 32 + 32 * 64)  # two experts' gate/up and down
    # (the router, 64 x 4 per token, is not a Linear module in this model and is left out)
    assert FlopCounter(model, adapter=False).n_mm == c.num_hidden_layers * (attention + experts) + c.vocab_size * 64
