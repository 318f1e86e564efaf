"""GPU smoke run of `quantize_moe_experts` through `tuneforge train`: a small random Qwen3-MoE saved locally,
QLoRA (load_in_4bit, when bitsandbytes is installed; else LoRA on the 16-bit base) with NF4 experts, bf16,
a few steps on synthetic rows. Prints the losses, the stored dtype of the experts, the GPU peak memory, and
checks that the loss fell.

    python bench/moe_quant_train_smoke.py [--steps 30] [--no-4bit] [--gradient-checkpointing] [--compile]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import tempfile
from pathlib import Path


def make_model(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from tuneforge.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer(folder)
    config = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1024, moe_intermediate_size=384,
                            num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                            num_experts=32, num_experts_per_tok=4, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(str(folder))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--no-4bit", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch_compile: true")
    args = parser.parse_args()
    import torch

    from tuneforge.config import load
    from tuneforge.engine.run import train

    four_bit = not args.no_4bit and importlib.util.find_spec("bitsandbytes") is not None
    work = Path(tempfile.mkdtemp(prefix="moe-quant-smoke-"))
    make_model(work / "model")
    rng = random.Random(0)
    rows = [{"input_ids": ids, "labels": [-100] * 3 + ids[3:]}
            for ids in ([rng.randint(10, 400) for _ in range(rng.randint(32, 128))] for _ in range(256))]
    (work / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    keys = {"base_model": str(work / "model"), "output_dir": str(work / "out"),
            "datasets": [{"path": str(work / "data.jsonl")}], "sequence_len": 256, "micro_batch_size": 8,
            "max_steps": args.steps, "learning_rate": 2e-3, "logging_steps": 1, "save_strategy": "no", "bf16": True,
            "adapter": "qlora" if four_bit else "lora", "load_in_4bit": four_bit, "lora_r": 16, "lora_alpha": 32,
            "lora_target_linear": True, "quantize_moe_experts": True,
            "gradient_checkpointing": args.gradient_checkpointing, "torch_compile": args.compile}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = train(load(data=keys), None, show_progress=False)
    seen = [r["loss"] for r in result.history if r["type"] == "train"]
    stored = {p.dtype for n, p in result.model.named_parameters() if "experts" in n}
    print(json.dumps({"four_bit": four_bit, "gradient_checkpointing": args.gradient_checkpointing,
                      "expert_storage_dtypes": sorted(str(d) for d in stored), "first_losses": seen[:3],
                      "last_losses": seen[-3:], "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None}))
    assert stored == {torch.uint8}, stored
    assert sum(seen[-3:]) < sum(seen[:3]) - 0.1, seen
    print("OK")


if __name__ == "__main__":
    main()
