"""EBFT strided mode (`rl: ebft`, `ebft.mode: strided`): feature matching on unstructured text.

Each document x[0:S] gets blocks of `generate_max_len` tokens at anchors every `stride` tokens from the
anchor offset (blocks.py); the policy samples every block `n_samples_per_prompt` times, continuing the
document from the block's anchor; the frozen feature network scores each sampled block against the
document's own tokens there (eq. 7 per block, strided_rollout.py). The loss is plain REINFORCE (no
ratio, no clipping) plus an optional cross-entropy on the ground-truth tokens:

    L = rl_coef * mean_{generated tokens} (-log pi(token) * A_block) + ce_coef * mean_{CE tokens} NLL

CE tokens: the trained labels of the document (the completion of prompt/completion rows, every
token but the first of raw text). The means are over the whole optimizer step. Step contract
(docs/objectives.md): the items are the generated tokens of the step, N_gen; a micro-batch returns
(rl_coef * its sum of -log pi * A + ce_coef * (N_gen / N_ce) * its sum of NLL) / N_gen, with N_ce the
step's CE tokens, counted (over every process) in `rollout_step`. So the step's loss is exactly L.
"""

from __future__ import annotations

import logging

import torch

from tuneforge.config.schema import Config
from tuneforge.distributed import collectives
from tuneforge.errors import DataError
from tuneforge.models.logprobs import token_logps
from tuneforge.models.losses import LogitHead
from tuneforge.rollout.base import SamplingParams

from ..base import Batch, Objective, config_error
from ..reference import Reference, disable_dropout, eval_mode
from .blocks import StridedLayout, anchor_offset, block_anchors
from .features import layer_indices, num_layers_of
from .strided_rollout import advantages, generate_blocks, hidden_states, score_blocks

log = logging.getLogger("tuneforge")
IGNORE_INDEX = -100
POOLINGS = ("last_token", "mean_pooling")
MASKLESS_ATTENTION = ("flash_attention_2", "varlen")  # kernels that take no arbitrary mask


