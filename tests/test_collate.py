"""The batch contract of `collate`: positions, per-document targets, cu_seqlens, padding."""

from __future__ import annotations

import random

import pytest
import torch

from tuneforge.data.batches import gather, plan_epoch
from tuneforge.data.collate import collate

IGN = -100
PAD = 0


def _doc(rng: random.Random, base: int, n: int, prompt: int) -> dict:
    # Each document draws its tokens from its own id range, so a target leaking from a neighbour is visible.
    ids = [base + rng.randint(0, 99) for _ in range(n)]
    prompt = min(prompt, n)
    return {"input_ids": ids, "labels": [IGN] * prompt + ids[prompt:]}


def _docs(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [_doc(rng, 100 * (k + 1), rng.randint(1, 40), rng.randint(0, 5)) for k in range(count)]


def _check_row(batch, b: int, row: list[dict], doc_offset: int):
    """Check row b of the batch against its documents; returns the number of documents."""
    at = 0
    cu = batch["cu_seqlens"].tolist()
    for k, doc in enumerate(row):
        n = len(doc["input_ids"])
        seg = slice(at, at + n)
        assert batch["input_ids"][b, seg].tolist() == doc["input_ids"]
        assert batch["position_ids"][b, seg].tolist() == list(range(n)), "positions restart per document"
        expected = doc["labels"][1:] + [IGN]  # the next token of the same document; none after the last
        assert batch["target_ids"][b, seg].tolist() == expected
        own = set(doc["labels"]) | {IGN}
        assert set(batch["target_ids"][b, seg].tolist()) <= own, "a target came from another document"
        if k + 1 < len(row):
            assert batch["target_ids"][b, at + n - 1].item() == IGN
            assert batch["target_ids"][b, at + n - 1].item() != row[k + 1]["input_ids"][0]
        start, end = cu[doc_offset + k], cu[doc_offset + k + 1]
        assert start == b * batch["input_ids"].shape[1] + at
        if k + 1 < len(row):
            assert end - start == n
        at += n
    width = batch["input_ids"].shape[1]
    assert batch["input_ids"][b, at:].tolist() == [PAD] * (width - at)
    assert batch["target_ids"][b, at:].tolist() == [IGN] * (width - at)
    # Padding extends the last document (positions continue), so the row ends exactly at a boundary.
    last_n = len(row[-1]["input_ids"])
    assert batch["position_ids"][b, at - last_n :].tolist() == list(range(last_n + width - at))
    assert cu[doc_offset + len(row)] == (b + 1) * width
    return len(row)


@pytest.mark.parametrize("pad_to,multiple_of", [(None, None), (128, None), (None, 16)])
def test_packed_rows_follow_the_batch_contract(pad_to, multiple_of):
    docs = _docs(30, seed=1)
    rows = [docs[0:7], docs[7:8], docs[8:20], docs[20:30]]
    batch = collate(rows, pad_id=PAD, pad_to=pad_to, multiple_of=multiple_of)
    longest_row = max(sum(len(d["input_ids"]) for d in r) for r in rows)
    width = batch["input_ids"].shape[1]
    assert width >= longest_row and (pad_to is None or width >= pad_to)
    if multiple_of:
        assert width % multiple_of == 0 and width - longest_row < multiple_of
    if pad_to is None and multiple_of is None:
        assert width == longest_row
    offset = 0
    for b, row in enumerate(rows):
        offset += _check_row(batch, b, row, offset)
    cu = batch["cu_seqlens"]
    assert cu.dtype == torch.int32 and len(cu) == len(docs) + 1 and cu[0] == 0
    assert batch["max_seqlen"] == int((cu[1:] - cu[:-1]).max())
    trained = sum(sum(t != IGN for t in d["labels"][1:]) for d in docs)
    assert batch["num_target_tokens"] == trained == int((batch["target_ids"] != IGN).sum())


def test_single_document_rows_shift_like_transformers(tiny_model_dir):
    """Our target_ids give the same loss as the model's own label shifting on the same rows."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    rng = random.Random(2)
    docs = [_doc(rng, 10, n, p) for n, p in ((12, 3), (12, 0), (12, 7))]
    batch = collate([[d] for d in docs], pad_id=PAD)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], labels=torch.tensor([d["labels"] for d in docs]))
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    ours = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), batch["target_ids"].flatten(), ignore_index=IGN, reduction="sum"
    ) / batch["num_target_tokens"]
    torch.testing.assert_close(ours, out.loss, rtol=1e-5, atol=1e-6)


def test_plan_gather_collate_sees_every_document_once_per_epoch():
    import datasets

    docs = _docs(200, seed=3)
    ds = datasets.Dataset.from_list([{**d, "length": len(d["input_ids"])} for d in docs])
    lengths = ds["length"]
    seen = []
    plan = plan_epoch(lengths, epoch=0, seed=0, micro_batch_size=3, packed=True, capacity=64, max_docs=8)
    for mb in plan:
        rows = gather(ds, mb)
        assert [[d["input_ids"] for d in r] for r in rows] == [[docs[i]["input_ids"] for i in r] for r in mb]
        batch = collate(rows, pad_id=PAD, pad_to=64)
        assert batch["input_ids"].shape[1] == 64
        offset = 0
        for b, row in enumerate(rows):
            offset += _check_row(batch, b, row, offset)
        seen.extend(i for r in mb for i in r)
    assert sorted(seen) == list(range(len(docs)))
