"""A packed row's logits equal the logits of each document run alone (no attention across documents).

Note: transformers only derives per-document masks from position_ids when no KV cache is created,
so training forwards must pass use_cache=False.
"""

from __future__ import annotations

import pytest
import torch

from tuneforge.data.collate import collate


def _docs(vocab: int, lengths: list[int], seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, vocab, (n,), generator=g).tolist()} for n in lengths]


def _load(model_dir, attn: str, device: str = "cpu", dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation=attn, dtype=dtype)
    return model.to(device).eval()


def _alone(model, docs, device):
    out = []
    for d in docs:
        ids = torch.tensor([d["input_ids"]], device=device)
        out.append(model(input_ids=ids).logits[0].float())
    return torch.cat(out)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_matches_documents_alone_cpu(tiny_model_dir, attn):
    model = _load(tiny_model_dir, attn)
    docs = _docs(model.config.vocab_size, [7, 3, 12, 5])
    batch = collate([docs], pad_id=0, pad_to=32)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = _alone(model, docs, "cpu")
    n = alone.shape[0]
    torch.testing.assert_close(packed[:n], alone, rtol=1e-5, atol=1e-5)


def test_unpacked_padding_does_not_change_real_tokens(tiny_model_dir):
    model = _load(tiny_model_dir, "sdpa")
    docs = _docs(model.config.vocab_size, [9, 4], seed=1)
    batch = collate([[docs[0]], [docs[1]]], pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        short_alone = _alone(model, [docs[1]], "cpu")
    torch.testing.assert_close(logits[1, :4], short_alone, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_kernel_matches_documents_alone_cuda(tiny_model_dir, dtype):
    from tuneforge.models import attention

    if not attention.available():
        pytest.skip("torch.nn.attention.varlen is not available")
    name = attention.register()
    model = _load(tiny_model_dir, name, "cuda", dtype)
    ref = _load(tiny_model_dir, "sdpa", "cuda", dtype)
    docs = _docs(model.config.vocab_size, [37, 5, 120, 64, 1])
    batch = collate([docs[:3], docs[3:]], pad_id=0, pad_to=192)
    ids = batch["input_ids"].cuda()
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=batch["position_ids"].cuda(), use_cache=False,
                       **attention.varlen_kwargs({**batch, "input_ids": ids})).logits.float()
        alone = _alone(ref, docs, "cuda")
    flat = torch.cat([packed[0, :162], packed[1, :65]])
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(flat, alone, rtol=tol, atol=tol)