class StridedEBFTObjective(Objective):
    name = "ebft"
    row_columns = ("input_ids", "labels", "prompt_length", "_row")
    # A step's documents are sampled: splitting a micro-batch would draw other samples.
    splits_micro_batches = False

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.ebft = cfg.ebft
        _check_config(cfg)
        e = self.ebft
        self.n = e.n_samples_per_prompt
        self.estimator = "reinforce" if self.n == 1 else e.advantage_estimator
        self.pooling = e.embed_method if e.embed_method in POOLINGS else "last_token"
        if e.embed_method not in POOLINGS:
            log.warning("ebft.embed_method %s does not apply to strided blocks; pooling by last_token", e.embed_method)
        if self.n == 1 and (e.advantage_estimator != "reinforce" or e.diversity_coef):
            log.info("ebft.n_samples_per_prompt is 1: advantage_estimator reinforce, no diversity term")
        self.coefs = {"alignment_coef": e.alignment_coef, "diversity_coef": e.diversity_coef if self.n > 1 else 0.0,
                      "whitening": e.use_whitening}
        self.reference = Reference(cfg)
        self.tokenizer = None
        self._ready: set[int] = set()

    # ---- data
    def prepare_data(self, tokenizer, *, rebuild: bool = False):
        """The SFT pipeline's rows (input_ids, labels; prompt_length from the ebft_strided_* transforms),
        without the documents too short for one block."""
        from tuneforge.data.pipeline import prepare

        self.tokenizer = self.reference.tokenizer = tokenizer
        data = prepare(self.cfg, tokenizer, rebuild=rebuild)
        data.train = self._with_blocks(data.train, "datasets")
        if data.eval is not None:
            data.eval = self._with_blocks(data.eval, "evaluation")
        return data

    def _with_blocks(self, ds, where: str):
        e = self.ebft
        keep = [i for i, row in enumerate(ds.select_columns([c for c in ("input_ids", "labels", "prompt_length")
                                                             if c in ds.column_names]))
                if block_anchors(len(row["input_ids"]), self._offset(row), e.stride, e.generate_max_len)]
        if not keep:
            raise DataError(f"{where}: no document is long enough for one strided block: each needs at least "
                            f"anchor offset + generate_max_len tokens (context_length {e.context_length} + "
                            f"{e.generate_max_len}, after the prompt for prompt/completion rows). Lower "
                            "ebft.context_length / ebft.generate_max_len or use longer documents.")
        if len(keep) < len(ds):
            log.warning("%s: %d of %d documents are too short for a strided block and are left out", where,
                        len(ds) - len(keep), len(ds))
            ds = ds.select(keep)
        return ds

    def _offset(self, doc: dict) -> int:
        """The row's anchor offset: after the prompt for prompt/completion rows (a prompt_length column, or
        labels that start untrained), `context_length` for raw text."""
        e = self.ebft
        prompt = doc.get("prompt_length")
        if prompt is None and doc.get("labels") is not None:
            labels = list(doc["labels"])
            first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
            prompt = first or None
        return anchor_offset(e.context_length, prompt, e.min_completion_prefix)

    def collate(self, rows: list[list[dict]], pad_id: int, *, training: bool) -> Batch:
        docs = [d for row in rows for d in row]
        return {"documents": [{"input_ids": list(d["input_ids"]),
                               "labels": list(d["labels"]) if d.get("labels") is not None else list(d["input_ids"]),
                               "offset": self._offset(d)} for d in docs],
                "num_target_tokens": 0}

    # ---- one optimizer step
    def rollout_step(self, model, batches: list[Batch]) -> list[Batch]:
        rolled = [self._rollout(model, b) for b in batches]
        gen, ce = collectives.sum_floats([float(sum(b["gen_tokens"] for b in rolled)),
                                          float(sum(b["ce_tokens"] for b in rolled))])
        for b in rolled:  # the CE mean over the step's CE tokens, in the units of num_items (generated tokens)
            b["ce_weight"] = gen / ce if ce else 0.0
        return rolled

    def _rollout(self, model, batch: Batch) -> Batch:
        if id(model) not in self._ready:
            disable_dropout(model)  # the sampled tokens' log-probs must be those of the loss forward
            self._ready.add(id(model))
        e, device = self.ebft, next(model.parameters()).device
        params = SamplingParams(temperature=e.temperature, top_p=e.top_p, max_tokens=e.generate_max_len)
        layers = layer_indices(e.feature_layers, num_layers_of(model))
        head, docs = LogitHead(model), []
        for doc in batch["documents"]:
            ids = torch.tensor(doc["input_ids"], dtype=torch.long, device=device)
            layout = StridedLayout(len(ids), tuple(block_anchors(len(ids), doc["offset"], e.stride,
                                                                 e.generate_max_len)), e.generate_max_len)
            with eval_mode(model):
                tokens = generate_blocks(model, head, layout, ids, self.n, params)
            with self.reference.network(model) as net:
                scores = score_blocks(net, layout, tokens, layers, self.pooling, **self.coefs)
            labels = torch.tensor(doc["labels"][1:], dtype=torch.long, device=device)
            docs.append({"layout": layout, "tokens": tokens, "scores": scores, "ce_targets": labels,
                         "advantages": advantages(scores.rewards, self.estimator)})
        lengths = [d["layout"].length for d in docs]
        return {"docs": docs, "gen_tokens": sum(self.n * d["layout"].num_blocks * e.generate_max_len for d in docs),
                "ce_tokens": sum(int((d["ce_targets"] != IGNORE_INDEX).sum()) for d in docs) if e.ce_coef else 0,
                "num_tokens": self.n * sum(lengths), "sum_sq_lengths": self.n * sum(t * t for t in lengths)}

    def num_items(self, batch: Batch) -> int:
        return int(batch["gen_tokens"])

    def loss(self, model, batch: Batch, num_items: int) -> tuple[torch.Tensor, dict[str, float]]:
        e, head = self.ebft, LogitHead(model)
        rl_total = ce_total = 0.0
        sums = {"rl_sum": 0.0, "ce_sum": 0.0, "gen_tokens": float(batch["gen_tokens"]),
                "ce_tokens": float(batch["ce_tokens"])}
        for doc in batch["docs"]:
            layout, tokens = doc["layout"], doc["tokens"]
            hidden = hidden_states(model, layout, tokens)  # [n, T, H]
            predictors = layout.predictors.to(tokens.device).flatten()
            targets = tokens[:, layout.slots.to(tokens.device).flatten()]  # [n, nb * gen_len], block-major
            logps = token_logps(head, hidden[:, predictors].flatten(0, 1), targets.flatten())
            adv = doc["advantages"].repeat_interleave(layout.gen_len, dim=1).flatten()  # per token, block-major
            rl = -(logps * adv).sum()
            rl_total = rl_total + rl
            sums["rl_sum"] += float(rl.detach())
            if e.ce_coef:
                trained = doc["ce_targets"] != IGNORE_INDEX  # position p predicts document token p + 1
                nll = -token_logps(head, hidden[0, : layout.doc_len - 1][trained], doc["ce_targets"][trained]).sum()
                ce_total = ce_total + nll
                sums["ce_sum"] += float(nll.detach())
            _add_scores(sums, doc["scores"])
        total = e.rl_coef * rl_total + e.ce_coef * batch.get("ce_weight", 0.0) * ce_total
        sums["loss_sum"] = float(total.detach()) if torch.is_tensor(total) else float(total)
        return total / max(num_items, 1), sums

    def summarize(self, sums: dict[str, float], num_items: int) -> dict[str, float]:
        samples, blocks = max(sums.get("samples", 0.0), 1.0), max(sums.get("blocks", 0.0), 1.0)
        logged = {"loss": sums.get("loss_sum", 0.0) / max(num_items, 1),
                  "ebft/rl_loss": sums.get("rl_sum", 0.0) / max(sums.get("gen_tokens", 0.0), 1.0),
                  "ebft/alignment": sums.get("alignment_sum", 0.0) / samples,
                  "ebft/diversity": sums.get("diversity_sum", 0.0) / samples,
                  "ebft/reward": sums.get("reward_sum", 0.0) / samples,
                  "ebft/cfm_loss": sums.get("cfm_sum", 0.0) / blocks}
        if self.ebft.ce_coef:
            logged["ebft/ce_loss"] = sums.get("ce_sum", 0.0) / max(sums.get("ce_tokens", 0.0), 1.0)
        return logged

    # ---- evaluation: the same rollout and scores on held-out documents, no update
    @torch.no_grad()
    def evaluate(self, model, batch: Batch) -> dict[str, float]:
        rolled = self._rollout(model, batch)
        rolled["ce_weight"] = rolled["gen_tokens"] / rolled["ce_tokens"] if rolled["ce_tokens"] else 0.0
        return self.loss(model, rolled, 1)[1]

    def summarize_eval(self, sums: dict[str, float]) -> dict[str, float]:
        return self.summarize(sums, int(sums.get("gen_tokens", 1)))


