"""Find the models a script builds and calls, without touching the script.

A model is a module that is *called from outside any other module* and owns
parameters. Two global hooks (the mechanism of ``torch.utils.module_tracker``)
keep a per-thread nesting depth; a call at depth 0 is a root call. Each new
root is reported to a callback once, with the call's positional arguments, so the caller can analyse it or start
measuring it on its first forward.

The hooks cost one dict lookup per module call and are removed by ``close()``
(also on exceptions: use it as a context manager). In a forked child (a
DataLoader worker) they do nothing, so workers never report.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.nn.parameter import is_lazy

__all__ = ["ModelWatcher"]


class ModelWatcher:
    """Watch every ``nn.Module`` call and collect the root modules with parameters.

    >>> with ModelWatcher() as watcher:
    ...     train()
    >>> watcher.models  # [model, ...] in order of first call
    """

    def __init__(self, on_new_model: Callable[[nn.Module, tuple], None] | None = None) -> None:
        self._on_new_model = on_new_model
        self._pid = os.getpid()
        self._local = threading.local()
        # Weak references only: a script that builds a model per fold or per
        # trial and drops it must get its memory back. (Sets of ids would also
        # mistake a new module for a freed one whose id Python reused.)
        self._seen: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._models: list[weakref.ref[nn.Module]] = []
        self._inside_models: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # every module of every model found
        self._lazy_called: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # called once with lazy parameters
        self._handles: list = []

    # Hooks ------------------------------------------------------------------
    def _pre(self, module: nn.Module, args: object) -> None:
        if os.getpid() != self._pid:
            return
        depth = getattr(self._local, "depth", 0)
        self._local.depth = depth + 1
        if depth == 0 and module not in self._seen:
            if torch._C._current_graph_task_id() != -1:
                return  # backward recomputing checkpointed blocks: not a model of its own
            if module not in self._lazy_called and any(is_lazy(p) for p in module.parameters()):
                # A lazy module gets its shapes in this first forward: found at its
                # next call (with shapes, except in parts that did not run).
                self._lazy_called.add(module)
                return
            self._seen.add(module)
            if module in self._inside_models:
                return  # a part of a model already found, called on its own
            if any(True for _ in module.parameters()):
                self._models.append(weakref.ref(module))
                self._inside_models.update(module.modules())
                if self._on_new_model is not None:
                    self._on_new_model(module, args)

    def _post(self, module: nn.Module, args: object, output: object) -> None:
        if os.getpid() != self._pid:
            return
        self._local.depth = max(getattr(self._local, "depth", 1) - 1, 0)

    # Lifecycle ---------------------------------------------------------------
    def start(self) -> "ModelWatcher":
        if not self._handles:
            self._handles = [
                module_hooks.register_module_forward_pre_hook(self._pre),
                # always_call: the depth must come back down when a forward raises.
                module_hooks.register_module_forward_hook(self._post, always_call=True),
            ]
        return self

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "ModelWatcher":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def models(self) -> list[nn.Module]:
        """Root models still alive, in order of first call, a submodule called on its own left out."""
        return outermost([m for ref in self._models if (m := ref()) is not None])


def outermost(candidates: list[nn.Module]) -> list[nn.Module]:
    """Drop every candidate that is a submodule of another candidate."""
    inner: set[int] = set()
    for m in candidates:
        for sub in m.modules():
            if sub is not m:
                inner.add(id(sub))
    unique, seen = [], set()
    for m in candidates:
        if id(m) not in inner and id(m) not in seen:
            seen.add(id(m))
            unique.append(m)
    return unique
