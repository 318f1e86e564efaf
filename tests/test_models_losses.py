"""The SFT loss: chunked == full-logits reference, packed == unpacked, and the normalisation."""

from __future__ import annotations

import pytest
import torch

from test_engine_support import one_thread  # noqa: F401
from tuneforge.data.collate import collate
from tuneforge.models.losses import IGNORE_INDEX, causal_lm_token_loss, chunked_cross_entropy


def reference_token_loss(model, batch: dict) -> torch.Tensor:
    """The same sum computed the plain way, from the full logits of model(...)."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), batch["target_ids"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="sdpa")
    return m.train()


def _docs(seed: int = 0, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    docs = []
    for i in range(n):
        length = 5 + 4 * i
        ids = torch.randint(10, 900, (length,), generator=g).tolist()
        docs.append({"input_ids": ids, "labels": [-100] * (1 + i) + ids[1 + i :]})
    return docs


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_chunked_loss_matches_full_logits_reference(model):
    batch = collate([[d] for d in _docs()], pad_id=0)
    ours = causal_lm_token_loss(model, batch, chunk=7)  # several chunks
    ref = reference_token_loss(model, batch)
    assert ours.num_tokens == batch["num_target_tokens"] > 0
    assert torch.allclose(ours.loss_sum, ref, rtol=1e-6, atol=1e-5)
    g_ours, g_ref = _grads(model, ours.loss_sum), _grads(model, ref)
    for name in g_ref:
        assert torch.allclose(g_ours[name], g_ref[name], atol=1e-6), name


def test_chunked_cross_entropy_closed_form():
    class Head:  # identity head: logits are the hidden states themselves
        vocab = 3

        def __call__(self, h):
            return h.float()

    hidden = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    targets = torch.tensor([2, 0])
    expected = torch.log(torch.tensor(3.0)) + (torch.log(torch.e + torch.tensor(2.0)) - 1.0)
    assert torch.allclose(chunked_cross_entropy(Head(), hidden, targets, chunk=1), expected)


def test_packed_and_unpacked_batches_give_the_same_loss_and_gradient(model):
    docs = _docs(seed=1)
    unpacked = collate([[d] for d in docs], pad_id=0)
    packed = collate([docs[:3], docs[3:]], pad_id=0)  # two rows: three documents packed, then one
    assert packed["input_ids"].shape[0] == 2 and packed["num_target_tokens"] == unpacked["num_target_tokens"]
    a = causal_lm_token_loss(model, unpacked).loss_sum
    b = causal_lm_token_loss(model, packed).loss_sum
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-5)
    ga, gb = _grads(model, a), _grads(model, b)
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-6), name


def test_packing_without_position_restart_would_leak(model):
    """The test above can fail: the same packed row with plain 0..T-1 positions gives another loss."""
    docs = _docs(seed=1)
    packed = collate([docs[:3], docs[3:]], pad_id=0)
    leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"]))
    with torch.no_grad():
        good = causal_lm_token_loss(model, packed).loss_sum
        bad = causal_lm_token_loss(model, leaky).loss_sum
    assert abs(float(good - bad)) > 1e-3


def test_step_normalisation_makes_micro_batch_split_irrelevant(model):
    """sum / (tokens of the whole step) per micro-batch == one big batch; a mean of means is not."""
    docs = _docs(seed=2)
    whole = collate([[d] for d in docs], pad_id=0)
    parts = [collate([[d]], pad_id=0) for d in docs]
    n = whole["num_target_tokens"]
    g_whole = _grads(model, causal_lm_token_loss(model, whole).loss_sum / n)
    total = sum(causal_lm_token_loss(model, p).loss_sum / n for p in parts)
    g_split = _grads(model, total)
    mean_of_means = sum(causal_lm_token_loss(model, p).loss_sum / p["num_target_tokens"] for p in parts) / len(parts)
    g_naive = _grads(model, mean_of_means)
    worst = max((g_whole[k] - g_split[k]).abs().max().item() for k in g_whole)
    naive = max((g_whole[k] - g_naive[k]).abs().max().item() for k in g_whole)
    assert worst < 1e-6
    assert naive > 100 * max(worst, 1e-9)


def test_logit_transforms_match_the_model_forward():
    """Architectures that post-process logits (Gemma 2 soft-capping) get the same loss as their forward."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    cfg = Gemma2Config(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=3.0,
                       attn_logit_softcapping=None, sliding_window=16)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        m.lm_head.weight.mul_(20)  # make the soft-cap matter
    batch = collate([[{"input_ids": list(range(3, 15)), "labels": list(range(3, 15))}]], pad_id=0)
    ours = causal_lm_token_loss(m, batch).loss_sum
    assert torch.allclose(ours, reference_token_loss(m, batch), rtol=1e-5)


