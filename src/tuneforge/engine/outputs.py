"""What a finished run leaves in output_dir, in formats the ecosystem loads directly:

- adapter runs: adapter_model.safetensors + adapter_config.json (PeftModel.from_pretrained);
  full runs: model.safetensors (+ shards), config.json, generation_config.json (from_pretrained);
- the tokenizer, with the chat template used in training (so inference formats prompts the same way);
- config.yaml: the resolved config; metrics.jsonl; training_curves.png; README.md: a model card.

An adapter trained on a randomly initialised base (`reinit_weights: true`) is useless without that
base, so the base is saved too, under `base_model/`, and adapter_config.json points to it.
"""

from __future__ import annotations

import json
import logging
import platform
from pathlib import Path

import yaml

from tuneforge import __version__
from tuneforge.config import dump
from tuneforge.config.schema import Config

from .checkpoint import save_model_files

log = logging.getLogger("tuneforge")


def write_run_files(cfg: Config, tokenizer, output_dir: Path) -> None:
    """At the start of a run: the resolved config and the tokenizer (a crashed run still documents itself)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(yaml.safe_dump(dump(cfg), sort_keys=False))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(output_dir))


def save_final(cfg: Config, model, tokenizer, output_dir: Path, result=None, *, weights: bool = True) -> None:
    """Weights, tokenizer, config and model card. `model` is the unwrapped (PEFT or transformers) model;
    `weights=False` when they are already written (an FSDP2 run gathers them with every process)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    sync_generation_config(model, tokenizer)
    if weights:
        save_model_files(model, tokenizer, output_dir, cfg.save_safetensors)
    if cfg.adapter and cfg.reinit_weights and (output_dir / "base_model").exists():
        _point_adapter_to_base(output_dir)
    (output_dir / "config.yaml").write_text(yaml.safe_dump(dump(cfg), sort_keys=False))
    (output_dir / "README.md").write_text(model_card(cfg, result))
    log.info("saved the %s to %s", "adapter" if cfg.adapter else "model", output_dir)


def sync_generation_config(model, tokenizer) -> None:
    """Generation stops at the tokenizer's eos and pads with its pad token."""
    if tokenizer is None or getattr(model, "generation_config", None) is None:
        return
    gen = model.generation_config
    if tokenizer.eos_token_id is not None:
        gen.eos_token_id = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id


def save_random_base(model, tokenizer, output_dir: Path) -> None:
    """Before the adapter is added: keep the randomly initialised base the adapter will belong to."""
    base_dir = Path(output_dir) / "base_model"
    model.save_pretrained(str(base_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(base_dir))


def _point_adapter_to_base(output_dir: Path) -> None:
    config_file = output_dir / "adapter_config.json"
    data = json.loads(config_file.read_text())
    data["base_model_name_or_path"] = str((output_dir / "base_model").resolve())
    config_file.write_text(json.dumps(data, indent=2))


def model_card(cfg: Config, result=None) -> str:
    kind = f"{cfg.adapter.upper()} adapter" if cfg.adapter else "full fine-tune"
    data = [f"- `{d.path}` (type: `{d.type if isinstance(d.type, str) or d.type is None else 'user-defined'}`)"
            for d in cfg.datasets or []]
    lines = [
        f"# {Path(cfg.output_dir).name}",
        "",
        f"A {kind} of `{cfg.base_model}`"
        + (" (randomly initialised from its config, `reinit_weights: true`)" if cfg.reinit_weights else "")
        + f", trained with tuneforge {__version__}.",
        "",
        "## Training data",
        *data,
        "",
        "## Results",
        *_results(result),
        "",
        "## Use",
        "```python",
        *_usage(cfg),
        "```",
        "",
        "## Configuration",
        "<details><summary>config.yaml</summary>",
        "",
        "```yaml",
        yaml.safe_dump(dump(cfg), sort_keys=False).rstrip(),
        "```",
        "</details>",
        "",
        f"Software: tuneforge {__version__}, Python {platform.python_version()}, {_versions()}.",
        "",
    ]
    return "\n".join(lines)


def _results(result) -> list[str]:
    if result is None:
        return ["(no metrics)"]
    s = result.state
    rows = [f"- optimizer steps: {s.global_step}", f"- trained tokens: {s.trained_tokens_seen:,}",
            f"- training time: {s.train_seconds:.1f} s"]
    if result.train_metrics:
        rows.append(f"- final training loss: {result.train_metrics.get('loss', float('nan')):.4f}")
    if result.eval_metrics:
        for key in ("eval_loss", "eval_perplexity", "eval_accuracy", "eval_token_accuracy"):
            if key in result.eval_metrics:
                rows.append(f"- {key}: {result.eval_metrics[key]:.4f}")
    return rows


def _usage(cfg: Config) -> list[str]:
    if cfg.adapter:
        base = "\"<this folder>/base_model\"" if cfg.reinit_weights else f"\"{cfg.base_model}\""
        return [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f"base = AutoModelForCausalLM.from_pretrained({base})",
            "model = PeftModel.from_pretrained(base, \"<this folder>\")",
            "tokenizer = AutoTokenizer.from_pretrained(\"<this folder>\")",
        ]
    return [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(\"<this folder>\")",
        "tokenizer = AutoTokenizer.from_pretrained(\"<this folder>\")",
    ]


def _versions() -> str:
    import peft
    import torch
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
