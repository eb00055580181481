"""SIGTERM as Ctrl-C is handled: the report is written, then the process dies of the signal.

A scheduler's time limit (Slurm, Kubernetes, ``timeout``) sends SIGTERM, and
plain Python dies of it at once, silently. Under the runner that would lose
the report of everything measured so far. While the script and the batch
sweep run, SIGTERM raises ``Terminated`` instead (a ``BaseException``, like
``KeyboardInterrupt``, so the script's ``except Exception`` does not swallow
it); while the report is written it is only remembered. Afterwards the
process ends by the same signal, so its exit status is what it would have
been (143 in a shell). A script that installs its own SIGTERM handler keeps
it: ours is then never called.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from types import FrameType

__all__ = ["Terminated", "TerminationGuard"]


class Terminated(BaseException):
    """SIGTERM arrived while the script (or a batch-sweep child) ran."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


class TerminationGuard:
    """``with TerminationGuard() as guard:`` SIGTERM raises ``Terminated`` until ``guard.defer()``."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._raising = True
        self._previous: object = None
        self._installed = False

    def __enter__(self) -> TerminationGuard:
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        if self._raising:
            raise Terminated(signum)

    def defer(self) -> None:
        """From now on SIGTERM is remembered, not raised (the report is being written)."""
        self._raising = False

    def __exit__(self, *exc: object) -> None:
        if self._installed and signal.getsignal(signal.SIGTERM) == self._handle:
            signal.signal(signal.SIGTERM, self._previous)
        self._installed = False

    def die_if_terminated(self) -> None:
        """End the process by the signal received, as Python would have ended on it."""
        if self.received is None:
            return
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        signal.signal(self.received, signal.SIG_DFL)
        os.kill(os.getpid(), self.received)
