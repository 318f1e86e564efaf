"""SIGINT/SIGTERM: finish the current step, save a checkpoint, tell the user how to resume.

The first signal only sets a flag that the loop checks between optimizer steps. A second signal aborts
at once (KeyboardInterrupt), for when saving is not wanted or hangs.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("tuneforge")


class TrainingInterrupted(Exception):
    """Raised by the loop after the checkpoint of an interrupted run is written."""

    def __init__(self, signum: int, checkpoint, step: int):
        self.signum = signum
        self.checkpoint = checkpoint
        self.step = step
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}")


class StopFlag:
    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # second signal: abort without saving
        self.signum = signum
        log.warning("received %s: finishing the current step, then saving a checkpoint "
                    "(send it again to abort without saving)", signal.Signals(signum).name)

    @property
    def requested(self) -> bool:
        return self.signum is not None