def _add_scores(sums: dict[str, float], scores) -> None:
    sums["alignment_sum"] = sums.get("alignment_sum", 0.0) + float(scores.alignment.sum())
    sums["diversity_sum"] = sums.get("diversity_sum", 0.0) + float(scores.diversity.sum())
    sums["reward_sum"] = sums.get("reward_sum", 0.0) + float(scores.rewards.sum())
    sums["samples"] = sums.get("samples", 0.0) + scores.rewards.numel()
    sums["cfm_sum"] = sums.get("cfm_sum", 0.0) + scores.cfm_sum
    sums["blocks"] = sums.get("blocks", 0.0) + scores.rewards.shape[1]


def _check_config(cfg: Config) -> None:
    """What strided mode cannot run with, refused before any model loads (torch_compile: turned off, noted)."""
    if cfg.torch_compile is True:  # auto already chooses eager here (models/compile_setup.py)
        # Every document's blocks give the masked forward another layout: compiled blocks would recompile per
        # document. The model runs eagerly instead; said once, where the objective is built (validate, train).
        log.warning("torch_compile: %s is not applied in EBFT strided mode: its blocks of varying layout run "
                    "through one block-masked forward, which torch.compile would recompile for every document; "
                    "the model runs eagerly (set torch_compile: false to drop this note)", cfg.torch_compile)
        cfg.torch_compile = False
    if cfg.activation_offloading:
        raise config_error("activation_offloading", "EBFT strided mode does not support activation offloading "
                           "(untested with its per-document masked forwards; Axolotl refuses it too); set "
                           "activation_offloading: false.")
    if cfg.attn_implementation in MASKLESS_ATTENTION:
        raise config_error("attn_implementation", f"{cfg.attn_implementation} takes no block mask; EBFT strided "
                           "mode needs flex_attention (GPU) or sdpa / eager.")
