"""The `tuneforge` command: every subcommand takes the same YAML config plus `--key value` overrides."""

from __future__ import annotations

import logging
import os
import sys
import warnings
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
OVERRIDES = ("\n\nOverrides: any config key as --key value after the config, e.g. --learning-rate 1e-4, "
             "--max-steps 20, --trl.beta 0.1 (nested keys with a dot); --resume-from-checkpoint DIR continues "
             "a run. Exit status 2 is a user error, printed as one line.")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"tuneforge {version('tuneforge')}")
        except PackageNotFoundError:
            typer.echo("tuneforge (not installed as a package)")
        raise typer.Exit()


@app.callback()
def _main(
    _show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print tuneforge's version and exit."),
) -> None:
    pass
log = logging.getLogger("tuneforge")


def _setup_logging(verbose: bool = False) -> None:
    # Logs go to stderr so that a command's results on stdout (validate's YAML, inference's answer) can be
    # piped. On a terminal, rich formats them; piped, each record is one plain line, never wrapped.
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_time=False, show_path=False,
                                               markup=False, rich_tracebacks=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
    # Several processes (torchrun sets RANK): the first one reports progress, the others only their warnings
    # and errors, marked with their rank, so N processes do not print every line N times.
    rank = os.environ.get("RANK", "0")
    prefix = "" if rank == "0" else f"[rank {rank}] "
    level = "" if sys.stderr.isatty() else "%(levelname)s "
    logging.basicConfig(level=logging.INFO, format=f"{prefix}{level}%(message)s", handlers=[handler], force=True)
    quiet = rank != "0" and not verbose
    log.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    for noisy in ("transformers", "datasets", "accelerate", "peft", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        # Deprecation notices of the libraries underneath are for tuneforge's developers, not its users.
        warnings.filterwarnings("ignore", category=FutureWarning)
        _drop_import_notices()


class _DropNotices(logging.Filter):
    def __init__(self, *needles: str):
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.needles)


# (logger, text) of import-time notices from the libraries underneath that concern no run: torchao's compiled
# extensions it cannot load (CUDA kernels on CPU or another torch build) and its Triton check, torch's pytree on
# the enums torchao registers the deprecated way, and bitsandbytes' CPU backend trying an optional kernel from
# the hub (offline here; its own kernel serves). Only those lines are dropped.
IMPORT_NOTICES = (
    ("torchao", "Failed to load"),
    ("torchao.kernel.intmm", "Detected no triton"),
    ("torch.utils._pytree", "is an Enum subclass"),
    ("bitsandbytes.backends.cpu.ops", "from kernels-community"),
    ("kernels._internals.hf_hub", "publisher trust check"),
)


def _drop_import_notices() -> None:
    for name, needle in IMPORT_NOTICES:
        logging.getLogger(name).addFilter(_DropNotices(needle))


def choose_cpu_threads(cores: int, load: float) -> int | None:
    """CPU threads for torch on a machine with `cores` usable cores and a 1-minute load average `load`;
    None keeps torch's default (one per core). A busy or small machine is not oversubscribed: on the 2-core
    machine at load ~4.8, the tiny example trained in 83 s with 1 thread against 237 s with 2."""
    free = cores - round(load)
    return max(1, free) if free < cores else None


def _limit_cpu_threads() -> None:
    if "OMP_NUM_THREADS" in os.environ:
        return  # the user's choice
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = choose_cpu_threads(cores, load)
    if threads is not None:
        # Before torch is imported, so OpenMP starts with this many threads.
        os.environ["OMP_NUM_THREADS"] = str(threads)
        log.info("CPU threads: %d of %d (load average %.1f); set OMP_NUM_THREADS to choose", threads, cores, load)


def _load(config: Path, extra: list[str]):
    from tuneforge.config import load

    return load(config, extra)


@app.command(context_settings=EXTRA, help="Check the config and everything that does not need the model "
             "(dataset types, data files and their first rows, chat template names, cross-field rules); print "
             "the config fully resolved on stdout, notes and problems on stderr." + OVERRIDES)
def validate(ctx: typer.Context, config: Path = typer.Argument(..., help="The YAML config.")) -> None:
    import yaml

    from tuneforge.config import ConfigError, ConfigIssue, dump
    from tuneforge.data.validate_rows import check_without_model
    from tuneforge.methods import get_objective

    cfg = _load(config, ctx.args)
    from tuneforge.methods.rewards import without_importing

    issues = []
    try:
        check_without_model(cfg)
    except ConfigError as exc:
        issues += exc.issues
    # The method's own checks too (GRPO batch geometry, reward modules present, ...); no model loads and no
    # user code runs (reward modules are located, not imported: training imports them).
    try:
        with without_importing():
            get_objective(cfg).close()
    except ConfigError as exc:
        issues += exc.issues
    except TuneforgeError as exc:
        if not issues:
            raise
        issues.append(ConfigIssue("", str(exc)))
    if issues:
        raise ConfigError(issues)  # every problem at once
    typer.echo(yaml.safe_dump(dump(cfg), sort_keys=False))
    notes = f" ({len(cfg.notes)} note(s) above)" if cfg.notes else ""
    typer.secho(f"{config}: valid{notes}", fg="green", err=True)


@app.command(context_settings=EXTRA, help="Tokenize, mask and cache the datasets; print a summary (and masks "
             "with --debug)." + OVERRIDES)
