"""Static inventory of a module: parameters, buffers, bytes, dtypes and tie groups.

Counting is kept apart from printing (as in fvcore's ``parameter_count``): the
functions here walk a module once and return plain data that the bucket finder,
the estimators and the renderers read.

Why tie detection is done by storage and not by name: a tied weight such as
nanoGPT's ``lm_head.weight is transformer.wte.weight`` appears under two names
in ``named_parameters(remove_duplicate=False)``; tools that sum over names count
it twice (torchinfo), and tools that group by ``data_ptr()`` collapse every
meta tensor into one group because a meta tensor's pointer is 0 (DeepSpeed).
We group real tensors by the memory they view and meta/fake tensors by
Parameter identity, and name every alias.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.parameter import is_lazy

__all__ = [
    "TensorInfo",
    "ModuleInfo",
    "Inventory",
    "owner_path",
    "take_inventory",
    "tensor_identity",
    "WEIGHT_DTYPE_BYTES",
]

# Bytes per element of the weights if they were stored in each format; used for
# the "weight memory at ..." table. int8 ignores quantisation scales.
WEIGHT_DTYPE_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
# A format the weights are stored in that the table above lacks gets a row of its own.
_OTHER_FORMATS: dict[str, tuple[str, int]] = {"float64": ("fp64", 8), "complex64": ("complex64", 8)}


@dataclass(frozen=True)
class TensorInfo:
    """One unique tensor (parameter or buffer), with every name it is reachable by."""

    name: str  # the first alias in registration order: the canonical name
    aliases: tuple[str, ...]
    numel: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    device: str
    requires_grad: bool
    persistent: bool = True  # buffers only: False for register_buffer(..., persistent=False)

    @property
    def tied(self) -> bool:
        return len(self.aliases) > 1


@dataclass
class ModuleInfo:
    """Counts for one module path.

    ``own_*`` are the parameters registered directly on the module; ``params``
    and ``bytes`` cover its whole subtree with each unique tensor counted once.
    """

    path: str
    type: str
    depth: int
    own_params: int = 0
    own_bytes: int = 0
    params: int = 0
    bytes: int = 0
    trainable: int = 0
    frozen: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)
    buffers: int = 0
    buffer_bytes: int = 0
    persistent_buffers: int = 0
    non_persistent_buffers: int = 0


@dataclass
class Inventory:
    """Everything a static walk of one module can know."""

    model_class: str
    parameters: list[TensorInfo]  # unique tensors, registration order
    buffers: list[TensorInfo]
    modules: list[ModuleInfo]  # pre-order, root first (path "")
    uninitialized: list[str] = field(default_factory=list)  # lazy parameters without a shape yet: not counted

    @property
    def total(self) -> int:
        return sum(p.numel for p in self.parameters)

    @property
    def total_with_duplicates(self) -> int:
        return sum(p.numel * len(p.aliases) for p in self.parameters)

    @property
    def trainable(self) -> int:
        return sum(p.numel for p in self.parameters if p.requires_grad)

    @property
    def bytes(self) -> int:
        return sum(p.nbytes for p in self.parameters)

    @property
    def tie_groups(self) -> list[TensorInfo]:
        return [p for p in self.parameters if p.tied]

    @property
    def buffer_total(self) -> int:
        return sum(b.numel for b in self.buffers)

    @property
    def buffer_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def weight_memory(self) -> dict[str, int]:
        """Bytes the unique parameters would take in each storage format, the formats they are in included.

        fp32, fp16, bf16 and int8 always; fp64 (and complex64) too where the
        model stores some of its weights so, as a float64 model does.
        """
        sizes = dict(WEIGHT_DTYPE_BYTES)
        sizes.update(_OTHER_FORMATS[p.dtype] for p in self.parameters if p.dtype in _OTHER_FORMATS)
        return {fmt: self.total * size for fmt, size in sizes.items()}

    def dtype_counts(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for p in self.parameters:
            counts[p.dtype] += p.numel
        return dict(counts)


def tensor_identity(t: torch.Tensor) -> tuple:
    """A key equal for two tensors exactly when they hold the same data.

    Real tensors: the storage they view plus the view's geometry, so a weight
    shared by two modules (one storage) is one key while two disjoint slices of
    one flat buffer stay two. Meta and fake tensors have no memory (their
    ``data_ptr()`` is 0), so only object identity can tell them apart, except
    that a fake tensor's storage object is shared by its views as a real one is.
    """
    fake = sys.modules.get("torch._subclasses.fake_tensor")
    if fake is not None and isinstance(t, fake.FakeTensor):
        storage = t.untyped_storage()
        return ("storage", str(t.device), storage._cdata, t.storage_offset(), tuple(t.shape), t.stride())
    if t.device.type != "meta" and t.numel() > 0:
        try:
            ptr = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError, TypeError):
            ptr = 0
        if ptr:
            return ("storage", str(t.device), ptr, t.storage_offset(), tuple(t.shape), t.stride())
    return ("object", id(t))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _group_tensors(
    named: list[tuple[str, torch.Tensor]], persistent: dict[str, bool] | None = None
) -> list[TensorInfo]:
    """Group (name, tensor) pairs by identity, keeping first-seen order."""
    groups: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    for name, t in named:
        groups.setdefault(tensor_identity(t), []).append((name, t))
    infos = []
    for members in groups.values():
        name, t = members[0]
        infos.append(
            TensorInfo(
                name=name,
                aliases=tuple(n for n, _ in members),
                numel=t.numel(),
                nbytes=t.numel() * t.element_size(),
                dtype=_dtype_name(t.dtype),
                shape=tuple(t.shape),
                device=str(t.device),
                requires_grad=bool(t.requires_grad),
                persistent=True if persistent is None else any(persistent[n] for n, _ in members),
            )
        )
    return infos


def owner_path(name: str) -> str:
    return name.rpartition(".")[0]


def _ancestors(path: str) -> list[str]:
    """ "a.b.c" -> ["", "a", "a.b", "a.b.c"]: the module and everything above it."""
    if not path:
        return [""]
    parts = path.split(".")
    return [""] + [".".join(parts[: i + 1]) for i in range(len(parts))]


def take_inventory(model: nn.Module) -> Inventory:
    """Walk ``model`` once and count its parameters and buffers per module path.

    Every unique tensor is charged once to each module whose subtree reaches it
    through any alias, so a parent's count never double-counts a tie inside it.
    Cost is linear in (tensors x depth), which keeps a 70B-parameter model on the
    meta device well under a second.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")

    named_modules = list(model.named_modules(remove_duplicate=False))
    modules: dict[str, ModuleInfo] = {}
    for path, mod in named_modules:
        if path not in modules:
            modules[path] = ModuleInfo(path=path, type=type(mod).__name__, depth=path.count(".") + 1 if path else 0)

    named_params = list(model.named_parameters(remove_duplicate=False))
    # A lazy module that has not run yet has parameters with no shape: nothing to count.
    uninitialized = [name for name, p in named_params if is_lazy(p)]
    parameters = _group_tensors([(name, p) for name, p in named_params if not is_lazy(p)])

    non_persistent: dict[str, bool] = {}
    for path, mod in named_modules:
        # named_buffers, not the _buffers dict: a TorchScript module's is a wrapper without iteration
        persistent_off = getattr(mod, "_non_persistent_buffers_set", ())
        for bname, _ in mod.named_buffers(recurse=False):
            full = f"{path}.{bname}" if path else bname
            non_persistent[full] = bname not in persistent_off
    named_buffers = [(n, b) for n, b in model.named_buffers(remove_duplicate=False) if not is_lazy(b)]
    buffers = _group_tensors(named_buffers, persistent=non_persistent)

    for info in parameters:
        for alias in info.aliases:  # a module owns each alias it registers
            own = modules[owner_path(alias)]
            own.own_params += info.numel
            own.own_bytes += info.nbytes
        reached = {anc for alias in info.aliases for anc in _ancestors(owner_path(alias))}
        for path in reached:
            m = modules[path]
            m.params += info.numel
            m.bytes += info.nbytes
            if info.requires_grad:
                m.trainable += info.numel
            else:
                m.frozen += info.numel
            m.dtypes[info.dtype] = m.dtypes.get(info.dtype, 0) + info.numel

    for info in buffers:
        reached = {anc for alias in info.aliases for anc in _ancestors(owner_path(alias))}
        for path in reached:
            m = modules[path]
            m.buffers += info.numel
            m.buffer_bytes += info.nbytes
            if info.persistent:
                m.persistent_buffers += info.numel
            else:
                m.non_persistent_buffers += info.numel

    return Inventory(
        model_class=type(model).__name__,
        parameters=parameters,
        buffers=buffers,
        modules=list(modules.values()),
        uninitialized=uninitialized,
    )
