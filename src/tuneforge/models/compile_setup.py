"""`torch_compile`: whether the transformer blocks are compiled, where the compiler's caches live, and the
compilation itself.

- **Caches.** Inductor's FX-graph cache and AOTAutograd's cache are on by default in the torch versions
  tuneforge runs on (2.11 and 2.13: `torch._inductor.config.fx_graph_cache` and
  `torch._functorch.config.enable_autograd_cache` default to True), so they are left alone; a user's
  `TORCHINDUCTOR_FX_GRAPH_CACHE=0` / `TORCHINDUCTOR_AUTOGRAD_CACHE=0` still turns them off. What torch does
  not give is a lasting place: its default folder is `<tmp>/torchinductor_<user>`, which a reboot or a fresh
  container empties, so every run compiled from scratch. With `torch_compile` true or auto on CUDA,
  `compile_cache_dir` points `TORCHINDUCTOR_CACHE_DIR` at `$XDG_CACHE_HOME/tuneforge/inductor`
  (`~/.cache/...`) unless it is set already (Triton's kernels go there too).
- **`torch_compile: auto`.** Compile only where it pays: a CUDA device, a model of at least `MIN_PARAMETERS`
  and, when `max_steps` is set, at least `MIN_STEPS` steps; never in a mode that cannot run compiled
  (EBFT strided, selective checkpointing). `choose` is that rule as a pure function; `compile_blocks` logs its answer in one line.
- **One compilation.** The packed batch's document boundaries are marked dynamic before the first batch,
  so the blocks are not compiled a second time at step 2 (`mark_packed_boundaries_dynamic`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tuneforge.config.schema import Config

log = logging.getLogger("tuneforge")

# The compile warm-up costs tens of seconds (docs/benchmarks.md: ~40 s for the 8B LoRA blocks cold); the
# per-step gain grows with the model (1B full FT: 0.38 -> 0.27 s per 16K-token step, 8B LoRA: 1.17 -> 0.77 s
# per 8K). Below ~0.4B parameters the saving per step is a few milliseconds and the warm-up rarely comes back;
# a run of fewer than 100 steps does not repay ~40 s even at 8B.
MIN_PARAMETERS = 400_000_000
MIN_STEPS = 100


@dataclass(frozen=True)
class CompileChoice:
    compile: bool
    reason: str


def choose(want: bool | str, *, cuda: bool, parameters: int, max_steps: int | None,
           strided_ebft: bool, selective_checkpointing: bool = False) -> CompileChoice:
    """Compile or not for `torch_compile: want` (True, False or "auto"), and why."""
    if want is False:
        return CompileChoice(False, "torch_compile: false")
    if not cuda:
        return CompileChoice(False, "no CUDA device (tuneforge compiles the blocks for CUDA only)")
    if strided_ebft:  # `torch_compile: true` is refused there before anything loads
        return CompileChoice(False, "EBFT strided mode would recompile its masked forward per document")
    if selective_checkpointing:  # `torch_compile: true` is refused with it before anything loads
        return CompileChoice(False, "selective_checkpointing chooses op by op, which a compiled block hides")
    if want is True:
        return CompileChoice(True, "torch_compile: true")
    if parameters < MIN_PARAMETERS:
        return CompileChoice(False, f"{parameters / 1e6:,.0f}M parameters, under the {MIN_PARAMETERS / 1e6:,.0f}M "
                             "from which faster steps repay the compile time")
    if max_steps is not None and max_steps < MIN_STEPS:
        return CompileChoice(False, f"max_steps {max_steps} is under the {MIN_STEPS} steps that repay the "
                             "compile time")
    return CompileChoice(True, f"CUDA and {parameters / 1e9:.2f}B parameters")


def config_choice(cfg: Config, model) -> CompileChoice:
    """`choose` for this config and loaded model (parameters counted on the model, adapters included)."""
    from tuneforge.config.methods import varying_block_layout

    return choose(cfg.torch_compile, cuda=torch.cuda.is_available(),
                  parameters=sum(p.numel() for p in model.parameters()), max_steps=cfg.max_steps,
                  strided_ebft=varying_block_layout(cfg),
                  selective_checkpointing=cfg.selective_checkpoint_settings is not None)


def compile_cache_dir(environ=os.environ) -> Path | None:
    """Keep inductor's caches across runs: `TORCHINDUCTOR_CACHE_DIR` as given, else a per-user folder under
    `$XDG_CACHE_HOME` (set in `environ`, so compile workers inherit it). None: torch's default is kept
    (the folder cannot be created)."""
    given = environ.get("TORCHINDUCTOR_CACHE_DIR")
    if given:
        return Path(given)
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(base) / "tuneforge" / "inductor"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("torch_compile: cannot create the compile cache %s (%s); using torch's default", path, exc)
        return None
    environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


def compile_blocks(cfg: Config, model) -> int:
    """torch.compile every transformer block in place (CUDA); returns how many were compiled.

    Blocks rather than the whole model: the blocks share one code object, so one compilation serves
    all of them. The loss's per-chunk softmax-and-gradient step is compiled with dynamic shapes (the
    number of trained positions changes every batch); its matmuls stay eager.
    """
    choice = config_choice(cfg, model)
    # before any compilation of this process: the rollout engine compiles its decode step under `auto` too
    cache = compile_cache_dir() if cfg.torch_compile is not False and torch.cuda.is_available() else None
    if not choice.compile:
        if cfg.torch_compile == "auto":
            log.info("torch_compile: auto -> eager: %s", choice.reason)
        elif cfg.torch_compile is True:
            log.warning("torch_compile: running eagerly: %s", choice.reason)
        return 0
    from tuneforge.models.losses import compile_loss, unwrap_peft

    base = unwrap_peft(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    layers = getattr(decoder, "layers", None)
    if layers is None:
        log.warning("torch_compile: no `layers` list found on %s; running eagerly", type(decoder).__name__)
        return 0
    log.info("torch_compile: %s -> compiling %d blocks (%s); compile cache: %s", cfg.torch_compile, len(layers),
             choice.reason, cache or "torch's default")
    kwargs = {"backend": cfg.torch_compile_backend} if cfg.torch_compile_backend else {}
    if cfg.recompute_elementwise:  # the mode goes to the wrapped backend
        block_kwargs = {"backend": recomputing_backend(cfg.torch_compile_backend, cfg.torch_compile_mode)}
    elif cfg.torch_compile_mode not in (None, "default"):
        block_kwargs = {**kwargs, "mode": cfg.torch_compile_mode}
    else:
        block_kwargs = kwargs
    mark_packed_boundaries_dynamic()
    for layer in layers:
        layer.compile(**block_kwargs)
    compile_loss(**kwargs)
    return len(layers)


# What a packed batch hands every block (models/attention.py `varlen_kwargs`): the documents' boundaries, a
# tensor as long as the document count, and the longest document's length, an int. Both change from batch to
# batch, so dynamo would compile the blocks for the first batch's values and compile them again at the
# second step (cold, that second compilation costs as much as the first) before it treats them as dynamic.
PACKED_BOUNDARY_SOURCES = ("L['kwargs']['cu_seq_lens_q']", "L['kwargs']['cu_seq_lens_k']",
                           "L['kwargs']['max_length_q']", "L['kwargs']['max_length_k']")


def mark_packed_boundaries_dynamic(config=torch.compiler.config) -> None:
    """Name the packed boundaries in torch's dynamic allow list (`TORCH_COMPILE_DYNAMIC_SOURCES`), kept with
    what the user listed there, so the blocks compile once for every batch. Only these inputs become
    dynamic: the rest of a block's graph keeps its static shapes."""
    if not hasattr(config, "dynamic_sources"):  # a torch without the allow list: one recompilation, as before
        return
    listed = [s for s in config.dynamic_sources.split(",") if s]
    config.dynamic_sources = ",".join(listed + [s for s in PACKED_BOUNDARY_SOURCES if s not in listed])


