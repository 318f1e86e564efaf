"""Starting the processes of a run: `tuneforge train` launches itself on every visible GPU.

A run that is not already under a launcher (torchrun / accelerate launch set `LOCAL_RANK`) and either
sees several GPUs or was given `--num-processes` / `--nnodes` becomes the agent of PyTorch's elastic
launcher (`torch.distributed.run`, used as a library): it starts one worker per process, each running
the same `tuneforge train` command, and returns the workers' outcome. Several machines: start the same
command on each with `--nnodes`, its own `--node-rank` and one `--rdzv-endpoint host:port`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from tuneforge.errors import TuneforgeError


@dataclass
class LaunchOptions:
    num_processes: int | None = None  # per node; default: visible GPUs (1 without GPUs)
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # host:port of node 0; default localhost with a free port


def under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ or "RANK" in os.environ


def processes_per_node(options: LaunchOptions) -> int:
    if options.num_processes is not None:
        return options.num_processes
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def should_launch(options: LaunchOptions) -> bool:
    """True when this command must start the workers (rather than train in this process)."""
    if under_launcher():
        return False
    return processes_per_node(options) > 1 or options.nnodes > 1


def launcher_args(options: LaunchOptions, command: list[str]) -> list[str]:
    """torch.distributed.run's arguments for `command` (the tuneforge arguments after `tuneforge`)."""
    nproc = processes_per_node(options)
    if nproc < 1 or options.nnodes < 1 or not 0 <= options.node_rank < options.nnodes:
        raise TuneforgeError(f"--num-processes {nproc}, --nnodes {options.nnodes}, --node-rank {options.node_rank}: "
                             "need at least one process and node, and 0 <= node rank < nodes")
    args = [f"--nproc_per_node={nproc}", f"--nnodes={options.nnodes}"]
    if options.nnodes > 1:
        if not options.rdzv_endpoint:
            raise TuneforgeError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (node 0's address, the same on "
                                 "every node)")
        args += [f"--node_rank={options.node_rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint={options.rdzv_endpoint}"]
    elif options.rdzv_endpoint:
        args += ["--rdzv_backend=c10d", f"--rdzv_endpoint={options.rdzv_endpoint}"]
    else:
        args += ["--standalone"]  # one machine: a local rendezvous on a free port
    return [*args, "-m", "tuneforge.cli", *command]


def launch(options: LaunchOptions, command: list[str]) -> int:
    """Run `tuneforge COMMAND` in every process of the run; returns the exit status for this command."""
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(launcher_args(options, command))
    try:
        run(args)
    except Exception as exc:  # ChildFailedError: the workers printed their own errors
        failures = getattr(exc, "failures", {}) or {}
        codes = [getattr(f, "exitcode", 1) for f in failures.values()]
        code = next((c for c in codes if c and c > 0), 1)
        print(f"tuneforge: {len(failures) or 'a'} worker process(es) failed (exit status {code}); their messages "
              "are above", file=sys.stderr)
        return code
    return 0
