"""Stopping a run cleanly: SIGINT / SIGTERM and the ``max_minutes`` deadline become flags the training loop reads
at step boundaries, where it writes a checkpoint and returns (the run resumes exactly)."""

from __future__ import annotations

import signal
import sys
import threading
import time
from contextlib import contextmanager

__all__ = ["StopFlag"]


class StopFlag:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint at the next step boundary and returns.
    ``max_minutes`` (optional) is a deadline checked the same way.

    ``announce``: print the one-line notice (torchrun sends the signal to every rank; only the
    main rank says so).
    """

    def __init__(self, announce: bool = True, max_minutes: float | None = None) -> None:
        self.signal: int | None = None
        self.announce = announce
        self.deadline = time.monotonic() + 60 * max_minutes if max_minutes else None

    def raised(self) -> tuple[bool, bool]:
        """(a signal arrived, the deadline has passed): the flags every rank agrees on."""
        return self.signal is not None, self.deadline is not None and time.monotonic() >= self.deadline

    def __call__(self, signum, frame) -> None:
        if self.signal is not None:  # second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        self.signal = signum
        if self.announce:
            print(f"\nsignal {signal.Signals(signum).name}: saving a checkpoint and stopping after this step",
                  file=sys.stderr)

    @contextmanager
    def installed(self):
        """The handlers for SIGINT and SIGTERM while the block runs (the main thread only: Python delivers
        signals there), the previous ones afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)
