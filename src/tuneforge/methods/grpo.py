"""GRPO and GDPO (`rl: grpo`, `rl: gdpo`): online RL with group-relative advantages, as an objective.

One optimizer step of the engine loop, for this objective:

    rollout_step([prompts])     rollout(prompts): sample num_generations completions per prompt (embedded
                                engine, the async prefetcher, or vLLM), score them with the reward
                                functions; no-grad passes for pi_old (when needed) and pi_ref (beta != 0);
                                importance weights for off-policy samples. Then the advantages (statistics
                                of the whole generation, over every process for scale_rewards: batch and
                                GDPO), and the split into micro-batches of `micro_batch_size` completions
    num_items(micro-batch)      the loss items of `loss_type`
    loss(micro-batch)           one forward over prompt+completion rows, per-token log-probs of the
                                completion at the sampling temperature, the clipped surrogate
                                (grpo_loss.token_loss) and the aggregation of `loss_type`

Batch geometry (as in TRL with `steps_per_generation` = gradient accumulation): `micro_batch_size`
counts completions. One generation per optimizer step covers `micro_batch_size x
gradient_accumulation_steps / num_generations` prompts (the planner hands them over as one batch);
their advantages are computed over the whole generation, then `rollout_step` splits the completions
into micro-batches of `micro_batch_size` (a group may span two micro-batches). `num_iterations: mu`
reuses one generation for mu optimizer steps (the prompts the loop hands in meanwhile are skipped),
with pi_old fixed at generation.

pi_old: on-policy with num_iterations 1, pi_old = pi.detach() (ratio exactly 1, REINFORCE with a group
baseline). Otherwise, and for off-policy samplers, a no-grad pass at rollout time with the current
weights gives pi_old, and the sampler's own log-probs give the importance weight pi_old / pi_sampler.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tuneforge.config.schema import Config
from tuneforge.data.collate import collate as collate_documents
from tuneforge.distributed import collectives
from tuneforge.errors import NotSupportedYet
from tuneforge.models.losses import IGNORE_INDEX, LogitHead, decoder_hidden_states

from . import grpo_loss as gl
from .base import Batch, Objective
from .preference import Reference, beta_of, config_error, disable_dropout
from .rewards import RewardSet

log = logging.getLogger("tuneforge")

_CHUNK_ELEMENTS = 1 << 26


# ---------------------------------------------------------------- settings
@dataclass
class GRPOSettings:
    num_generations: int = 8
    max_completion_length: int = 256
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    aggregation: str = "sum_then_normalize"
    level: str = "token"
    num_iterations: int = 1
    mask_truncated: bool = False
    skip_zero_advantage: bool = True
    temperature: float = 1.0
    async_prefetch: bool = False
    prefetch_depth: int = 1
    use_vllm: bool = False
    rounded_kv_cache: bool = False  # generation_kwargs.kv_cache_dtype fp8: the sampler is not exactly pi
    is_correction: bool | None = None  # None: on for off-policy samplers
    is_mode: str = "token_truncate"
    is_cap: float = 3.0
    is_floor: float | None = None
    opsm: float | None = None
    bias_corrected_kl: bool = False
    log_completions: bool = False
    completions_to_print: int = 4
    sync_interval: int = 1

    @classmethod
    def from_config(cls, cfg: Config) -> GRPOSettings:
        t = cfg.trl or SimpleNamespace()
        def get(key, default):
            return (default if getattr(t, key, None) is None else getattr(t, key))
        scale = get("scale_rewards", "group")
        scale = {True: "group", False: "none"}.get(scale, scale)
        eps = float(get("epsilon", 0.2))
        s = cls(
            num_generations=int(get("num_generations", 8)),
            max_completion_length=int(get("max_completion_length", 256)),
            beta=beta_of(cfg, default=0.0),
            epsilon=eps, epsilon_high=float(get("epsilon_high", eps)), delta=get("delta", None),
            loss_type=get("loss_type", "dapo"), scale_rewards=scale,
            aggregation=get("multi_objective_aggregation",
                            "normalize_then_sum" if cfg.rl == "gdpo" else "sum_then_normalize"),
            level=get("importance_sampling_level", "token"), num_iterations=int(get("num_iterations", 1)),
            mask_truncated=bool(get("mask_truncated_completions", False)),
            # FSDP2: every process must run each forward (parameters are gathered with all of them).
            skip_zero_advantage=bool(get("skip_zero_advantage_batches", True)) and not cfg.fsdp_enabled,
            temperature=float(get("temperature", 1.0)),
            async_prefetch=bool(get("async_prefetch", False) or get("use_data_producer", False)),
            prefetch_depth=int(get("prefetch_depth", 1)), use_vllm=bool(get("use_vllm", False)),
            rounded_kv_cache=not get("use_vllm", False) and
            (get("generation_kwargs", None) or {}).get("kv_cache_dtype", "auto") != "auto",
            is_correction=get("vllm_importance_sampling_correction", None),
            is_mode=get("vllm_importance_sampling_mode", "token_truncate"),
            is_cap=float(get("vllm_importance_sampling_cap", 3.0)),
            is_floor=get("vllm_importance_sampling_clip_min", None), opsm=get("off_policy_mask_threshold", None),
            bias_corrected_kl=bool(get("use_bias_correction_kl", False)),
            log_completions=bool(get("log_completions", False)),
            completions_to_print=int(get("num_completions_to_print", 4)),
            sync_interval=int(get("vllm_sync_interval", 1)),
        )
        s.check(cfg)
        return s

    def check(self, cfg: Config) -> None:
        if self.loss_type not in gl.LOSS_TYPES:
            raise config_error("trl.loss_type", f"must be one of {', '.join(gl.LOSS_TYPES)}.")
        if cfg.sample_packing:
            raise config_error("sample_packing", "GRPO batches are prompts and their generated completions; "
                                                 "remove sample_packing (or set it to false).")
        G = self.num_generations
        per_step = completions_per_micro_batch(cfg, G) * cfg.grad_accum
        if per_step % G:
            raise config_error("micro_batch_size", f"counts completions (as in Axolotl/TRL): micro_batch_size x "
                               f"gradient_accumulation_steps = {per_step} completions per optimizer step, which must "
                               f"be a multiple of trl.num_generations ({G}) so that every prompt gets its {G} "
                               "completions. Change one of the three.")
        wanted = cfg.trl.generation_batch_size if cfg.trl else None
        if wanted is not None and wanted != per_step:
            raise config_error("trl.generation_batch_size", f"is {wanted}, but tuneforge generates once per optimizer "
                               f"step: micro_batch_size x gradient_accumulation_steps = {per_step} completions. "
                               f"Remove it or set it to {per_step}.")
        if self.temperature <= 0:
            raise config_error("trl.temperature", "GRPO samples completions; the temperature must be > 0.")
        if self.async_prefetch and self.use_vllm:
            raise NotSupportedYet("trl.async_prefetch with use_vllm is not implemented yet; use one of them.")

    @property
    def off_policy_sampler(self) -> bool:
        return self.async_prefetch or self.use_vllm or self.rounded_kv_cache

    @property
    def correct_is(self) -> bool:
        return self.off_policy_sampler if self.is_correction is None else bool(self.is_correction)


# ---------------------------------------------------------------- per-token log-probs
def _chunk_logps(head: LogitHead, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    return -F.cross_entropy(head(hidden) / temperature, targets, reduction="none")


def completion_logps(model, batch: Batch, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) of each completion token, [N, C] (0 outside `token_valid`).

    One decoder pass over the prompt+completion rows; the LM head runs only at completion tokens, a
    chunk at a time and checkpointed (no [N, T, V] logits tensor).
    """
    hidden = decoder_hidden_states(model, batch)
    valid = batch["token_valid"]
    rows, cols = valid.nonzero(as_tuple=True)
    positions = batch["token_pos"][rows, cols]
    h = hidden[rows, positions]
    targets = batch["completion_ids"][rows, cols]
    head = LogitHead(model)
    chunk = max(256, _CHUNK_ELEMENTS // head.vocab)
    parts = []
    for s in range(0, h.shape[0], chunk):
        args = (head, h[s : s + chunk], targets[s : s + chunk], temperature)
        parts.append(checkpoint(_chunk_logps, *args, use_reentrant=False) if torch.is_grad_enabled()
                     else _chunk_logps(*args))
    flat = torch.cat(parts) if parts else h.new_zeros((0,), dtype=torch.float32)
    out = torch.zeros(valid.shape, dtype=flat.dtype, device=flat.device)
    return out.index_put((rows, cols), flat)


def training_layout(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> Batch:
    """Rows prompt+completion in the collate contract, plus the completion view [N, C]:
    `completion_ids`, `token_valid` (real completion tokens) and `token_pos` (the position whose
    next-token prediction is that token)."""
    docs = [[{"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c}] for p, c in zip(prompts, completions, strict=True)]
    batch = collate_documents(docs, pad_id)
    N, C = len(completions), max(1, max(len(c) for c in completions))
    comp = torch.full((N, C), pad_id, dtype=torch.long)
    valid = torch.zeros((N, C), dtype=torch.bool)
    pos = torch.zeros((N, C), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        comp[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        valid[i, : len(c)] = True
        pos[i] = torch.arange(C) + len(p) - 1
    batch.update(completion_ids=comp, token_valid=valid, token_pos=pos.clamp(max=batch["input_ids"].shape[1] - 1))
    return batch


def split_rollout(batch: Batch, size: int) -> list[Batch]:
    """Micro-batches of `size` completion rows from one scored rollout (advantages already set).

    Per-row tensors and lists are sliced; the varlen boundaries are rebuilt (one padded document per
    row); generation time and tokens stay with the first chunk so they are counted once.
    """
    n_rows, width = batch["input_ids"].shape
    if n_rows <= size:
        return [batch]
    chunks = []
    for start in range(0, n_rows, size):
        end = min(n_rows, start + size)
        chunk = {}
        for key, value in batch.items():
            per_row = (torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == n_rows) or (
                isinstance(value, list) and len(value) == n_rows)
            chunk[key] = value[start:end] if per_row and key != "cu_seqlens" else value
        rows = end - start
        lengths = batch["row_lengths"][start:end]
        chunk.update(cu_seqlens=torch.arange(rows + 1, dtype=torch.int32, device=batch["cu_seqlens"].device) * width,
                     max_seqlen=width, num_target_tokens=int((chunk["target_ids"] != IGNORE_INDEX).sum()),
                     num_tokens=sum(lengths), sum_sq_lengths=sum(n * n for n in lengths))
        if start:
            chunk.update(gen_seconds=0.0, gen_tokens=0)
        chunks.append(chunk)
    return chunks


def completions_per_micro_batch(cfg: Config, num_generations: int) -> int:
    """`micro_batch_size` (completions, as in Axolotl); unset, one prompt's group per micro-batch."""
    return cfg.micro_batch_size if "micro_batch_size" in cfg.model_fields_set else num_generations


# ---------------------------------------------------------------- the objective
class GRPOObjective(Objective):
    name = "grpo"
    row_columns = ("input_ids", "prompt_json", "columns_json", "_row")
    # A step's prompts are one planned batch whose rewards are normalised together (scale_rewards: batch);
    # its completions are cut into micro-batches of micro_batch_size after generation instead.
    splits_micro_batches = False

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.s = GRPOSettings.from_config(cfg)
        self.rewards = RewardSet.from_config(cfg)  # import errors surface before any model loads
        log.info("GRPO: %d prompts x %d generations per optimizer step, in micro-batches of %d completions",
                 self.rows_per_micro_batch(), self.s.num_generations,
                 completions_per_micro_batch(cfg, self.s.num_generations))
        self.reference = Reference(cfg) if self.s.beta != 0.0 else None
        self.tokenizer = None
        self.params = None
        self.sampler = None
        self.prefetcher = None
        self._ready: set[int] = set()
        self._pending: list[Batch] = []  # rolled out this step, advantages not final yet
        self._generation: list[Batch] = []  # the last generation, reused for num_iterations steps
        self._uses = 0
        self._in_step = False
        self._replay = False
        self._index = 0
        self._rollouts = 0
        self._restored_prefetch: dict | None = None
        self._train_clock: float | None = None
        self._last_train_seconds = 0.0

    def rows_per_micro_batch(self) -> int:
        G = self.s.num_generations
        return completions_per_micro_batch(self.cfg, G) * self.cfg.grad_accum // G  # prompts; checked to divide

    def micro_batches_per_step(self) -> int:
        return 1  # the step's prompts arrive as one batch; rollout_step splits their completions

    def rollout_step(self, model, batches: list[Batch]) -> list[Batch]:
        rolled = [self.rollout(model, b) for b in batches]
        self._in_step = False
        self._uses += 1
        self._finish()  # advantages over the whole generation, before it is split
        self._train_clock = time.perf_counter()
        size = completions_per_micro_batch(self.cfg, self.s.num_generations)
        return [chunk for b in rolled for chunk in split_rollout(b, size)]

    # ---- data
    def prepare_data(self, tokenizer):
        from tuneforge.data.formats.grpo import prepare_prompts
        from tuneforge.rollout.base import SamplingParams

        self.tokenizer = tokenizer
        if self.reference is not None:
            self.reference.tokenizer = tokenizer
        self.params = SamplingParams.from_trl(self.cfg.trl, tokenizer, self.s.max_completion_length)
        return prepare_prompts(self.cfg, tokenizer)

    def collate(self, rows: list[list[dict]], pad_id: int, *, training: bool) -> Batch:
        docs = [d for row in rows for d in row]
        return {
            "prompt_ids": [list(d["input_ids"]) for d in docs],
            "prompts": [json.loads(d["prompt_json"]) for d in docs],
            "columns": [json.loads(d["columns_json"]) for d in docs],
            "rows": [int(d.get("_row", -1)) for d in docs],
            "pad_id": pad_id,
            "num_target_tokens": 0,
        }

    # ---- rollout
    def _setup(self, model) -> None:
        if id(model) in self._ready:
            return
        disable_dropout(model)  # pi_old, pi and pi_ref must agree on the same tokens
        self._ready.add(id(model))
        from tuneforge.rollout.base import EMBEDDED_GENERATION_KWARGS
        from tuneforge.rollout.embedded import EmbeddedSampler
        from tuneforge.rollout.snapshot import HalfPrecisionSampler, wants_half_precision_copy

        pad = self.tokenizer.pad_token_id if self.tokenizer is not None and self.tokenizer.pad_token_id is not None else 0
        autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(_precision(self.cfg))
        device = next(model.parameters()).device
        autocast = autocast if device.type == "cuda" else None
        gen_kwargs = (self.cfg.trl.generation_kwargs if self.cfg.trl else None) or {}
        cuda_graphs = bool(gen_kwargs.get("cuda_graphs", True))
        fused = bool(gen_kwargs.get("fused_decode", True))
        if not self.s.use_vllm and (ignored := sorted(set(gen_kwargs) - EMBEDDED_GENERATION_KWARGS)):
            log.warning("trl.generation_kwargs %s are not used by the embedded engine (it reads %s)", ignored,
                        sorted(EMBEDDED_GENERATION_KWARGS))
        if self.s.use_vllm and (ignored := sorted(set(gen_kwargs) & EMBEDDED_GENERATION_KWARGS - {"stop_token_ids"})):
            log.warning("trl.generation_kwargs %s are the embedded engine's; vLLM does not receive them", ignored)
        # torch_compile also compiles the decode step (first generation pays the compile time).
        compile_decode = bool(gen_kwargs.get("compile", self.cfg.torch_compile in (True, "auto")))

        # Full fine-tuning keeps fp32 weights: generate from a half-precision copy (see rollout/snapshot.py).
        # Without the copy, fp32 weights generate in fp32: under autocast, RoPE over the fp32 embeddings
        # gives fp32 keys next to half-precision values, which transformers' static cache cannot hold.
        mostly_fp32 = wants_half_precision_copy(model, autocast)
        half = autocast if gen_kwargs.get("half_precision_copy", True) and mostly_fp32 else None

        kv_dtype = torch.float8_e4m3fn if self.s.rounded_kv_cache else None  # the one value besides auto

        def make(m):
            return EmbeddedSampler(m, pad, cuda_graphs=cuda_graphs, autocast_dtype=None if mostly_fp32 else autocast,
                                   compile=compile_decode, fused=fused, kv_cache_dtype=kv_dtype)

        if self.s.use_vllm and self.cfg.trl.vllm_mode == "colocate":
            from tuneforge.rollout.generation_server import BackendSampler, backend_from_config

            log.warning("trl.vllm_mode: colocate is EXPERIMENTAL: tested only against a stand-in for vllm.LLM")
            lora_sync = bool(self.cfg.trl.vllm_lora_sync) and bool(self.cfg.adapter)
            self.sampler = BackendSampler(backend_from_config(self.cfg, "vllm", colocate=True), lora_sync=lora_sync)
        elif self.s.use_vllm:
            from tuneforge.rollout.vllm_client import VLLMServerSampler

            self.sampler = VLLMServerSampler.from_config(self.cfg, self.tokenizer)
        else:
            self.sampler = HalfPrecisionSampler(model, make, half) if half else make(model)
        if self.s.async_prefetch:
            from tuneforge.rollout.async_prefetch import Prefetcher

            self.prefetcher = Prefetcher(model, make, self.sampler, depth=self.s.prefetch_depth, dtype=half)
            if self._restored_prefetch:
                self.prefetcher.load_state_dict(self._restored_prefetch)
        # a checkpoint's generation comes back on the CPU
        self._generation = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
                            for b in self._generation]

    def _start_step(self) -> bool:
        """First rollout call of an optimizer step: True when the step replays the last generation."""
        self._in_step = True
        self._index = 0
        if self._train_clock is not None:
            self._last_train_seconds = time.perf_counter() - self._train_clock
        replay = bool(self._generation) and self._uses < self.s.num_iterations
        if not replay:
            self._generation, self._uses = [], 0
        return replay

    def rollout(self, model, batch: Batch) -> Batch:
        self._setup(model)
        if not self._in_step:
            self._replay = self._start_step()
        if self._replay:
            out = self._generation[self._index % len(self._generation)]
            self._index += 1
            return out
        out = self._generate_and_score(model, batch)
        self._generation.append(out)
        self._pending.append(out)
        self._index += 1
        return out

    def _generate(self, model, batch: Batch):
        """(rollout, off-policy?, the prompt batch the rollout belongs to)."""
        G, prompts = self.s.num_generations, batch["prompt_ids"]
        if self.prefetcher is not None:
            rollout, queued, batch = self.prefetcher.step(model, prompts, G, self.params, tag=batch)
            return rollout, queued or self.s.rounded_kv_cache, batch
        if not self.s.use_vllm or self._rollouts % self.s.sync_interval == 0:
            self.sampler.sync_weights(model)  # embedded: a no-op, or the half-precision copy's refresh
        return self.sampler.generate(prompts, G, self.params), self.s.use_vllm or self.s.rounded_kv_cache, batch

    @torch.no_grad()
    def _generate_and_score(self, model, batch: Batch) -> Batch:
        G = self.s.num_generations
        # A prefetched rollout belongs to earlier prompts: their columns and rows come back with it.
        rollout, off_policy, source = self._generate(model, batch)
        self._rollouts += 1
        prompts = [p for p in source["prompts"] for _ in range(G)]
        columns = {k: [c.get(k) for c in source["columns"] for _ in range(G)] for k in _keys(source["columns"])}
        rows = [r for r in source["rows"] for _ in range(G)]
        texts = self.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        chat = bool(prompts) and isinstance(prompts[0], list)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if chat else texts
        per_func = self.rewards.compute(prompts, completions, rollout.completion_ids, columns, rows,
                                        extra={"trainer_state": SimpleNamespace(global_step=self._rollouts - 1),
                                               "max_completion_length": self.s.max_completion_length})
        prompt_ids = [p for p in rollout.prompt_ids for _ in range(G)]
        row_lengths = [len(p) + len(c) for p, c in zip(prompt_ids, rollout.completion_ids, strict=True)]
        out = training_layout(prompt_ids, rollout.completion_ids, source["pad_id"])
        device = next(model.parameters()).device
        out = {k: v.to(device) if torch.is_tensor(v) else v for k, v in out.items()}
        truncated = torch.tensor([not f for f in rollout.finished], device=device)
        mask = out["token_valid"].clone()
        if self.s.mask_truncated:
            mask &= ~truncated.unsqueeze(1)
        sampler_logps = torch.zeros(mask.shape, device=device)
        for i, lp in enumerate(rollout.logprobs):
            sampler_logps[i, : len(lp)] = torch.tensor(lp, device=device)
        out.update(mask=mask, truncated=truncated, rewards_per_func=per_func, sampler_logps=sampler_logps,
                   off_policy=off_policy, gen_seconds=rollout.seconds, gen_tokens=rollout.num_tokens,
                   texts=texts, prompt_texts=[p if isinstance(p, str) else p[-1]["content"] for p in source["prompts"]],
                   row_lengths=row_lengths, num_tokens=sum(row_lengths), sum_sq_lengths=sum(n * n for n in row_lengths))
        needs_old = self.s.num_iterations > 1 or (off_policy and self.s.correct_is) or self.s.opsm is not None
        if needs_old:
            out["old_logps"] = completion_logps(model, out, self.s.temperature)
        if off_policy and self.s.correct_is:
            out["is_weights"] = gl.importance_weights(out["old_logps"], sampler_logps, mask, self.s.is_mode,
                                                      cap=self.s.is_cap, floor=self.s.is_floor)
        if self.reference is not None:
            with self.reference.network(model) as net:
                out["ref_logps"] = completion_logps(net, out, self.s.temperature)
        out["advantages"] = torch.zeros(len(prompt_ids), device=device)  # set in _finish
        return out

    def _finish(self) -> None:
        """Advantages of this step's rollouts (batch statistics span all of them)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        w = self.rewards.weights.to(torch.float64)
        stats = None
        if gl.needs_batch_stats(self.s.scale_rewards, self.s.aggregation):
            every = torch.cat([b["rewards_per_func"] for b in pending])
            whole = gl.group_advantages(every, w, self.s.num_generations, scale_rewards=self.s.scale_rewards,
                                        aggregation=self.s.aggregation)
            stats = gl.batch_mean_std(whole.rewards, collectives.sum_tensor)  # TRL gathers over processes too
        for b in pending:
            adv = gl.group_advantages(b["rewards_per_func"], w, self.s.num_generations,
                                      scale_rewards=self.s.scale_rewards, aggregation=self.s.aggregation,
                                      batch_stats=stats)
            b["advantages"] = adv.advantages.to(b["mask"].device, torch.float32)
            b["combined_rewards"] = adv.rewards
            b["std_is_zero"] = adv.std_is_zero
        if self.s.log_completions:
            self._log_completions(pending[0])

    def num_items(self, batch: Batch) -> int:
        return gl.loss_items(self.s.loss_type, batch["mask"])

    # ---- loss
    def loss(self, model, batch: Batch, num_items: int) -> tuple[torch.Tensor, dict[str, float]]:
        adv, mask = batch["advantages"], batch["mask"]
        sums = self._rollout_sums(batch)
        if self.s.skip_zero_advantage and self.s.beta == 0.0 and not bool(adv.any()):
            # No policy-gradient signal: skip the forward, but touch every trainable parameter with a zero
            # so data-parallel gradient reduction still sees all of them.
            zero = sum((p.reshape(-1)[:1] * 0.0).sum() for p in model.parameters() if p.requires_grad)
            return zero, {**sums, "skipped_batches": 1.0}
        logps = completion_logps(model, batch, self.s.temperature)
        keep = None
        if self.s.opsm is not None:
            samp = batch["sampler_logps"] if batch["off_policy"] else batch["old_logps"]
            keep = gl.off_policy_keep(adv, logps, samp, mask, self.s.opsm)
        terms = gl.token_loss(logps, batch.get("old_logps"), adv, mask, epsilon_low=self.s.epsilon,
                              epsilon_high=self.s.epsilon_high, delta=self.s.delta, level=self.s.level,
                              beta=self.s.beta, ref_logps=batch.get("ref_logps"), is_weights=batch.get("is_weights"),
                              keep=keep, bias_corrected_kl=self.s.bias_corrected_kl)
        total = gl.loss_sum(terms.loss, mask, self.s.loss_type, self.s.max_completion_length)
        m = mask.float()
        tokens = float(m.sum())
        low, high = terms.low_clipped.expand_as(m).float(), terms.high_clipped.expand_as(m).float()
        sums.update({
            "loss_sum": float(total.detach()), "tokens_in_loss": tokens,
            "clip_low_sum": float((low * m).sum()), "clip_high_sum": float((high * m).sum()),
            "clip_region_sum": float((((low + high) > 0).float() * m).sum()),
        })
        if terms.kl is not None:
            sums["kl_sum"] = float((terms.kl.detach() * m).sum())
        return total / max(num_items, 1), sums

    def _rollout_sums(self, batch: Batch) -> dict[str, float]:
        """Additive statistics of the rollout (rewards, advantages, lengths, generation speed)."""
        per_func, adv = batch["rewards_per_func"], batch["advantages"].double().cpu()
        R = batch["combined_rewards"]
        ok = ~torch.isnan(R)
        lengths = batch["token_valid"].sum(1).double().cpu()
        sums = {
            "completions": float(len(R)), "reward_sum": float(R[ok].sum()), "reward_sq": float((R[ok] ** 2).sum()),
            "reward_count": float(ok.sum()), "adv_sum": float(adv.sum()), "adv_sq": float((adv ** 2).sum()),
            "zero_std": float(batch["std_is_zero"].double().sum()), "length_sum": float(lengths.sum()),
            "truncated": float(batch["truncated"].double().sum()), "gen_seconds": float(batch["gen_seconds"]),
            "gen_tokens": float(batch["gen_tokens"]), "train_seconds": self._last_train_seconds,
            "micro_batches": 1.0,
        }
        for k, name in enumerate(self.rewards.short_names):
            col = per_func[:, k]
            good = ~torch.isnan(col)
            sums[f"r/{name}/sum"] = float(col[good].sum())
            sums[f"r/{name}/sq"] = float((col[good] ** 2).sum())
            sums[f"r/{name}/n"] = float(good.sum())
        if "is_weights" in batch:
            w = batch["is_weights"].expand_as(batch["mask"]).double()
            m = batch["mask"].double()
            sums["is_sum"], sums["is_n"] = float((w * m).sum()), float(m.sum())
        return sums

    def summarize(self, sums: dict[str, float], num_items: int) -> dict[str, float]:
        n = max(sums.get("completions", 0.0), 1.0)
        out = {"loss": sums.get("loss_sum", 0.0) / max(num_items, 1)}
        out.update(_mean_std("reward", sums.get("reward_sum", 0.0), sums.get("reward_sq", 0.0),
                             sums.get("reward_count", 0.0)))
        for key in [k for k in sums if k.startswith("r/") and k.endswith("/sum")]:
            name = key[2:-4]
            out.update(_mean_std(f"rewards/{name}", sums[key], sums[f"r/{name}/sq"], sums[f"r/{name}/n"]))
        out.update(_mean_std("advantages", sums.get("adv_sum", 0.0), sums.get("adv_sq", 0.0), n))
        out["frac_reward_zero_std"] = sums.get("zero_std", 0.0) / n
        out["completions/count"] = sums.get("completions", 0.0)  # over every process
        out["completions/mean_length"] = sums.get("length_sum", 0.0) / n
        out["completions/clipped_ratio"] = sums.get("truncated", 0.0) / n
        tokens = max(sums.get("tokens_in_loss", 0.0), 1.0)
        for key, name in (("clip_low_sum", "clip_ratio/low_mean"), ("clip_high_sum", "clip_ratio/high_mean"),
                          ("clip_region_sum", "clip_ratio/region_mean"), ("kl_sum", "kl")):
            if key in sums:
                out[name] = sums[key] / tokens
        if sums.get("is_n"):
            out["sampling/importance_sampling_ratio/mean"] = sums["is_sum"] / sums["is_n"]
        if sums.get("gen_seconds"):
            out["sampling/tokens_per_second"] = sums.get("gen_tokens", 0.0) / sums["gen_seconds"]
        if sums.get("skipped_batches"):
            out["skipped_batches"] = sums["skipped_batches"]
        return out

    # ---- evaluation: mean reward of sampled completions on held-out prompts
    @torch.no_grad()
    def evaluate(self, model, batch: Batch) -> dict[str, float]:
        self._setup(model)
        rollout = self.sampler.generate(batch["prompt_ids"], self.s.num_generations, self.params)
        G = self.s.num_generations
        prompts = [p for p in batch["prompts"] for _ in range(G)]
        texts = self.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if isinstance(prompts[0], list) else texts
        columns = {k: [c.get(k) for c in batch["columns"] for _ in range(G)] for k in _keys(batch["columns"])}
        per_func = self.rewards.compute(prompts, completions, rollout.completion_ids, columns,
                                        [r for r in batch["rows"] for _ in range(G)])
        R = gl.combine_rewards(per_func, self.rewards.weights.to(torch.float64))
        ok = ~torch.isnan(R)
        return {"reward_sum": float(R[ok].sum()), "reward_count": float(ok.sum()),
                "length_sum": float(sum(len(c) for c in rollout.completion_ids)), "completions": float(len(R))}

    def summarize_eval(self, sums: dict[str, float]) -> dict[str, float]:
        return {"reward": sums.get("reward_sum", 0.0) / max(sums.get("reward_count", 0.0), 1.0),
                "completions/mean_length": sums.get("length_sum", 0.0) / max(sums.get("completions", 0.0), 1.0)}

    # ---- logging
    def _log_completions(self, batch: Batch) -> None:
        k = min(self.s.completions_to_print, len(batch["texts"]))
        G = self.s.num_generations
        records = [{"step": self._rollouts, "prompt": batch["prompt_texts"][i // G], "completion": batch["texts"][i],
                    "reward": _finite(batch["combined_rewards"][i]), "advantage": float(batch["advantages"][i])}
                   for i in range(k)]
        for r in records:
            log.info("completion (reward %s, advantage %.3f): %r", r["reward"], r["advantage"], r["completion"][:200])
        try:
            path = Path(self.cfg.output_path()) / "completions.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        except OSError as exc:
            log.warning("could not write completions.jsonl: %s", exc)

    # ---- checkpoints: the generations still to be trained on travel with the checkpoint
    def state_dict(self) -> dict:
        state = {"rollouts": self._rollouts}
        if self._generation and self._uses < self.s.num_iterations:  # num_iterations: replays left
            state["generation"], state["uses"] = self._generation, self._uses
        if self.prefetcher is not None:  # waits for the rollouts in flight (before the RNG state is saved)
            state["prefetch"] = self.prefetcher.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self._rollouts = state.get("rollouts", 0)
        self._generation, self._uses = state.get("generation", []), state.get("uses", 0)
        self._restored_prefetch = state.get("prefetch")  # the prefetcher is built with the first rollout

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.rewards.close()


class GDPOObjective(GRPOObjective):
    """GRPO with each reward normalised within its group before the weighted sum (normalize_then_sum)."""

    name = "gdpo"


def _keys(columns: list[dict]) -> list[str]:
    keys: dict[str, None] = {}
    for c in columns:
        keys.update(dict.fromkeys(c))
    return [k for k in keys if k not in ("prompt", "completion", "completion_ids", "prompts", "completions")]


def _mean_std(name: str, total: float, sq: float, n: float) -> dict[str, float]:
    if n <= 0:
        return {}
    mean = total / n
    var = max(sq / n - mean * mean, 0.0) * (n / (n - 1) if n > 1 else 0.0)
    return {name: mean, f"{name}_std": math.sqrt(var)}


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _precision(cfg: Config) -> str:
    from tuneforge.models.load import mixed_precision

    return mixed_precision(cfg)


__all__ = ["GDPOObjective", "GRPOObjective", "GRPOSettings", "completion_logps", "training_layout"]
