"""How many times this process's lineage forked since we were imported.

Hooks and the sampler's reads run at every module call or phase, so their
check for a forked child (a DataLoader worker, where hooks must do nothing
and the parent's open files describe the parent) must be cheap: comparing
this count with the one seen at start costs about a tenth of an
``os.getpid()`` system call (which glibc no longer caches).
"""

from __future__ import annotations

import os

__all__ = ["PROCESS"]


class _Process:
    forks = 0


PROCESS = _Process()


def _after_fork_in_child() -> None:
    PROCESS.forks += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