@pytest.mark.parametrize("weight_grad", [True, False])
def test_fused_linear_cross_entropy_equals_the_plain_head(weight_grad):
    """LinearCrossEntropy (gradients in forward) == logits -> F.cross_entropy, loss and both gradients."""
    from tuneforge.models.losses import LinearCrossEntropy

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=weight_grad)
    targets = torch.randint(0, 50, (23,), generator=g)
    fused = LinearCrossEntropy.apply(hidden, weight, targets, 5) * 0.37  # upstream gradient != 1
    gh, *gw = torch.autograd.grad(fused, [hidden, weight] if weight_grad else [hidden])
    plain = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum") * 0.37
    rh, *rw = torch.autograd.grad(plain, [hidden, weight] if weight_grad else [hidden])
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(gh, rh)
    for a, b in zip(gw, rw, strict=True):
        torch.testing.assert_close(a, b)


def test_fused_linear_cross_entropy_under_bf16_autocast():
    """Under autocast the matmuls run in bf16 like nn.Linear would: same loss and gradients within bf16 error."""
    from tuneforge.models.losses import LinearCrossEntropy

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(40, 32, generator=g, requires_grad=True)
    weight = (torch.randn(64, 32, generator=g) * 0.2).requires_grad_()
    targets = torch.randint(0, 64, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = LinearCrossEntropy.apply(hidden, weight, targets, 16)
        plain = torch.nn.functional.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum")
    assert fused.dtype == torch.float32 and weight.dtype == torch.float32
    f_grads = torch.autograd.grad(fused, [hidden, weight])
    p_grads = torch.autograd.grad(plain, [hidden, weight])
    torch.testing.assert_close(fused, plain, rtol=2e-2, atol=0.5)
    for a, b in zip(f_grads, p_grads, strict=True):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)


def _accumulated(device: str, chunks: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(accumulate_matmul's sum, the two-pass sum, the fp64 sum) of `chunks` 16-bit products into fp32."""
    from tuneforge.models.losses import accumulate_matmul

    gen = torch.Generator().manual_seed(0)
    parts = [(torch.randn(256, 96, generator=gen).bfloat16().to(device),
              torch.randn(96, 128, generator=gen).bfloat16().to(device)) for _ in range(chunks)]
    fused = torch.zeros(256, 128, device=device)
    two_pass = torch.zeros(256, 128, device=device)
    exact = torch.zeros(256, 128, dtype=torch.float64)
    for a, b in parts:
        accumulate_matmul(fused, a, b)
        two_pass += a @ b
        exact += a.double().cpu() @ b.double().cpu()
    return fused.cpu(), two_pass.cpu(), exact


def test_accumulate_matmul_adds_the_product_on_the_cpu():
    fused, two_pass, exact = _accumulated("cpu")
    assert torch.equal(fused, two_pass)  # the CPU keeps the two-pass form
    torch.testing.assert_close(fused.double(), exact, rtol=0, atol=0.5)


@pytest.mark.gpu
def test_accumulate_matmul_is_one_fp32_gemm_on_cuda():
    from tuneforge.models import losses

    fused, two_pass, exact = _accumulated("cuda")
    if not losses._fp32_out_gemm.get(torch.device("cuda", torch.cuda.current_device())):
        pytest.skip("this torch's addmm has no out_dtype: the two-pass form is used")
    # fp32 accumulation inside the GEMM: an order closer to the exact sum than bf16 products summed in fp32
    assert (fused.double() - exact).abs().max() < 1e-3
    assert (two_pass.double() - exact).abs().max() > 10 * (fused.double() - exact).abs().max()
