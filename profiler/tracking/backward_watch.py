"""Seeing backward reach a forward's output, and seeing that output's graph die unused.

A prehook on each autograd node a root forward returned tells when a
backward pass reaches that forward (which forwards a pass goes through is
what tells views of one loss from micro-batches, and a kept probe from the
step). Autograd nodes take no weak references: a token kept alive by the
hook's closure on the node dies with the node, which tells that the graph was
freed.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from .step_record import ForwardSaves

__all__ = ["OutputWatch"]


class _Prehook:
    """Our prehook on one output node: tells ``reached(forward)``; a weak reference to it dies with the node.

    One object is both the hook and the token (a closure and a token of its
    own were two objects made per output, at every forward).
    """

    __slots__ = ("__weakref__", "forward", "reached")

    def __init__(self, reached: Callable[[ForwardSaves], None], forward: ForwardSaves) -> None:
        self.reached, self.forward = reached, forward

    def __call__(self, grad_outputs: Any) -> None:
        # (kept on the node, not removed once run: a graph retained for another
        # backward call, retain_graph=True, is a backward pass each time)
        self.reached(self.forward)


class OutputWatch:
    """Prehooks on forwards' output nodes, calling ``reached(forward)`` each time backward runs them."""

    def __init__(self, reached: Callable[[ForwardSaves], None]) -> None:
        self._reached = reached
        self._hooks: list[tuple[weakref.ref, Any]] = []  # (token, handle) of our prehooks on output nodes
        self._pruned = 0  # how many were left after the last pruning

    def watch(self, fn: torch.autograd.graph.Node, forward: ForwardSaves) -> weakref.ref:
        """Watch ``fn``, an output node of ``forward``; a weak reference that dies with ``fn``."""
        hook = _Prehook(self._reached, forward)
        handle = fn.register_prehook(hook)
        ref = weakref.ref(hook)
        self._hooks.append((ref, handle))
        if len(self._hooks) > 2 * self._pruned + 64:  # (a model that never trains runs all along)
            self._hooks = [(r, h) for r, h in self._hooks if r() is not None]
            self._pruned = len(self._hooks)
        return ref

    def remove(self) -> None:
        """Remove the prehooks on graphs still alive (a probe's output the script kept)."""
        for _, handle in self._hooks:
            handle.remove()
        self._hooks = []
