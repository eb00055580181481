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
cheap counters only. With ``record=True`` it also keeps the allocations and
frees in order (with phase marks): the trace a GPU projection replays through
a model of CUDA's caching allocator (``results/caching_allocator.py``).
Storages are told apart by their identity (``_cdata``), not their address, so
fake tensors (which have no address) are traced as real ones are.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LiveTensorCounter"]

_LIFT_FRESH = torch.ops.aten.lift_fresh.default
# Operators CUDA runs through cuBLAS, whose handle allocates a workspace (once per thread) the first
# time one runs: where that happens in the trace, a GPU's allocator holds the workspace from then on.
_CUBLAS = {
    getattr(torch.ops.aten, name).default
    for name in ("mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "_addmm_activation")
}


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return storage if storage.nbytes() else None


class LiveTensorCounter(TorchDispatchMode):
    """Bytes of tensors created since it was entered and still alive; their peak.

    Outputs that share storage with an input (views, in-place updates such as
    the optimizer's ``param.add_``) are not new memory and are not counted.
    Memory that existed before (weights, gradients and optimizer state from
    earlier steps) is the caller's baseline.
    """

    def __init__(self, record: bool = False, fixed_shapes: set[tuple[int, ...]] | None = None) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        # With record: ("alloc", key, bytes, fixed), ("free", key, bytes, False) and ("mark", label, 0, False),
        # in order. ``fixed``: the tensor has a parameter's shape (a gradient, a weight cast, optimizer
        # state or its temporaries) or at most one element, so its size does not follow the batch.
        # ("workspace", "script" | "autograd", 0, False): the first cuBLAS operator of forward, and of
        # backward (which CUDA runs on autograd's own thread, with its own handle).
        self.events: list[tuple[str, Any, int, bool]] | None = [] if record else None
        self._fixed_shapes = fixed_shapes or set()
        self._thread_kind: str | None = None  # whose cuBLAS handle the current phase uses
        self._workspaces: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is _LIFT_FRESH:
            # torch.tensor(data): the storage was made before the operator (a real run returns its input);
            # under fake tensors the output is a new fake of that constant, not new memory either
            return out
        inputs = None
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = _storage(t)
            if storage is None:
                continue
            key = storage._cdata
            if key in self._sizes:
                continue
            if inputs is None:
                inputs = {
                    s._cdata
                    for a in tree_leaves((args, kwargs))
                    if isinstance(a, torch.Tensor) and (s := _storage(a)) is not None
                }
            if key in inputs:
                continue
            size = storage.nbytes()
            self._sizes[key] = size
            self.live += size
            if self.live > self.peak:
                self.peak = self.live
            if self.events is not None:
                self.events.append(("alloc", key, size, t.numel() <= 1 or tuple(t.shape) in self._fixed_shapes))
            weakref.finalize(storage, self._freed, key)
        kind = self._thread_kind
        if kind is not None and func in _CUBLAS and kind not in self._workspaces and self.events is not None:
            self._workspaces.add(kind)
            self.events.append(("workspace", kind, 0, False))
        return out

    def _freed(self, key: int) -> None:
        size = self._sizes.pop(key, 0)
        self.live -= size
        if self.events is not None and size:
            self.events.append(("free", key, size, False))

    def mark(self, label: str) -> None:
        """A phase boundary in the recorded trace ("3:backward": step 3's backward begins)."""
        if self.events is not None:
            self.events.append(("mark", label, 0, False))
            self._thread_kind = "autograd" if label.endswith(":backward") else "script"

    def restart_peak(self) -> int:
        """Start a new peak from what is alive now (a phase boundary); returns the old peak."""
        old, self.peak = self.peak, self.live
        return old
