"""This machine's memory, and whether FSDP2 offload fits in it (used by the report and by train's hook)."""

from __future__ import annotations


def host_memory() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def host_shortfall(estimate, available: int | None = None) -> str | None:
    """A message when FSDP2 offload needs more CPU memory on this machine than it has."""
    s = estimate.settings
    if not s.offload:
        return None
    available = available if available is not None else host_memory()
    need = min(s.gpus, 8) * estimate.host  # the processes of one machine
    if not available or need <= available:
        return None
    return (f"fsdp_config.offload_params: the offloaded weights, gradients and optimizer states need about "
            f"{need / 2**30:.1f} GiB of CPU memory on this machine, which has {available / 2**30:.1f} GiB; spread "
            "the run over more machines, or use adapter: lora")
