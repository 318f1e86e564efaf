"""Every process of a run must see the same output_dir.

The first process writes the run's claim file and the checkpoints' shared parts; under FSDP2 every
process writes its own shards into the same checkpoint folder, and a resume reads all of them back. On
several machines that only works when output_dir is on a filesystem they all mount (NFS, Lustre, ...).
A local folder of the same name on each machine would let the run train for hours and then leave
checkpoints that no machine can resume from; this check fails at the start instead, naming the machines.
"""

from __future__ import annotations

import socket
from pathlib import Path

from tuneforge.errors import TuneforgeError

from . import collectives


class OutputNotShared(TuneforgeError):
    pass


def check_same_file(marker: Path) -> None:
    """All processes read `marker` (written by the first process just before); raise on every process when
    some of them see other contents or none."""
    if collectives.world_size() == 1:
        return
    collectives.barrier()  # the first process has written the marker
    views = collectives.gather_objects((socket.gethostname(), _read(marker)))
    problem = mismatch(views, marker.parent)
    if problem:
        raise OutputNotShared(problem)


def mismatch(views: list[tuple[str, str | None]], folder: Path) -> str | None:
    """The error message when the processes' views (host, contents) differ from the first process's."""
    host0, expected = views[0]
    blind = sorted({host for host, seen in views[1:] if seen != expected})
    if not blind:
        return None
    return (f"output_dir {folder} is not shared by every process: the processes on {', '.join(blind)} do not see "
            f"the files written on {host0}. Checkpoints hold shards from every process, and a resume reads them "
            "all: put output_dir on a filesystem every machine mounts at the same path (docs/multi-gpu.md).")


def _read(marker: Path) -> str | None:
    try:
        return marker.read_text()
    except OSError:
        return None
