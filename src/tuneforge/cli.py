"""The `tuneforge` command: every subcommand takes the same YAML config plus `--key value` overrides."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer

from tuneforge.errors import TuneforgeError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Config-driven fine-tuning of large language models. Every command takes a YAML config; any "
    "config key can be overridden as --key value (e.g. --learning-rate 3e-4, --trl.beta 0.1).",
    pretty_exceptions_enable=False,
)
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}
log = logging.getLogger("tuneforge")


def _setup_logging(verbose: bool = False) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(show_time=False, show_path=False, markup=False, rich_tracebacks=False)
    # Several processes (torchrun sets RANK): the first one reports progress, the others only their warnings
    # and errors, marked with their rank, so N processes do not print every line N times.
    rank = os.environ.get("RANK", "0")
    prefix = "" if rank == "0" else f"[rank {rank}] "
    logging.basicConfig(level=logging.INFO, format=f"{prefix}%(message)s", handlers=[handler], force=True)
    quiet = rank != "0" and not verbose
    log.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    for noisy in ("transformers", "datasets", "accelerate", "peft", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _load(config: Path, extra: list[str]):
    from tuneforge.config import load

    return load(config, extra)


@app.command(context_settings=EXTRA)
def validate(ctx: typer.Context, config: Path) -> None:
    """Check the config and print it fully resolved (defaults filled in), or list every problem."""
    import yaml

    from tuneforge.config import dump
    from tuneforge.methods import get_objective

    cfg = _load(config, ctx.args)
    from tuneforge.methods.rewards import without_importing

    # The method's own checks too (GRPO batch geometry, reward modules present, ...); no model loads and no
    # user code runs (reward modules are located, not imported: training imports them).
    with without_importing():
        get_objective(cfg).close()
    typer.echo(yaml.safe_dump(dump(cfg), sort_keys=False))
    typer.secho(f"{config}: valid", fg="green", err=True)


@app.command(context_settings=EXTRA)
def preprocess(
    ctx: typer.Context,
    config: Path,
    debug: bool = typer.Option(False, "--debug", help="Show decoded samples with their label masks."),
    debug_num_examples: int = typer.Option(1, "--debug-num-examples", help="How many samples --debug shows."),
    debug_text_only: bool = typer.Option(False, "--debug-text-only", help="With --debug: text only, no token ids."),
) -> None:
    """Tokenize, mask and cache the datasets; print a summary (and masks with --debug)."""
    from tuneforge.data.preprocess import run
    from tuneforge.methods import get_objective

    cfg = _load(config, ctx.args)
    objective = get_objective(cfg)  # every method prepares its data itself, as `train` does
    try:
        run(cfg, debug=debug, num_examples=debug_num_examples, text_only=debug_text_only, objective=objective)
    finally:
        objective.close()


@app.command(context_settings=EXTRA)
def train(
    ctx: typer.Context,
    config: Path,
    num_processes: int | None = typer.Option(
        None, "--num-processes", help="Processes on this machine (default: one per visible GPU)."),
    nnodes: int = typer.Option(1, "--nnodes", help="Machines in the run (start the same command on each)."),
    node_rank: int = typer.Option(0, "--node-rank", help="This machine's index, 0 .. nnodes-1."),
    rdzv_endpoint: str | None = typer.Option(
        None, "--rdzv-endpoint", help="HOST:PORT of node 0, where the processes meet (several machines)."),
) -> None:
    """Train as the config describes (SFT, LoRA/QLoRA, preference or RL methods); on several GPUs it starts
    one process per GPU itself."""
    from tuneforge.distributed import launch as launcher

    options = launcher.LaunchOptions(num_processes, nnodes, node_rank, rdzv_endpoint)
    if launcher.should_launch(options):
        _load(config, ctx.args)  # a bad config fails once, here, not in every worker
        raise SystemExit(launcher.launch(options, ["train", str(config), *ctx.args]))
    from tuneforge.engine.run import train as run_train

    run_train(_load(config, ctx.args), argv=sys.argv)


@app.command(context_settings=EXTRA)
def plan(
    ctx: typer.Context,
    config: Path,
    gpus: int = typer.Option(1, "--gpus", min=1, help="GPUs the run uses (FSDP2 divides the sharded parts by it)."),
    gpu_memory: str = typer.Option("80GiB", "--gpu-memory", help="Memory of one GPU, e.g. 80GiB, 24GB."),
    model_config: str | None = typer.Option(
        None, "--model-config", help="A config.json, or a shipped shape (llama-3.2-1b, llama-3.1-8b, llama-3.1-70b, "
        "qwen2.5-7b), instead of base_model's config."),
) -> None:
    """Per-GPU memory of the training run by part (no GPU, no weights loaded), whether it fits, and the
    cheapest settings that make it fit."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read configs from local folders or the HF cache, never download
    from tuneforge.planner import parse_size
    from tuneforge.planner import plan as make_plan

    memory = parse_size(gpu_memory)
    typer.echo(make_plan(_load(config, ctx.args), gpus=gpus, gpu_memory=memory, model=model_config).text())


