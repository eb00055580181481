"""The process's resident set size, read as cheaply as the platform allows.

The sampler reads RSS at every tick and at each new phase of every step (a
step's forward, backward and optimizer step each take one reading), so the
read sits on a small model's critical path. ``psutil.Process().memory_info()``
opens, reads and closes ``/proc/<pid>/statm`` each time: 15 us on an idle
process and 40-50 us between a training step's kernels, about 5% of a tiny
model's 2.5 ms step at three reads a step. On Linux the same file is kept
open here and re-read with ``os.pread`` at offset 0, which makes the kernel
generate it afresh (about 1 us); its second field is the resident pages, the
figure psutil's ``rss`` is made from. Elsewhere (and in a forked child, where
the open file would still describe the parent) psutil is asked. A fork is
told by ``process.PROCESS``, not by ``os.getpid()``: that is a system call of
its own at every read (glibc no longer caches the pid), and timed in place on
a tiny model's step it cost more than the read itself.
"""

from __future__ import annotations

import os

import psutil

from .process import PROCESS

__all__ = ["HostRss", "rss_source"]

_STATM = "/proc/self/statm"
_FROM_STATM = "rss from /proc/self/statm (psutil's figure)"
_FROM_PSUTIL = "psutil rss"


def rss_source() -> str:
    """Where ``HostRss`` would read from here (before one is made)."""
    return _FROM_STATM if os.path.exists(_STATM) else _FROM_PSUTIL


class HostRss:
    """Reads this process's RSS in bytes; ``close()`` releases the open file."""

    def __init__(self) -> None:
        self._forks = PROCESS.forks
        self._proc = psutil.Process()
        self._fd: int | None = None
        self._page = 0
        try:
            self._fd = os.open(_STATM, os.O_RDONLY)
            self._page = os.sysconf("SC_PAGE_SIZE")
            int(os.pread(self._fd, 256, 0).split()[1])  # the format is the one expected
        except (OSError, ValueError, IndexError, AttributeError):
            self.close()
        # Where the figure comes from, for the report's ``sources``.
        self.source = _FROM_STATM if self._fd is not None else _FROM_PSUTIL

    def read(self) -> int:
        """Resident bytes now."""
        fd = self._fd
        if PROCESS.forks != self._forks:  # a forked child: its own figure, not the parent's
            return int(psutil.Process().memory_info().rss)
        if fd is not None:
            return int(os.pread(fd, 256, 0).split()[1]) * self._page
        return int(self._proc.memory_info().rss)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
