"""The measured model and its parameters, as the tracker's parts need them.

Held weakly when asked (the runner does): a script that drops a model (an
evaluation loop over checkpoints, folds shorter than ``--steps``) gets its
memory back as in a plain run. Lazy parameters keep their identity when their
first forward gives them a shape, so they are known from the start and their
storage once they have one.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.nn.parameter import is_lazy

from .parallel import fsdp2_sharded
from .saved_tensors import memory_map, storage_key

__all__ = ["ModelParameters", "shaped_parameters", "unique_bytes"]


def shaped_parameters(model: nn.Module | None) -> list[nn.Parameter]:
    """The model's parameters that have a shape: a lazy module that never ran has none to count.

    Empty for a model the script dropped: nothing left to count.
    """
    return [] if model is None else [p for p in model.parameters() if not is_lazy(p)]


def unique_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct memory behind ``tensors`` (a tied weight, or views, counted once)."""
    return sum(memory_map(tensors).values())


class ModelParameters:
    """One model, held weakly (``hold=False``) or not, and the identities, storages and gradients of its parameters."""

    def __init__(self, model: nn.Module, hold: bool = True) -> None:
        self._ref: weakref.ref | None = weakref.ref(model)
        self._held = model if hold else None
        # The model's parameters, read once a step (refresh()): walking the module tree each time a
        # hook needs them cost a tenth of a small model's step.
        self._all: list[nn.Parameter] = []
        self._shaped: list[nn.Parameter] = []
        # The model's modules below its root, read with the parameters (not the root: a model the
        # script drops must go, and its parts with it once released).
        self.parts: list[nn.Module] = []
        # FSDP2 swaps a unit's sharded DTensors for plain unsharded Parameters during its forward
        # (the root's until backward): the sharded ones, read now, are the model's.
        self._fixed = False
        self._stale = True  # a module or parameter may have been registered since the last read
        self._handles: list = []
        self.refresh()
        self._fixed = fsdp2_sharded(model)
        self.ids: set[int] = {id(p) for p in self._all}  # every parameter, lazy ones included
        self._refs = [weakref.ref(p) for p in self._all]
        self.lazy_left = len(self._shaped) < len(self._all)
        self.storages: set[int] = set()  # data pointers of their storages, taken when measuring starts

    @property
    def model(self) -> nn.Module | None:
        """The model; None once released, or once the script dropped it (held weakly)."""
        return self._ref() if self._ref is not None else None

    @property
    def model_dropped(self) -> bool:
        """The script let go of the model before it was released here."""
        return self._ref is not None and self._ref() is None

    def shaped(self) -> list[nn.Parameter]:
        """The parameters with a shape, or, once the script dropped the model, those still alive.

        ``loss = Net()(x).sum(); loss.backward()``: the module is gone before its
        backward, its parameters live on in the graph, and get gradients.
        """
        if self.model is not None:
            return self._shaped
        return [p for ref in self._refs if (p := ref()) is not None and not is_lazy(p)]

    def watch(self) -> None:
        """Be told when a module or parameter is registered anywhere: only then are they read again.

        (Torch's global registration hooks: walking the model at every step
        cost a few percent of a small model's step.)
        """
        if not self._handles:
            self._handles = [
                module_hooks.register_module_module_registration_hook(self._registered),
                module_hooks.register_module_parameter_registration_hook(self._registered),
            ]

    def unwatch(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._stale = [], True

    def _registered(self, module: nn.Module, name: str, value: object) -> None:
        self._stale = True

    def refresh(self) -> None:
        """Read the model's parameters again (a step begins: the script may have replaced a module)."""
        model = self.model
        if model is not None and not self._fixed and self._stale:
            self._all = list(model.parameters())
            self._shaped = [p for p in self._all if not is_lazy(p)]
            self.parts = list(model.modules())[1:]
            # Read again at every step without the hooks, and while lazy ones have no shape yet.
            self._stale = not self._handles or len(self._shaped) < len(self._all)

    def take_storages(self) -> None:
        """Know the storages of the parameters that have one (left out of activations)."""
        self.storages |= {k[0] for p in self.shaped() if (k := storage_key(p)) is not None}

    def adopt_materialized(self) -> None:
        """Lazy parameters that got their shapes since: know their storage."""
        self.take_storages()
        self.lazy_left = self.model is not None and any(is_lazy(p) for p in self._all)

    def devices_note(self, device: torch.device) -> list[str]:
        """A note when the parameters are on several devices (the allocator's figures are ``device``'s only)."""
        devices = {p.device for p in self.shaped()}
        if len(devices) < 2:
            return []
        return [
            f"parameters on several devices ({', '.join(sorted(map(str, devices)))}); allocator figures are for "
            f"{device} only"
        ]

    def any_trainable(self) -> bool:
        if self.model is None:
            return False
        for p in self._all:  # (at every root forward: a loop, not a generator; the first usually says)
            if p.requires_grad:
                return True
        return False

    def gradients(self) -> dict[int, int]:
        """Storage identity -> bytes of every gradient the parameters hold now."""
        return memory_map([g for p in self.shaped() if (g := p.grad) is not None])

    def gradients_cleared(self) -> bool:
        """True when ``zero_grad(set_to_none=True)`` ran: no trainable parameter has a gradient."""
        return all(p.grad is None for p in self.shaped() if p.requires_grad)

    def release(self) -> None:
        """Let go of the model and forget its parameters (their figures were taken out)."""
        self._ref, self._held, self._refs, self._all, self._shaped, self.parts = None, None, [], [], [], []
