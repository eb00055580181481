"""Which data-parallel wrapper a model trains under, and what each category holds on this rank.

Under ``torchrun`` every rank runs the same script on its own process, and a
rank's memory depends on how the wrapper splits the model:

* DDP (``DistributedDataParallel``) replicates weights, gradients and
  optimizer state, and keeps its reducer's gradient buckets beside ``.grad``
  (with ``gradient_as_bucket_view=True`` the gradients are views into them);
* ZeRO-1 (``ZeroRedundancyOptimizer``) partitions the optimizer state by
  whole parameters: the state lives in ``opt.optim.state``, not ``opt.state``;
* FSDP1 (``FullyShardedDataParallel``) flattens each unit's parameters into a
  ``FlatParameter`` and keeps this rank's shard (padded at the end);
* FSDP2 (``fully_shard``) keeps each parameter as a ``DTensor`` sharded on
  dim 0 (the local shard is a view of a padded storage).

Everything is found by type (never guessed from numbers), and softly: the
private attributes read here (``_local_tensor``, ``_unpadded_unsharded_size``,
the default store) are looked up with a fallback, so a torch without them
reports less rather than failing. Placements name how a category is spread:
``replicated`` (every rank holds all of it), ``sharded`` (split by elements),
``partitioned`` (split by whole tensors) and ``per-rank`` (each rank's own:
activations of its own micro-batch).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "PLAIN_TYPES",
    "ParallelSetup",
    "ParallelWatch",
    "detect_setup",
    "fsdp2_sharded",
    "fsdp_wrapped",
    "launched_rank",
    "local_tensor",
    "state_optimizer",
    "wrapper_of",
]

PLAIN_TYPES = (torch.Tensor, nn.Parameter)  # a type(t) check skips the subclass lookups for these


def _loaded(module_name: str, name: str) -> type | None:
    """``module_name.name``, once something imported that module (nothing can be one before).

    The wrappers are looked up, never imported: a script that does not use
    ``torch.distributed`` pays nothing for these checks.
    """
    module = sys.modules.get(module_name)
    return getattr(module, name, None) if module is not None else None


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds for ``t``: a DTensor's local shard, else ``t`` itself.

    A DTensor reports its global shape and a storage of the global size; what
    the rank's memory holds is its ``_local_tensor``.
    """
    if type(t) in PLAIN_TYPES:
        return t
    dtensor = _loaded("torch.distributed.tensor", "DTensor")
    if dtensor is not None and isinstance(t, dtensor):
        inner = getattr(t, "_local_tensor", None)
        return inner if inner is not None else t.to_local()
    return t


def _fsdp2_module_type() -> type | None:
    return _loaded("torch.distributed.fsdp._fully_shard._fully_shard", "FSDPModule") or _loaded(
        "torch.distributed.fsdp", "FSDPModule"
    )


def _is_flat_param(p: torch.Tensor) -> bool:
    # FSDP1's FlatParameter reports type(p).__name__ == "Parameter" (a metaclass trick): ask it.
    return bool(getattr(p, "_is_flat_param", False))


def _any_module_is(model: nn.Module, kind: type | None) -> bool:
    return kind is not None and any(isinstance(m, kind) for m in model.modules())


def fsdp2_sharded(model: nn.Module) -> bool:
    """Some module of ``model`` is managed by FSDP2's ``fully_shard``."""
    return _any_module_is(model, _fsdp2_module_type())


def wrapper_of(model: nn.Module) -> str | None:
    """The data-parallel wrapper, by type: "DDP", "FSDP" (FSDP1), "FSDP2", or None."""
    if fsdp2_sharded(model):
        return "FSDP2"
    if _any_module_is(model, _loaded("torch.distributed.fsdp", "FullyShardedDataParallel")):
        return "FSDP"
    ddp = _loaded("torch.nn.parallel", "DistributedDataParallel")
    if ddp is not None and isinstance(model, ddp):
        return "DDP"
    return None


def fsdp_wrapped(model: nn.Module) -> bool:
    """FSDP1 or FSDP2 manages ``model``: its parameters are gathered (unsharded) for forward and backward."""
    return wrapper_of(model) in ("FSDP", "FSDP2")


