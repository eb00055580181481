"""Opt-in live-tensor accounting: a memory peak where no allocator counts one.

PyTorch's CPU allocator keeps no statistics, so on the CPU the default mode
measures each category exactly but cannot say how high memory went at once
(temporaries included). This mode sees every tensor an operator creates, via
``torch.utils._python_dispatch.TorchDispatchMode`` (the mechanism of
``torch.utils.flop_counter``), counts the bytes of each new storage once, and
takes them off when the storage dies (a ``weakref.finalize`` on the storage).
The running sum's maximum is the live-tensor peak.

It costs a Python call per operator, which is why it is opt-in
(``profile(..., live_peak=True)``, ``--live-peak``); the default mode reads
cheap counters only.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LiveTensorCounter"]


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return storage if storage.data_ptr() else None


class LiveTensorCounter(TorchDispatchMode):
    """Bytes of tensors created since it was entered and still alive; their peak.

    Outputs that share storage with an input (views, in-place updates such as
    the optimizer's ``param.add_``) are not new memory and are not counted.
    Memory that existed before (weights, gradients and optimizer state from
    earlier steps) is the caller's baseline.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = None
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = _storage(t)
            if storage is None:
                continue
            ptr = storage.data_ptr()
            if ptr in self._sizes:
                continue
            if inputs is None:
                inputs = {
                    s.data_ptr()
                    for a in tree_leaves((args, kwargs))
                    if isinstance(a, torch.Tensor) and (s := _storage(a)) is not None
                }
            if ptr in inputs:
                continue
            size = storage.nbytes()
            self._sizes[ptr] = size
            self.live += size
            if self.live > self.peak:
                self.peak = self.live
            weakref.finalize(storage, self._freed, ptr)
        return out

    def _freed(self, ptr: int) -> None:
        self.live -= self._sizes.pop(ptr, 0)

    def restart_peak(self) -> int:
        """Start a new peak from what is alive now (a phase boundary); returns the old peak."""
        old, self.peak = self.peak, self.live
        return old
