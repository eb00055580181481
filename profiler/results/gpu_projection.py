"""Project a step measured on the CPU (or on fake tensors) onto named GPUs.

Three figures per card, each with its method:

- **allocated peak** (``torch.cuda.max_memory_allocated``): the recorded step,
  run with CUDA's autocast policy, replayed through the caching-allocator model
  (``gpu_replay.py``) with the two cuBLAS workspaces PyTorch allocates through
  the same allocator and keeps (one for the script's thread, one for autograd's
  backward thread, each of PyTorch's default size for the card's compute
  capability, ``gpu_replay.cublas_workspace``), allocated where the trace first
  ran a cuBLAS operator in forward and in backward;
- **reserved peak** (``memory_reserved``): the same replay's segments;
- **device memory used** (what NVML and nvidia-smi show for the device): the
  reserved peak plus the memory a GPU process uses beyond its allocator
  (context, kernels, libraries, the driver's share), from the calibration.

The largest batch per card comes from the same figures at other batch sizes:
the replays of runs at several batch sizes (``--fit-batches``), or the one
step's trace replayed with its batch-sized allocations scaled
(``gpu_replay.replay_by_batch``); between those, straight lines.
"""

from __future__ import annotations

import math
from typing import Any

from .calibration import Calibration, capability_of
from .fit import CARDS, GIB, resolve_card
from .gpu_replay import cublas_workspace
from .schema import MemoryJSON
from .steps import batch_and_sequence, described_step

__all__ = ["cublas_workspace", "project_gpu"]


def _replay_step(memory: MemoryJSON, workspace: int | None = None) -> tuple[dict | None, dict | None, list[dict]]:
    """The described step, its replay (same index) and its replays at other batch sizes.

    With ``workspace``, the replay with two cuBLAS workspaces of that size (``gpu_replay.WORKSPACE_SIZES``).
    (None, None, []) without a replay.
    """
    replay = memory.get("gpu_replay")
    step = described_step(memory.get("steps", []))
    if not replay or step is None:
        return None, None, []
    source = replay["with_workspaces"][str(workspace)] if workspace else replay
    by_index = {s["index"]: s for s in source["steps"]}
    return step, by_index.get(step.get("index")), source.get("by_batch") or []


def _scaling(
    step: dict, replayed: dict, by_batch: list[dict], others: list[tuple[int, MemoryJSON]], workspace: int | None = None
) -> dict | None:
    """Allocated and reserved bytes at other batch sizes: the points the largest batch is read from, and how.

    The measured step's trace replayed at other batch sizes gives the points; where runs at other
    batch sizes were measured (``--fit-batches``), their own replays replace those points.
    """
    batch, seq = batch_and_sequence(step)
    if not batch:
        return None
    runs = {batch: (replayed["peak_allocated"], replayed["reserved"])}
    for other_batch, other in others:
        other_step, other_replay, _ = _replay_step(other, workspace)
        if other_replay is not None and batch_and_sequence(other_step)[1] == seq:
            runs[other_batch] = (other_replay["peak_allocated"], other_replay["reserved"])
    points = {row["batch"]: (row["peak_allocated"], row["reserved"]) for row in by_batch}
    parts = []
    if points:
        parts.append(
            f"the step's trace replayed at other batch sizes: every allocation without a parameter's shape "
            f"(activations, temporaries, inputs) scaled by batch / {batch}, gradients, weight casts and optimizer "
            "state kept"
        )
    if len(runs) > 1:
        parts.append(f"at batch sizes {sorted(runs)}, the replays of the runs measured there")
    points.update(runs)
    if len(points) < 2:
        return None
    rows = sorted((b, a, r) for b, (a, r) in points.items())
    a_slope, a_fixed = _line([(b, a) for b, a, _ in rows])
    r_slope, r_fixed = _line([(b, r) for b, _, r in rows])
    return {
        "method": "; ".join(parts) + "; between the batch sizes, straight lines",
        "batch": batch,
        "sequence_length": seq,
        "measured_batches": sorted(runs),
        "points": [{"batch": b, "peak_allocated": a, "reserved": r} for b, a, r in rows],
        "allocated_fixed": int(a_fixed),
        "allocated_per_sample": a_slope,
        "reserved_fixed": int(r_fixed),
        "reserved_per_sample": r_slope,
    }


def _largest(points: list[dict], room: float) -> int | None:
    """The largest batch whose reserved memory stays within ``room``, along lines between the points."""
    pts = [(p["batch"], p["reserved"]) for p in points]
    if len(pts) < 2:
        return None
    for (b1, r1), (b2, r2) in zip(pts, pts[1:]):
        if r1 <= room < r2:
            return b1 + math.floor((room - r1) * (b2 - b1) / (r2 - r1))
    if pts[0][1] > room:
        (b1, r1), (b2, r2) = pts[0], pts[1]
    else:
        (b1, r1), (b2, r2) = pts[-2], pts[-1]
    slope = (r2 - r1) / (b2 - b1)
    if slope <= 0:  # flat there (one segment held everything): the line through all points
        slope, _ = _line(pts)
        if slope <= 0:
            return None
    return max(0, b2 + math.floor((room - r2) / slope))


