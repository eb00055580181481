"""Replay a recorded CPU step through the caching-allocator model: its GPU allocator figures.

The trace (``tracking/live_tensors.py`` with ``record=True``) lists every
storage operators created and every one that died, in order, with a mark at
each phase boundary ("2:forward", "2:backward", "2:optimizer"). Replayed
through :class:`CachingAllocator` from the storages alive when it began (the
parameters), it gives what ``torch.cuda.memory_allocated`` and
``memory_reserved`` would have shown at each point of the same steps on a GPU,
apart from what only a GPU allocates (library workspaces, added per card by
``gpu_projection.py``).

The same trace answers for other batch sizes: each allocation that does not
have a parameter's shape (nor at most one element) is an activation, a
temporary or an input, and its size is scaled by ``batch / measured batch``,
while gradients, weight casts and optimizer state keep theirs. Replayed again,
the allocator's rounding, splitting and caching at that size come out as a
GPU would produce them, which a line through one point cannot give (the
reserved memory grows faster than the allocated as blocks fragment).
"""

from __future__ import annotations

import os
from typing import Any

from .caching_allocator import CachingAllocator

__all__ = ["BATCH_GRID", "WORKSPACE_SIZES", "allocator_settings", "cublas_workspace", "replay_by_batch", "replay_trace"]

# Batch sizes the trace is replayed at (with the measured one), then doubling, up to the
# first whose reserved memory passes the largest card of the fit table by far.
BATCH_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
_GRID_LIMIT = 256 * 1024**3
_MAX_BATCH = 1 << 40


def cublas_workspace(capability: tuple[int, int] | None) -> int:
    """PyTorch's default cuBLAS workspace for a compute capability (``CUBLAS_WORKSPACE_CONFIG`` unset).

    ``parseChosenWorkspaceSize`` (``aten/src/ATen/cuda/CublasHandlePool.cpp``): 32 MiB on Hopper and
    Blackwell, 4096 KiB x 2 + 16 KiB x 8 before.
    """
    if capability is not None and capability[0] in (9, 10, 12):
        return 4096 * 8 * 1024
    return 4096 * 1024 * 2 + 16 * 1024 * 8


# The workspace sizes the cards can have: each gets a replay of its own.
WORKSPACE_SIZES = (cublas_workspace((9, 0)), cublas_workspace((8, 0)))


def allocator_settings(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The allocator settings the step would run with: ``PYTORCH_CUDA_ALLOC_CONF`` (or ``PYTORCH_ALLOC_CONF``).

    ``expandable_segments`` is modelled; any other setting is listed as not modelled.
    """
    environ = os.environ if environ is None else environ
    text = environ.get("PYTORCH_CUDA_ALLOC_CONF") or environ.get("PYTORCH_ALLOC_CONF") or ""
    expandable, other = False, []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition(":")
        if key.strip() == "expandable_segments":
            expandable = value.strip().lower() == "true"
        else:
            other.append(item)
    return {"expandable_segments": expandable, "not_modelled": other}


def replay_trace(
    initial: list[int],
    events: list[tuple[str, Any, int, bool]],
    scale: float = 1.0,
    expandable: bool = False,
    workspace: int = 0,
) -> dict[str, Any]:
    """Per measured step: allocated at its start, its allocated peak, reserved at its end; per phase peaks.

    Steps are numbered as the report numbers them (the marks' prefixes).
    ``scale``: the factor applied to the allocations that follow the batch. ``workspace``: the
    bytes of each cuBLAS workspace, allocated where the trace says a handle first ran (0: none).
    """
    alloc = CachingAllocator(expandable=expandable)
    for size in initial:
        alloc.malloc(size)
    blocks: dict[Any, Any] = {}
    steps: dict[int, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    phase: str | None = None
    allocations = 0

    def close() -> None:
        if current is not None and phase is not None:
            current["phases"][phase] = max(current["phases"].get(phase, 0), alloc.peak_allocated)
            current["peak_allocated"] = max(current["peak_allocated"], alloc.peak_allocated)
            current["reserved"] = max(current["reserved"], alloc.peak_reserved)

    for kind, key, size, fixed in events:
        if kind == "alloc":
            blocks[key] = alloc.malloc(size if fixed or scale == 1.0 else max(1, round(size * scale)))
            allocations += 1
        elif kind == "free":
            block = blocks.pop(key, None)
            if block is not None:
                alloc.free(block)
        elif kind == "workspace":
            if workspace:
                alloc.malloc(workspace)  # kept for the process's life, as cuBLAS keeps it
        else:
            close()
            index_text, _, phase = str(key).partition(":")
            index = int(index_text)
            if index not in steps:
                steps[index] = {
                    "index": index,
                    "allocated_start": alloc.allocated,
                    "peak_allocated": alloc.allocated,
                    "reserved": alloc.reserved,
                    "phases": {},
                }
            current = steps[index]
            alloc.reset_peaks()
    close()
    return {
        "initial_bytes": sum(initial),
        "allocations": allocations,
        "segments": alloc.segments,
        "steps": [steps[i] for i in sorted(steps)],
    }


def replay_by_batch(
    initial: list[int],
    events: list[tuple[str, Any, int, bool]],
    batch: int,
    index: int,
    expandable: bool = False,
    workspace: int = 0,
) -> list[dict[str, int]]:
    """Step ``index`` replayed at the grid's batch sizes (and ``batch``, the measured one): peaks per batch."""
    rows: list[dict[str, int]] = []
    sizes = sorted({*BATCH_GRID, batch})
    while sizes:
        b = sizes.pop(0)
        replay = replay_trace(initial, events, b / batch, expandable, workspace)
        step = next((s for s in replay["steps"] if s["index"] == index), None)
        if step is None:
            return []
        rows.append({"batch": b, "peak_allocated": step["peak_allocated"], "reserved": step["reserved"]})
        if step["reserved"] > _GRID_LIMIT:
            break
        if not sizes and b < _MAX_BATCH:  # a small model: on, doubling, until past the largest card
            sizes.append(2 * b)
    return rows