def state_optimizer(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer whose ``state`` holds the state: ZeRO's local ``optim``, else ``opt`` itself."""
    zero = _loaded("torch.distributed.optim", "ZeroRedundancyOptimizer")
    if zero is not None and isinstance(opt, zero):
        inner = getattr(opt, "optim", None)
        if isinstance(inner, torch.optim.Optimizer):
            return inner
    return opt


@dataclass
class ParallelSetup:
    """This process's place in a distributed job, taken while its process group is alive."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    store: Any = field(default=None, repr=False)  # the default group's store, where torchrun's is not known
    job: str = ""  # names this job's keys in the store (run id and restart count)


# os.environ's own mapping, read without its Python-level lookup (looked at every step; the same
# mapping ``"WORLD_SIZE" in os.environ`` reads, kept up to date by os.environ's assignments).
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_WORLD_SIZE = os.environ.encodekey("WORLD_SIZE") if hasattr(os.environ, "encodekey") else None


def _launched() -> bool:
    """torchrun's environment is set (``WORLD_SIZE``)."""
    if isinstance(_ENV_DATA, dict) and _ENV_WORLD_SIZE is not None:
        return _ENV_WORLD_SIZE in _ENV_DATA
    return "WORLD_SIZE" in os.environ


def detect_setup() -> ParallelSetup | None:
    """This process's rank and world size: from the default process group, else from torchrun's environment.

    The environment still says which rank this is after the script called
    ``destroy_process_group()`` (or in a rank that never made one).
    """
    dist = sys.modules.get("torch.distributed")
    initialized = dist is not None and dist.is_available() and dist.is_initialized()
    if not initialized and not _launched():
        return None  # (the common case, looked at every step: one process, no torchrun)
    job = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if initialized:
        try:
            backend = str(dist.get_backend())
        except Exception:  # noqa: BLE001 - a backend name is a label only
            backend = None
        return ParallelSetup(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", "0") or 0),
            backend=backend,
            store=_default_store(),
            job=job,
        )
    rank = launched_rank()
    if rank is None:
        return None
    return ParallelSetup(
        rank=rank,
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0") or 0),
        backend=None,
        job=job,
    )


def _default_store() -> Any:
    """The default process group's store (private to torch: looked up softly), for jobs not started by torchrun."""
    get_store = _loaded("torch.distributed.distributed_c10d", "_get_default_store")
    try:
        return get_store() if get_store is not None else None
    except Exception:  # noqa: BLE001 - no store: each rank still writes its own file
        return None


def launched_rank() -> int | None:
    """This process's rank when a launcher (torchrun) started several; None for a single process.

    Read from the environment torchrun sets, before any process group exists.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return int(os.environ["RANK"]) if world > 1 and "RANK" in os.environ else None
    except ValueError:
        return None


def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    return list({id(p): p for p in model.parameters()}.values())


def _bytes_of(p: torch.Tensor) -> tuple[int, int, int, int]:
    """(local bytes, storage bytes, global bytes, global elements) of one parameter-like tensor."""
    es = p.element_size()
    local = local_tensor(p)
    try:
        storage = local.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        storage = local.numel() * es
    if _is_flat_param(p):
        size = getattr(p, "_unpadded_unsharded_size", None)
        padded = int(getattr(p, "_shard_numel_padded", 0) or 0)
        total = size.numel() if size is not None else p.numel()
        return (p.numel() - padded) * es, storage, total * es, total
    return local.numel() * es, storage, p.numel() * es, p.numel()


def _reducer_buckets(model: nn.Module) -> tuple[int | None, bool]:
    """(bytes of DDP's gradient buckets as its reducer reports them, gradients are views into them)."""
    try:
        data = model._get_ddp_logging_data()
    except Exception:  # noqa: BLE001 - a DDP without logging data: not known
        return None, False
    sizes = data.get("rebuilt_bucket_sizes") if data.get("has_rebuilt_buckets") else None
    sizes = sizes or data.get("bucket_sizes")
    if not isinstance(sizes, str) or not sizes:
        return None, False
    try:
        total = sum(int(s) for s in sizes.split(",") if s.strip())
    except ValueError:
        return None, False
    return total, bool(data.get("gradient_as_bucket_view"))


def _fsdp_units(model: nn.Module, wrapper: str) -> tuple[list[int], int]:
    """Global bytes of each FSDP unit's own parameters (what one all-gather unshards), and the root unit's.

    The root unit matters beyond the others: FSDP does not free its gathered
    parameters after forward, since backward begins with them.
    """
    units: list[int] = []
    root = 0
    if wrapper == "FSDP2":
        kind = _fsdp2_module_type()
        managed: set[int] = set()
        for m in reversed(list(model.modules())):  # innermost units first: a parent's are what is left
            if kind is not None and isinstance(m, kind):
                params = [p for p in m.parameters() if id(p) not in managed]
                managed |= {id(p) for p in params}
                units.append(sum(p.numel() * p.element_size() for p in params))
                root = units[-1]  # the outermost is walked last
    else:  # FSDP1: a flat parameter a unit; the root's is the one the fewest wrappers deep
        flat = [
            (name.count("_fsdp_wrapped_module"), _bytes_of(p)[2])
            for name, p in model.named_parameters()
            if _is_flat_param(p)
        ]
        units = [nbytes for _, nbytes in flat]
        root = min(flat)[1] if flat else 0
    return units, root


class ParallelWatch:
    """What one tracker knows of the job around it: the setup (taken early) and the layout (at the end).

    The setup is taken while the process group is alive (a script calls
    ``destroy_process_group()`` before the report is made); the layout when
    measuring stops, after an optimizer step, when FSDP's parameters are
    sharded again (during a forward FSDP2's root holds plain unsharded ones).
    """

    def __init__(self) -> None:
        self.setup: ParallelSetup | None = None
        self.layout: dict[str, Any] | None = None

    def look(self) -> None:
        """Take the setup (again while it came from the environment alone: a process group may exist now)."""
        if self.setup is None or self.setup.backend is None:
            self.setup = detect_setup() or self.setup

    def take_layout(self, model: nn.Module | None, optimizer: torch.optim.Optimizer | None) -> None:
        """Read how the wrapper spreads parameters, gradients and optimizer state (when measuring stops)."""
        self.look()
        if self.setup is None or model is None:
            return
        try:
            self.layout = _layout(model, optimizer)
        except Exception as exc:  # noqa: BLE001 - the per-rank layout is extra: the step figures stand
            self.layout = {"error": f"{type(exc).__name__}: {exc}"}


def _layout(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    wrapper = wrapper_of(model)
    sharded = wrapper in ("FSDP", "FSDP2")
    zero = optimizer is not None and state_optimizer(optimizer) is not optimizer
    local = global_bytes = count = grad_global = 0
    seen_storages: dict[int, int] = {}
    for p in _unique_params(model):
        lb, sb, gb, n = _bytes_of(p)
        local += lb
        global_bytes += gb
        count += n
        grad_global += gb if p.requires_grad else 0
        try:
            key = local_tensor(p).untyped_storage().data_ptr() or id(p)
        except (RuntimeError, NotImplementedError, TypeError):
            key = id(p)
        seen_storages[key] = max(seen_storages.get(key, 0), sb)
    storage = sum(seen_storages.values())
    out: dict[str, Any] = {
        "wrapper": wrapper,
        "optimizer_sharding": "ZeRO-1" if zero else None,
        "parameters": {
            "placement": "sharded" if sharded else "replicated",
            "local_bytes": local,
            "storage_bytes": storage,
            "global_bytes": global_bytes,
            "global_count": count,
        },
        "gradients": {"placement": "sharded" if sharded else "replicated", "global_bytes": grad_global},
    }
    opt_placement = "sharded" if sharded else ("partitioned" if zero else "replicated")
    opt_global: int | None = None
    if optimizer is not None:
        inner = state_optimizer(optimizer)
        dtensor = _loaded("torch.distributed.tensor", "DTensor")
        values = [v for st in inner.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        if opt_placement == "replicated":
            opt_global = sum(v.numel() * v.element_size() for v in values)
        elif dtensor is not None and values and all(isinstance(v, dtensor) or v.dim() == 0 for v in values):
            opt_global = sum(v.numel() * v.element_size() for v in values)  # a DTensor's numel is global
    out["optimizer_state"] = {"placement": opt_placement, "global_bytes": opt_global}
    if wrapper == "DDP":
        buckets, as_view = _reducer_buckets(model)
        out["reducer_buckets"] = {"bytes": buckets, "gradients_are_views": as_view}
    if sharded:
        out["fsdp_units"], out["fsdp_root_unit"] = _fsdp_units(model, wrapper)
    return out
