"""EBFT strided mode: one optimizer step's time (generation, feature scoring, loss forward + backward), flex
attention's BlockMask against the dense 4-D mask, and their agreement on the same batch.

Workload: a Qwen2.5-0.5B-shaped model with random weights (built from a config, no download; the tiny
byte-level tokenizer, the model's vocabulary stays 151,936), LoRA r=16 on every linear layer (the feature
network is the adapter-disabled model), bf16 weights on the GPU; --docs documents of --doc-len random
tokens per step, ebft defaults (stride 8, context_length 8, generate_max_len 8, 4 samples): a 1024-token
document has 127 blocks, so each sample's sequence is 1024 + 127 x 8 = 2040 tokens.

Variants (same weights, same documents, one after the other): attn_implementation flex_attention (the
BlockMask; GPU only) and sdpa (the dense mask). Reported per variant: the median over the timed steps
(after --warmup) of the rollout seconds (generation + features + rewards), the loss forward + backward
seconds, the whole step, and the peak allocated memory. Then the agreement on one rolled batch: the loss
and the generated tokens' log-probs of flex vs sdpa on the GPU (bf16), and of the GPU flex result vs the
CPU dense-mask result in fp32 (--cpu-check; slow for the 0.5B shape, so a shorter document is used).

    python bench/ebft_strided.py --steps 5 --warmup 2
    python bench/ebft_strided.py --tiny          # CPU smoke check (sdpa only)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_step import SHAPES  # noqa: E402  (the same Qwen2.5-0.5B and tiny shapes as the GRPO step bench)


def build(root: Path, shape: str, impl: str, device: str, dtype: str):
    """(objective, LoRA model on `device`) for one attention implementation; same seed, same weights."""
    import torch
    from transformers import Qwen2Config

    from tuneforge.config import load
    from tuneforge.methods.ebft.strided import StridedEBFTObjective
    from tuneforge.models.adapters import apply_adapter
    from tuneforge.models.load import load_model
    from tuneforge.models.tokenizer import load_tokenizer
    from tuneforge.tiny import build_tiny_tokenizer

    model_dir = root / "model"
    if not model_dir.exists():
        build_tiny_tokenizer(model_dir)
        Qwen2Config(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(model_dir)
    (root / "docs.jsonl").write_text(json.dumps({"text": "placeholder"}) + "\n")
    cfg = load(data={"base_model": str(model_dir), "reinit_weights": True, "torch_dtype": dtype, "seed": 0,
                     "attn_implementation": impl, "rl": "ebft", "ebft": {"mode": "strided"},
                     "adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_target_linear": True,
                     "datasets": [{"path": str(root / "docs.jsonl"), "type": "completion"}],
                     "output_dir": str(root / "out")})
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = apply_adapter(cfg, load_model(cfg, tokenizer)).to(device)
    objective = StridedEBFTObjective(cfg)
    objective.tokenizer = objective.reference.tokenizer = tokenizer
    return objective, model


def documents(n: int, length: int, vocab: int, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(5, vocab, (length,), generator=g).tolist() for _ in range(n)]
    return {"documents": [{"input_ids": d, "labels": d, "offset": 8} for d in docs], "num_target_tokens": 0}


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_variant(objective, model, batch: dict, steps: int, warmup: int) -> dict:
    import torch

    rollout, train = [], []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        rolled = objective.rollout_step(model, [batch])
        sync()
        t1 = time.perf_counter()
        for b in rolled:
            loss, _ = objective.loss(model, b, objective.num_items(b))
            loss.backward()
        model.zero_grad(set_to_none=True)
        sync()
        if i >= warmup:
            rollout.append(t1 - t0)
            train.append(time.perf_counter() - t1)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return {"rollout_s": statistics.median(rollout), "loss_fwd_bwd_s": statistics.median(train),
            "step_s": statistics.median(r + t for r, t in zip(rollout, train, strict=True)), "peak_gib": peak,
            "gen_tokens": rolled[0]["gen_tokens"], "seq_tokens": rolled[0]["num_tokens"]}


def logps_of(objective, model, rolled: dict):
    """(loss, the generated tokens' log-probs) of a rolled batch, without gradients."""
    import torch

    from tuneforge.methods.ebft.strided_rollout import hidden_states
    from tuneforge.models.logprobs import token_logps
    from tuneforge.models.losses import LogitHead

    with torch.no_grad():
        loss = objective.loss(model, rolled, objective.num_items(rolled))[0].float().item()
        doc = rolled["docs"][0]
        lay, tokens = doc["layout"], doc["tokens"]
        hidden = hidden_states(model, lay, tokens)
        pred = hidden[:, lay.predictors.to(tokens.device).flatten()].flatten(0, 1)
        logps = token_logps(LogitHead(model), pred, tokens[:, lay.slots.to(tokens.device).flatten()].flatten())
    return loss, logps.float().cpu()


def on(rolled: dict, device: str) -> dict:
    """The rolled batch with its token, advantage and CE-target tensors on `device`."""
    moved = ("tokens", "advantages", "ce_targets")
    return {**rolled, "docs": [{k: v.to(device) if k in moved else v for k, v in d.items()} for d in rolled["docs"]]}


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--docs", type=int, default=2)
    p.add_argument("--doc-len", type=int, default=1024)
    p.add_argument("--tiny", action="store_true", help="tiny model, short documents (CPU smoke check)")
    p.add_argument("--cpu-check", action="store_true", help="also compare with the CPU fp32 dense-mask result")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    shape = "tiny" if args.tiny or not cuda else "qwen2.5-0.5b"
    device, dtype = ("cuda", "bfloat16") if cuda else ("cpu", "float32")
    doc_len = 64 if args.tiny else args.doc_len
    impls = ["flex_attention", "sdpa"] if cuda else ["sdpa"]
    results, rolled = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = {}
        for impl in impls:
            objective, model = build(root, shape, impl, device, dtype)
            batch = documents(args.docs, doc_len, SHAPES[shape]["vocab_size"])
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            results[impl] = time_variant(objective, model, batch, args.steps, args.warmup)
            print(impl, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results[impl].items()}))
            models[impl] = (objective, model)
        objective, model = models[impls[0]]
        torch.manual_seed(1)
        rolled = objective.rollout_step(model, [documents(1, min(doc_len, 256), SHAPES[shape]["vocab_size"], 1)])[0]
        ref_loss, ref_logps = logps_of(objective, model, rolled)
        agreement = {}
        for impl in impls[1:]:
            loss, logps = logps_of(*models[impl], rolled)
            agreement[f"{impls[0]}_vs_{impl}"] = {"loss": [ref_loss, loss],
                                                  "max_abs_logp_diff": float((logps - ref_logps).abs().max())}
        if args.cpu_check and cuda:
            cpu_obj, cpu_model = build(root, shape, "sdpa", "cpu", "float32")
            # The same weights as the GPU model (a random init on another device or in another dtype draws
            # other values), widened to fp32: the comparison is of the masks and kernels, not of two inits.
            cpu_model.load_state_dict({k: v.float().cpu() for k, v in model.state_dict().items()})
            loss, logps = logps_of(cpu_obj, cpu_model, on(rolled, "cpu"))
            agreement[f"{impls[0]}_vs_cpu_fp32_dense"] = {"loss": [ref_loss, loss],
                                                         "max_abs_logp_diff": float((logps - ref_logps).abs().max()),
                                                         "mean_abs_logp_diff": float((logps - ref_logps).abs().mean())}
        print("agreement", json.dumps(agreement))
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    print(json.dumps({"device": device_name, "shape": shape, "doc_len": doc_len, "docs": args.docs,
                      "results": results}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
