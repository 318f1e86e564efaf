"""Supervised fine-tuning: next-token cross-entropy over the trained tokens.

Normalisation: the loss of a micro-batch is its *sum* of token losses divided by the trained tokens of
the whole optimizer step (all micro-batches, all ranks). So `micro_batch_size: 4` with one micro-batch
and `micro_batch_size: 1` with four give the same gradient, and packed and unpacked batches of the
same rows give the same loss.

Evaluation also reports `accuracy`: the share of documents whose trained tokens are all the argmax
prediction given the true prefix. By induction over positions this is exactly "greedy decoding from
the prompt reproduces the reference answer" (for multi-turn rows: every trained turn, given the true
history), and it costs one forward pass instead of a generate() loop.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from tuneforge.models import eaft
from tuneforge.models.losses import causal_lm_token_loss, chunked_predictions
from tuneforge.rollout.base import SamplingParams

from .base import Batch, Objective

GENERATION_BATCH = 64  # documents continued at once (bounds the KV cache of samples and do_causal_lm_eval)


def prompt_and_reference(doc: dict, prompt_ratio: float) -> tuple[int, int]:
    """(cut, end): a document's prompt is input_ids[:cut], its reference input_ids[cut:end]. The prompt is
    what comes before the first trained token, or the first `prompt_ratio` of a document trained
    throughout; the reference ends at the last trained token."""
    ids, labels = doc["input_ids"], doc["labels"]
    trained = [i for i, label in enumerate(labels) if label != -100] or [len(ids) - 1]
    return trained[0] or max(1, int(len(ids) * prompt_ratio)), trained[-1] + 1


class SFTObjective(Objective):
    name = "sft"

    def loss(self, model, batch: Batch, num_items: int) -> tuple[torch.Tensor, dict[str, float]]:
        token_loss = causal_lm_token_loss(model, batch, loss_fn=eaft.token_loss_fn(self.cfg))  # EAFT: weighted
        loss = token_loss.loss_sum / max(num_items, 1)
        metrics = {"loss_sum": float(token_loss.loss_sum.detach()), "num_tokens": float(token_loss.num_tokens)}
        if token_loss.router is not None:
            # A micro-batch's router loss weighs by its share of the step's trained tokens: one micro-batch
            # gives transformers' loss + coef x aux exactly, several a token-weighted mean of theirs.
            share = token_loss.num_tokens / max(num_items, 1)
            loss = loss + token_loss.router_coef * share * token_loss.router
            metrics["router_aux_loss_sum"] = float(token_loss.router.detach()) * token_loss.num_tokens
        return loss, metrics

    def summarize(self, sums: dict[str, float], num_items: int) -> dict[str, float]:
        logged = {"loss": sums["loss_sum"] / max(num_items, 1)}  # the cross-entropy alone
        if "router_aux_loss_sum" in sums:
            logged["router_aux_loss"] = sums["router_aux_loss_sum"] / max(num_items, 1)
        return logged

    @torch.no_grad()
    def evaluate(self, model, batch: Batch) -> dict[str, float]:
        token_loss = causal_lm_token_loss(model, batch)
        targets = batch["target_ids"][token_loss.mask]
        correct = chunked_predictions(token_loss.head, token_loss.hidden) == targets
        docs, exact = exact_match_documents(batch["position_ids"], token_loss.mask, correct)
        return {
            "loss_sum": float(token_loss.loss_sum),
            "num_tokens": float(token_loss.num_tokens),
            "correct_tokens": float(correct.sum()),
            "documents": float(docs),
            "exact_documents": float(exact),
        }

    @torch.no_grad()
    def samples(self, model, tokenizer, documents: list[dict]) -> list[dict[str, str]]:
        """Each document continued from its prompt (see `continue_documents`) with the generation_* sampling
        settings, next to its reference: what the model says, in words."""
        cfg = self.cfg
        sampled = cfg.generation_do_sample and cfg.generation_temperature > 0
        params = SamplingParams(temperature=cfg.generation_temperature if sampled else 0.0,
                                top_p=cfg.generation_top_p if sampled and cfg.generation_top_p else 1.0,
                                top_k=cfg.generation_top_k if sampled and cfg.generation_top_k else 0,
                                max_tokens=cfg.generation_max_new_tokens)
        return self.continue_documents(model, tokenizer, documents, params)

    def predictions(self, model, tokenizer, documents: list[dict]) -> list[tuple[str, str]]:
        """do_causal_lm_eval: (greedy completion, reference) texts of each document, special tokens left out."""
        params = SamplingParams(temperature=0.0, max_tokens=self.cfg.generation_max_new_tokens)
        shown = self.continue_documents(model, tokenizer, documents, params, skip_special_tokens=True)
        return [(s["completion"], s["reference"]) for s in shown]

    def continue_documents(self, model, tokenizer, documents: list[dict], params: SamplingParams,
                           skip_special_tokens: bool = False) -> list[dict[str, str]]:
        """{prompt, completion, reference} texts: each document continued by `model` from its prompt (the
        tokens before its first trained one; the first generation_prompt_ratio of a document trained
        throughout) until an end-of-turn token; its reference runs from there to its last trained token.

        Generated in batches by the embedded rollout engine (static KV cache, CUDA graphs on a GPU), the
        prompts sorted by length so that a batch pads little."""
        from tuneforge.rollout.base import end_of_turn_ids
        from tuneforge.rollout.embedded import EmbeddedSampler

        stops = end_of_turn_ids(tokenizer)  # EOS and the chat template's end-of-turn token
        params = replace(params, stop_token_ids=tuple(stops))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops or [0])[0]
        cuts = [prompt_and_reference(doc, self.cfg.generation_prompt_ratio) for doc in documents]
        order = sorted(range(len(documents)), key=lambda i: cuts[i][0])
        sampler = EmbeddedSampler(model, pad, max_batch=GENERATION_BATCH)
        rollout = sampler.generate([documents[i]["input_ids"][: cuts[i][0]] for i in order], 1, params)
        completions = dict(zip(order, rollout.completion_ids, strict=True))

        def text(ids):
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

        return [{"prompt": text(doc["input_ids"][:cut]), "completion": text(completions[i]),
                 "reference": text(doc["input_ids"][cut:end])}
                for i, (doc, (cut, end)) in enumerate(zip(documents, cuts, strict=True))]

    def summarize_eval(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["num_tokens"], 1.0)
        loss = sums["loss_sum"] / n
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "token_accuracy": sums["correct_tokens"] / n,
            "accuracy": sums["exact_documents"] / max(sums["documents"], 1.0),
            "tokens": sums["num_tokens"],
        }


def exact_match_documents(position_ids: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor) -> tuple[int, int]:
    """(documents with trained tokens, documents whose trained tokens are all predicted correctly).

    Documents start where position_ids is 0 (collate restarts positions per document; padding continues
    the last document's positions, and carries no trained tokens).
    """
    starts = (position_ids == 0).flatten()
    doc = torch.cumsum(starts.long(), 0) - 1
    doc_of_trained = doc[mask.flatten()]
    n_docs = int(doc[-1]) + 1 if doc.numel() else 0
    trained = torch.zeros(n_docs, dtype=torch.long, device=doc.device)
    wrong = torch.zeros(n_docs, dtype=torch.long, device=doc.device)
    trained.index_add_(0, doc_of_trained, torch.ones_like(doc_of_trained))
    wrong.index_add_(0, doc_of_trained, (~correct).long())
    has = trained > 0
    return int(has.sum()), int((has & (wrong == 0)).sum())
