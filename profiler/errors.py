"""Errors that reach the user as one line, as memray's ``MemrayCommandError`` does.

Anything raised as a ``ProfilerError`` is our own word about bad input; the
command line prints ``profiler: error: <message>`` and exits with ``exit_code``
instead of showing a traceback from our internals.
"""

from __future__ import annotations

__all__ = ["ProfilerError"]


class ProfilerError(Exception):
    """A problem with what the user gave us, explained in one line."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
