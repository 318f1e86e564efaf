"""What the config, data and model layers need to know about a training method, as plain values.

The objectives themselves live in `tuneforge.methods` (above this layer). The few facts that lower
layers ask about a method (which rows its data has, whether it trains with the router's auxiliary
loss, which model head it trains) are declared here once, so that `config/rules.py`,
`data/formats` (`method_family`), `data/preprocess.py` and `models/load.py` read them instead of
each testing `cfg.rl or cfg.reward_model or ...`. An objective exposes the same entry as its `facts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# The row shapes a method's data has: plain SFT rows (input_ids/labels), preference pairs, KTO
# completions with a label, process-supervision steps, or prompts for online generation.
RowFamily = Literal["sft", "preference", "kto", "stepwise", "prompts"]


@dataclass(frozen=True)
class ModelHead:
    """The transformers class (and label count) a method trains instead of a causal LM."""

    model_type: str
    num_labels: int


@dataclass(frozen=True)
class MethodFacts:
    rows: RowFamily = "sft"
    # The MoE router's load-balancing loss is added by the causal-LM token loss (models/losses.py);
    # objectives that compute their loss from hidden states would silently leave it out.
    router_loss: bool = False
    head: ModelHead | None = None
    # The frozen network the method compares against: "always" (DPO's pi_ref, EBFT's feature network),
    # "kl" (online RL's pi_ref, held only when the KL coefficient beta is not 0), or None.
    reference: Literal["always", "kl"] | None = None

    @property
    def supervised(self) -> bool:
        """Plain supervised fine-tuning rows (SFT-only keys such as neftune_noise_alpha apply)."""
        return self.rows == "sft"

    @property
    def online(self) -> bool:
        """The data is prompts; completions are generated during training (GRPO, GDPO, EBFT)."""
        return self.rows == "prompts"


_PAIRS = MethodFacts(rows="preference")
_ONLINE = MethodFacts(rows="prompts", reference="kl")

METHODS: dict[str, MethodFacts] = {
    "sft": MethodFacts(rows="sft", router_loss=True),
    "dpo": MethodFacts(rows="preference", reference="always"), "ipo": MethodFacts(rows="preference", reference="always"),
    "simpo": _PAIRS, "orpo": _PAIRS,
    "kto": MethodFacts(rows="kto", reference="always"),
    "grpo": _ONLINE, "gdpo": _ONLINE, "ebft": MethodFacts(rows="prompts", reference="always"),
    "reward_model": MethodFacts(rows="preference", head=ModelHead("AutoModelForSequenceClassification", 1)),
    "process_reward_model": MethodFacts(rows="stepwise", head=ModelHead("AutoModelForTokenClassification", 2)),
}


def method_name(cfg) -> str:
    """The method a config selects: `rl:`, else reward_model / process_reward_model, else sft."""
    if cfg.rl:
        return cfg.rl
    if cfg.reward_model:
        return "reward_model"
    if cfg.process_reward_model:
        return "process_reward_model"
    return "sft"


def method_facts(cfg) -> MethodFacts:
    return METHODS.get(method_name(cfg), MethodFacts())


def method_key(cfg) -> str:
    """How the config spells the selected method, for messages (`rl: dpo`, `reward_model: true`)."""
    name = method_name(cfg)
    return f"rl: {name}" if cfg.rl else f"{name}: true"


def varying_block_layout(cfg) -> bool:
    """EBFT's strided mode: every document's generated blocks give the one masked forward another layout, so
    compiled transformer blocks would recompile per document (models/compile_setup.py keeps it eager)."""
    return method_name(cfg) == "ebft" and getattr(cfg, "ebft", None) is not None and cfg.ebft.mode == "strided"