@app.command(context_settings=EXTRA)
def inference(
    ctx: typer.Context,
    config: Path,
    lora_model_dir: str | None = typer.Option(None, "--lora-model-dir", help="Adapter folder (default: output_dir)."),
    base_model: str | None = typer.Option(None, "--base-model", help="Override base_model."),
    prompt: str | None = typer.Option(None, "--prompt", help="One-shot prompt (default: read stdin)."),
    chat: bool = typer.Option(False, "--chat", help="Interactive multi-turn chat."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 means greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
) -> None:
    """Generate with the trained model, using the training-time chat template."""
    from tuneforge.inference import run

    run(
        _load(config, ctx.args),
        lora_model_dir=lora_model_dir,
        base_model=base_model,
        prompt=prompt,
        chat=chat,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
    )


@app.command("merge-lora", context_settings=EXTRA)
def merge_lora(
    ctx: typer.Context,
    config: Path,
    lora_model_dir: str | None = typer.Option(None, "--lora-model-dir", help="Adapter folder (default: output_dir)."),
    output: str | None = typer.Option(None, "--output", help="Destination (default: output_dir/merged)."),
    dequant: bool = typer.Option(False, "--dequant", help="Allow merging a QLoRA adapter into a dequantized base."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous merge's files in a non-empty "
                                   "destination (files tuneforge did not write are never touched)."),
) -> None:
    """Merge a LoRA adapter into its base model, shard by shard."""
    from tuneforge.merge import run

    run(_load(config, ctx.args), lora_model_dir=lora_model_dir, output=output, dequant=dequant, overwrite=overwrite)


@app.command("vllm-serve", context_settings=EXTRA)
def vllm_serve(
    ctx: typer.Context,
    config: Path,
    engine: str = typer.Option("vllm", "--engine", help="vllm (needs vllm installed) or embedded (tuneforge's engine)."),
    host: str | None = typer.Option(None, "--host", help="Listen address (default: vllm.host, 0.0.0.0)."),
    port: int | None = typer.Option(None, "--port", help="Port (default: vllm.port, 8000)."),
) -> None:
    """Serve generation for `trl.use_vllm` training over TRL's vllm-serve protocol (experimental)."""
    from tuneforge.rollout.generation_server import serve

    serve(_load(config, ctx.args), engine=engine, host=host, port=port)


@app.command()
def fetch(
    what: str = typer.Argument(..., help="examples, docs or deepspeed_configs"),
    dest: Path | None = typer.Option(None, "--dest", help="Destination folder (default: ./<what>)."),
) -> None:
    """Copy the example configs or the docs shipped with tuneforge (no network needed)."""
    from tuneforge.fetch import run

    run(what, dest)


def main() -> None:
    verbose = os.environ.get("TUNEFORGE_DEBUG") == "1"
    _setup_logging(verbose)
    try:
        app()
    except TuneforgeError as exc:
        if verbose:
            raise
        typer.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted", fg="yellow", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