# AOTAutograd's min-cut partitioner keeps an elementwise result for the backward when the backward needs it
# written out (a matmul's input: the normalised layer input, the SiLU product) or when it is used far from
# where it was made; these three of its switches lift those bans, so such results are recomputed from what
# is kept anyway. Matmuls, attention and random ops stay banned from recomputation.
RECOMPUTE_ELEMENTWISE = {"ban_recompute_materialized_backward": False, "ban_recompute_used_far_apart": False,
                         "ban_recompute_long_fusible_chains": False}


def recomputing_backend(backend: str | None = None, mode: str | None = None):
    """A torch.compile backend: `backend` (default inductor, in `mode`) with the partitioner switches of
    RECOMPUTE_ELEMENTWISE set while it compiles (the partition is chosen then), so only the blocks compiled
    with it recompute, and the switches are part of the compile caches' keys."""
    import torch._functorch.config as functorch_config
    from torch._dynamo.backends.registry import lookup_backend

    name = backend or "inductor"
    inner, extra = lookup_backend(name), {}
    if mode not in (None, "default"):  # as torch.compile hands a mode on: inductor's options, else the keyword
        from torch._inductor import list_mode_options

        extra = {"config_patches": list_mode_options(mode)} if name == "inductor" else {"mode": mode}

    def compile_recomputing(gm, example_inputs, **kwargs):
        with functorch_config.patch(RECOMPUTE_ELEMENTWISE):
            return inner(gm, example_inputs, **extra, **kwargs)

    return compile_recomputing
