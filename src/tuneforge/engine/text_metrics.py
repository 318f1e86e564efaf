"""Generation metrics for `do_causal_lm_eval`: the model's greedy continuations of the evaluation rows
scored against the rows' references, corpus-level, with sacreBLEU's implementations (BLEU, chrF, TER).

sacreBLEU is optional (`pip install sacrebleu`, or the `eval` extra); Axolotl loads the same metrics
through `evaluate`, which fetches metric scripts from the Hugging Face Hub, so they fail offline.
`perplexity` is accepted for Axolotl configs and needs nothing here: `eval_perplexity` (of the trained
tokens) is logged at every evaluation. COMET needs a neural model from the hub and is refused by the config.
"""

from __future__ import annotations

from tuneforge.errors import TuneforgeError

SCORED = ("sacrebleu", "chrf", "ter")  # computed here; the other accepted names need no computation


def require_sacrebleu(metrics: list[str]) -> None:
    """Fail before training, not at the first evaluation, when the metrics need sacreBLEU and it is missing."""
    if not set(metrics) & set(SCORED):
        return
    try:
        import sacrebleu  # noqa: F401
    except ImportError as exc:
        raise TuneforgeError(
            f"eval_causal_lm_metrics {sorted(set(metrics) & set(SCORED))} are computed with sacreBLEU, which is "
            "not installed: pip install sacrebleu (or tuneforge[eval]), or set do_causal_lm_eval: false.") from exc


def score(metrics: list[str], hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """{metric: corpus score} for the SCORED names in `metrics` (BLEU and chrF 0-100, higher is better;
    TER 0 and up, lower is better), one reference per hypothesis."""
    import sacrebleu

    refs = [references]
    scorers = {"sacrebleu": sacrebleu.corpus_bleu, "chrf": sacrebleu.corpus_chrf, "ter": sacrebleu.corpus_ter}
    return {name: float(scorers[name](hypotheses, refs).score) for name in metrics if name in scorers}
