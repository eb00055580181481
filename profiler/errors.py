"""Errors that reach the user as one line, and the guard that keeps ours out of their training.

Anything raised as a ``ProfilerError`` is our own word about bad input; the
command line prints ``profiler: error: <message>`` and exits with ``exit_code``
instead of showing a traceback from our internals (as memray's
``MemrayCommandError`` does).

``guarded`` is the other half of that promise: a hook of ours that fails
inside the user's forward, backward or optimizer step must not raise there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

__all__ = ["ProfilerError", "guarded"]


class ProfilerError(Exception):
    """A problem with what the user gave us, explained in one line."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def guarded(method: Callable) -> Callable:
    """Run a hook method so that a failure of ours never stops the user's training.

    The error goes to the object's ``fail(where, exc)`` (the tracker notes it
    and stops measuring) and the hook returns None. Only observations are
    guarded: what autograd needs back from a pack or unpack hook is produced
    outside them.
    """

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any) -> Any:
        try:
            return method(self, *args)
        except Exception as exc:  # noqa: BLE001 - reported, never raised into the training loop
            self.fail(method.__name__, exc)
            return None

    return wrapper