def _line(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least squares: (slope, intercept)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def project_gpu(
    memory: MemoryJSON | None,
    calibration: Calibration,
    *,
    others: list[tuple[int, MemoryJSON]] | None = None,
    cards: dict[str, float] | None = None,
    margin: float = 0.10,
    focus: str | None = None,
) -> dict[str, Any]:
    """The ``projection`` section: per card, allocated / reserved / device-used peaks, fit and largest batch.

    An unknown ``focus`` card is the caller's error (``ProfilerError``); a failure of ours is said in
    the section (``available: false``), never raised: the rest of the report stands.
    """
    cards = dict(CARDS if cards is None else cards)
    if focus is not None:
        key = resolve_card(focus, cards)
        cards = {key: cards[key]}
    try:
        return _project(memory, calibration, others or [], cards, margin)
    except Exception as exc:  # noqa: BLE001 - the measured report must survive a projection bug
        return {"available": False, "reason": f"the projection failed: {type(exc).__name__}: {exc}", "cards": []}


def _project(
    memory: MemoryJSON | None,
    calibration: Calibration,
    others: list[tuple[int, MemoryJSON]],
    cards: dict[str, float],
    margin: float,
) -> dict[str, Any]:
    step, replayed, by_batch = _replay_step(memory or {})
    if replayed is None:
        reason = (
            "measured on a GPU: its own allocator figures stand"
            if memory and str(memory.get("device", "")).startswith("cuda")
            else "no measured step was recorded for a projection"
        )
        return {"available": False, "reason": reason, "cards": []}
    dtypes = memory["gpu_replay"].get("autocast_dtypes", [])
    scaling = _scaling(step, replayed, by_batch, others)
    notes = []
    if scaling is None:
        notes.append("the step's batch size is unknown (no batch input): no largest batch")
    settings = memory["gpu_replay"].get("allocator_settings") or {}
    if settings.get("expandable_segments"):
        notes.append("replayed with expandable_segments (PYTORCH_CUDA_ALLOC_CONF)")
    if settings.get("not_modelled"):
        notes.append(
            "PYTORCH_CUDA_ALLOC_CONF settings not modelled (replayed with their defaults): "
            + ", ".join(settings["not_modelled"])
        )
    rows = [_card(name, gib, memory, others, calibration, margin, dtypes) for name, gib in cards.items()]
    recorded = "with CUDA's autocast policy" if dtypes else "no autocast region, so no cast policy to apply"
    elsewhere = [r["card"] for r in rows if r.get("projected") and not r["non_allocator_measured_here"]]
    if elsewhere:
        notes.append(
            f"memory beyond the allocator measured on {calibration.device} only; reused for " + ", ".join(elsewhere)
        )
    return {
        "available": True,
        "step": step.get("index"),
        "batch": scaling["batch"] if scaling else None,
        "sequence_length": scaling["sequence_length"] if scaling else None,
        "autocast_dtypes": dtypes,
        "replay": {k: replayed[k] for k in ("allocated_start", "peak_allocated", "reserved", "phases")},
        "scaling": scaling,
        "calibration": calibration.to_dict(),
        "margin": margin,
        "method": "the step recorded on the CPU (CUDA's autocast policy and fused dropout kernels applied), "
        "replayed through a model of PyTorch's CUDA caching allocator, plus cuBLAS workspaces per card, plus the "
        "memory a GPU process uses beyond its allocator from the calibration",
        "methods": {
            "allocated_peak": f"the step's allocations and frees, recorded on the CPU ({recorded}), "
            "replayed through a model of PyTorch's CUDA caching allocator, with 2 cuBLAS workspaces (the script's "
            "thread and autograd's) of PyTorch's default size for the card's compute capability allocated where "
            "each thread first ran a cuBLAS operator",
            "reserved_peak": "the same replay's segments (cached across steps)",
            "device_used_peak": f"the reserved peak plus {calibration.non_allocator:,} B that a GPU process used "
            f"beyond its allocator (NVML used - memory_reserved) on the calibration step ({calibration.device})",
        },
        "cards": rows,
        "notes": notes,
    }


def _card(
    name: str,
    gib: float,
    memory: MemoryJSON,
    others: list[tuple[int, MemoryJSON]],
    calibration: Calibration,
    margin: float,
    dtypes: list[str],
) -> dict[str, Any]:
    capacity = int(gib * GIB)
    usable = int(capacity * (1 - margin))
    capability = capability_of(name)
    row: dict[str, Any] = {
        "card": name,
        "capacity": capacity,
        "usable": usable,
        "compute_capability": list(capability) if capability else None,
    }
    if "bfloat16" in dtypes and capability is not None and capability < (8, 0):
        return {
            **row,
            "projected": False,
            "reason": f"bf16 autocast needs compute capability 8.0 or newer; {name} has "
            f"{capability[0]}.{capability[1]}",
        }
    workspace = cublas_workspace(capability)
    step, replayed, by_batch = _replay_step(memory, workspace)  # the workspaces are in this replay
    scaling = _scaling(step, replayed, by_batch, others, workspace)
    allocated, reserved = replayed["peak_allocated"], replayed["reserved"]
    device_used = reserved + calibration.non_allocator
    largest = None
    if scaling is not None:
        largest = _largest(scaling["points"], usable - calibration.non_allocator)
    notes = []
    if capability is None:
        notes.append(
            f"{name}: compute capability unknown: the pre-Hopper cuBLAS workspace size assumed, "
            "bf16 support not checked"
        )
    measured_here = calibration.card == name or name.lower() in calibration.device.lower()
    return {
        **row,
        "projected": True,
        "cublas_workspace": workspace,
        "allocated_peak": allocated,
        "reserved_peak": reserved,
        "device_used_peak": device_used,
        "fits": device_used <= usable,
        "largest_batch": largest,
        "non_allocator_measured_here": measured_here,
        "notes": notes,
    }
