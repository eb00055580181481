"""What autograd saves for backward, as the tracker sees it.

Small pure functions about tensors and their memory: which storage a tensor
views (views and aliases are counted once), whether a saved tensor is
autocast's copy of a weight, and which tensors a script's own pack hook kept.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import checkpoint as torch_checkpoint

from .parallel import PLAIN_TYPES, local_tensor

__all__ = [
    "CHECKPOINT_HOLDER",
    "fake_tensor_type",
    "NOT_PACKED",
    "SavedTensor",
    "memory_of",
    "memory_map",
    "storage_key",
    "tensors_held",
    "tensors_in",
    "weight_copy_source",
]


def fake_tensor_type() -> type | None:
    """``FakeTensor``, once something imported it (no tensor can be one before)."""
    module = sys.modules.get("torch._subclasses.fake_tensor")
    return getattr(module, "FakeTensor", None) if module is not None else None


def storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    """(data pointer, bytes) of the memory a tensor views, or None if it has none.

    A DTensor's memory on this rank is its local shard's storage. A fake
    tensor (``FakeTensorMode``: a step planned without memory) has no data
    pointer; its storage's own address stands in for one, alive and freed as
    a real storage would be, so the same rules count it byte for byte.
    """
    try:
        if type(t) in PLAIN_TYPES:  # (the common case first: called for every save and gradient)
            storage = t.untyped_storage()
        else:
            fake = fake_tensor_type()
            if fake is not None and isinstance(t, fake):
                storage = t.untyped_storage()
                return (storage._cdata, storage.nbytes())
            storage = local_tensor(t).untyped_storage()
        ptr = storage.data_ptr()
        return (ptr, storage.nbytes()) if ptr else None
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):
        return None


def memory_of(t: torch.Tensor) -> tuple[int, int]:
    """(identity, bytes) of the memory behind ``t``: its storage, else the tensor itself.

    Two tensors with one identity share memory and are counted once.
    """
    key = storage_key(t)
    return key if key is not None else (id(t), local_tensor(t).numel() * t.element_size())


_PLAIN_SET = frozenset(PLAIN_TYPES)
_UNTYPED_STORAGE = torch.Tensor.untyped_storage
_DATA_PTR, _NBYTES = torch.UntypedStorage.data_ptr, torch.UntypedStorage.nbytes


def memory_map(tensors: list[torch.Tensor]) -> dict[Any, int]:
    """``memory_of`` of many tensors, as identity -> bytes (shared memory once).

    Read several times a step over every parameter or gradient: where all
    are plain tensors with storages (the common case) they are read by
    ``map`` in C, else one by one.
    """
    if _PLAIN_SET.issuperset(map(type, tensors)):
        try:  # (every one a plain tensor with a storage, the common case: read in C, no call per tensor)
            storages = list(map(_UNTYPED_STORAGE, tensors))
            ptrs = list(map(_DATA_PTR, storages))
            if 0 not in ptrs:
                return dict(zip(ptrs, map(_NBYTES, storages)))
        except (RuntimeError, NotImplementedError, TypeError, AttributeError):
            pass  # (a sparse tensor, say: one by one below)
    out: dict[Any, int] = {}
    for t in tensors:
        ident, nbytes = memory_of(t)
        out[ident] = nbytes
    return out


def weight_copy_source(t: torch.Tensor) -> bool:
    """True when ``t`` (or the tensor it views) is a dtype cast of a leaf parameter.

    That is what autocast saves for the backward of a matmul: ``weight.to(fp16)``
    is a ``ToCopyBackward0`` node whose only input is the weight's
    ``AccumulateGrad``. Its size is a property of the weights, not of the batch.
    """
    base = t._base if t._base is not None else t
    fn = base.grad_fn
    if fn is None or type(fn).__name__ != "ToCopyBackward0":
        return False
    nxt = fn.next_functions
    return bool(nxt) and nxt[0][0] is not None and hasattr(nxt[0][0], "variable")


NOT_PACKED = object()  # no pack hook of the script's ran: autograd holds the tensor itself
# What non-reentrant checkpointing's pack hook saves instead of a tensor (the
# tensor is dropped and recomputed in backward). Private to torch: looked up
# softly, and without it such a tensor is counted as it would be without checkpointing.
CHECKPOINT_HOLDER = getattr(torch_checkpoint, "_Holder", None)


class SavedTensor:
    """What our pack hook hands autograd for one saved tensor (see ``SavedHooks``)."""

    __slots__ = ("value", "version", "unpack", "ptr", "peers", "forward", "owner")

    def __init__(self, value: Any, version: int | None, unpack: Callable | None, ptr: int | None) -> None:
        self.value = value  # a detached alias, or what the script's own pack hook returned
        self.version = version  # the tensor's version when saved (None: the script's hooks own it)
        self.unpack = unpack  # the script's own unpack hook, if its pack hook made ``value``
        self.ptr = ptr  # the storage counted for it (None: not counted)
        self.peers: tuple = ()  # (hooks, ptr) of other trackers of the same model that counted it too
        self.forward: Any = None  # the forward record that counted it
        self.owner: Any = None  # told ``saved_freed(forward, ptr)`` when autograd lets go of it

    def __del__(self) -> None:
        # Autograd frees what it saved when backward has used it, or when the
        # graph is dropped unused: which of a step's saves were alive at once.
        owner = self.owner
        if owner is not None:
            try:
                owner.saved_freed(self.forward, self.ptr)
            except Exception:  # noqa: BLE001 - a finalizer must not raise (interpreter shutdown, a stopped tracker)
                pass


def tensors_in(obj: Any, depth: int = 0) -> list[torch.Tensor]:
    """Tensors in a forward's output: a tensor, a tuple/list/dict of them, or a ModelOutput."""
    kind = type(obj)
    if kind in PLAIN_TYPES:  # (read at every root forward's start and end: the common shapes first)
        return [obj]
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth > 3:
        return []
    if kind is tuple and _PLAIN_SET.issuperset(map(type, obj)):
        return list(obj)  # (a flat tuple of plain tensors: a model's output, its positional arguments)
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_in(v, depth + 1)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_in(v, depth + 1)]
    return []


def tensors_held(packed: Any) -> list[torch.Tensor]:
    """Tensors in what a script's pack hook returned: in containers, or in an object's attributes.

    None found means it is not known what the object holds (a custom
    compressed form): the saved tensor is then counted as held.
    """
    found = tensors_in(packed)
    if found or isinstance(packed, type):
        return found
    values = list(vars(packed).values()) if hasattr(packed, "__dict__") else []
    slots = getattr(type(packed), "__slots__", ())
    values += [getattr(packed, name, None) for name in ((slots,) if isinstance(slots, str) else slots)]
    return [t for v in values for t in tensors_in(v, 1)]