def preprocess(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="The YAML config."),
    debug: bool = typer.Option(False, "--debug", help="Show decoded samples with their label masks."),
    debug_num_examples: int = typer.Option(1, "--debug-num-examples", help="How many samples --debug shows."),
    debug_text_only: bool = typer.Option(False, "--debug-text-only", help="With --debug: text only, no token ids."),
) -> None:
    from tuneforge.data.preprocess import run
    from tuneforge.methods import get_objective

    logging.getLogger("tuneforge").addFilter(_CacheLineFilter())  # the summary says where the data is
    cfg = _load(config, ctx.args)
    objective = get_objective(cfg)  # every method prepares its data itself, as `train` does
    try:
        run(cfg, debug=debug, num_examples=debug_num_examples, text_only=debug_text_only, objective=objective)
    finally:
        objective.close()


class _CacheLineFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("prepared data saved to", "reusing prepared data from"))


@app.command(context_settings=EXTRA, help="Train as the config describes (SFT, LoRA/QLoRA, preference or RL "
             "methods); on several GPUs it starts one process per GPU itself." + OVERRIDES)
def train(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="The YAML config."),
    num_processes: int | None = typer.Option(
        None, "--num-processes", help="Processes on this machine (default: one per visible GPU)."),
    nnodes: int = typer.Option(1, "--nnodes", help="Machines in the run (start the same command on each)."),
    node_rank: int = typer.Option(0, "--node-rank", help="This machine's index, 0 .. nnodes-1."),
    rdzv_endpoint: str | None = typer.Option(
        None, "--rdzv-endpoint", help="HOST:PORT of node 0, where the processes meet (several machines)."),
) -> None:
    from tuneforge.distributed import launch as launcher

    options = launcher.LaunchOptions(num_processes, nnodes, node_rank, rdzv_endpoint)
    if launcher.should_launch(options):
        _load(config, ctx.args)  # a bad config fails once, here, not in every worker
        raise SystemExit(launcher.launch(options, ["train", str(config), *ctx.args]))
    from tuneforge.engine.run import train as run_train

    run_train(_load(config, ctx.args), argv=sys.argv)


@app.command(context_settings=EXTRA, help="Per-GPU memory of the training run by part (no GPU, no weights "
             "loaded), whether it fits, and the cheapest settings that make it fit." + OVERRIDES)
def plan(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="The YAML config."),
    gpus: int = typer.Option(1, "--gpus", min=1, help="GPUs the run uses (FSDP2 divides the sharded parts by it)."),
    gpu_memory: str = typer.Option("80GiB", "--gpu-memory", help="Memory of one GPU, e.g. 80GiB, 24GB."),
    model_config: str | None = typer.Option(
        None, "--model-config", help="A config.json, or a shipped shape (llama-3.2-1b, llama-3.1-8b, llama-3.1-70b, "
        "qwen2.5-7b), instead of base_model's config."),
) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read configs from local folders or the HF cache, never download
    from tuneforge.planner import parse_size
    from tuneforge.planner import plan as make_plan

    memory = parse_size(gpu_memory)
    typer.echo(make_plan(_load(config, ctx.args), gpus=gpus, gpu_memory=memory, model=model_config).text())


@app.command(context_settings=EXTRA, help="Generate with the trained model, using the training-time chat "
             "template; the answer goes to stdout, logs to stderr." + OVERRIDES)
def inference(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="The YAML config."),
    lora_model_dir: str | None = typer.Option(None, "--lora-model-dir", help="Adapter folder (default: output_dir)."),
    base_model: str | None = typer.Option(None, "--base-model", help="Override base_model."),
    prompt: str | None = typer.Option(None, "--prompt", help="One-shot prompt (default: read stdin)."),
    chat: bool = typer.Option(False, "--chat", help="Interactive multi-turn chat."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Most tokens generated per answer."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 means greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling: keep the smallest set of tokens whose "
                                "probability reaches this (1: all)."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0: no limit)."),
) -> None:
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


@app.command("merge-lora", context_settings=EXTRA, help="Merge a LoRA adapter into its base model, shard by "
             "shard." + OVERRIDES)
def merge_lora(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="The YAML config."),
    lora_model_dir: str | None = typer.Option(None, "--lora-model-dir", help="Adapter folder (default: output_dir)."),
    output: str | None = typer.Option(None, "--output", help="Destination (default: output_dir/merged)."),
    dequant: bool = typer.Option(False, "--dequant", help="Allow merging a QLoRA adapter into a dequantized base."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous merge's files in a non-empty "
                                   "destination (files tuneforge did not write are never touched)."),
) -> None:
    from tuneforge.merge import run

    run(_load(config, ctx.args), lora_model_dir=lora_model_dir, output=output, dequant=dequant, overwrite=overwrite)


@app.command(context_settings=EXTRA, help="Write output_dir/quantized: the trained model with torchao int4/int8 "
             "weights, as the config's `quantization:` block (or `qat:`) says." + OVERRIDES)
def quantize(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="The YAML config."),
    model: str | None = typer.Option(None, "--model", help="Model folder to quantize (default: output_dir)."),
) -> None:
    from tuneforge.models.ptq import for_config

    typer.echo(f"quantized model written to {for_config(_load(config, ctx.args), model)}")


@app.command("vllm-serve", context_settings=EXTRA, help="Serve generation for `trl.use_vllm` training over "
             "TRL's vllm-serve protocol (experimental)." + OVERRIDES)
def vllm_serve(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="The YAML config."),
    engine: str = typer.Option("vllm", "--engine", help="vllm (needs vllm installed) or embedded (tuneforge's engine)."),
    host: str | None = typer.Option(None, "--host", help="Listen address (default: vllm.host, 0.0.0.0)."),
    port: int | None = typer.Option(None, "--port", help="Port (default: vllm.port, 8000)."),
) -> None:
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
    _limit_cpu_threads()
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
