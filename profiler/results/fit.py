"""Will it fit: the memory a step needs at any batch size, and the largest batch per card.

Fit planning models the peak as a fixed part (weights, gradients, optimizer
state, weight copies, CUDA context) plus a part that grows with the batch,
taken from two or more measured batch sizes when there are, else by scaling
the measured per-sample bytes (and saying so). The points are the steps the
report describes (``steps.described_steps``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import ProfilerError
from .estimates import model_states
from .schema import MemoryJSON
from .steps import batch_and_sequence, described_step, described_steps

__all__ = [
    "CARDS",
    "CARD_CAPABILITY",
    "FitPoint",
    "check_margin",
    "fit_points",
    "plan_fit",
    "predict_required",
    "resolve_card",
]

GIB = 1024**3

# Nominal memory of common cards, GiB, from their spec sheets. Usable memory is
# a few percent lower (ECC, driver reservations): that is what the margin covers.
CARDS: dict[str, float] = {
    "T4": 16,
    "L4": 24,
    "A10G": 24,
    "V100-16GB": 16,
    "V100-32GB": 32,
    "A100-40GB": 40,
    "A100-80GB": 80,
    "H100-80GB": 80,
    "H200": 141,
}

# Compute capability of each card (NVIDIA's CUDA GPUs list): what it can run (bf16 from 8.0) and
# PyTorch's cuBLAS workspace size for it.
CARD_CAPABILITY: dict[str, tuple[int, int]] = {
    "T4": (7, 5),
    "L4": (8, 9),
    "A10G": (8, 6),
    "V100-16GB": (7, 0),
    "V100-32GB": (7, 0),
    "A100-40GB": (8, 0),
    "A100-80GB": (8, 0),
    "H100-80GB": (9, 0),
    "H200": (9, 0),
}

_CARD_ALIASES = {"V100": "V100-16GB", "A100": "A100-80GB", "H100": "H100-80GB"}


@dataclass(frozen=True)
class FitPoint:
    """One measured step: its batch size and the memory it needed."""

    batch: int
    seq: int | None
    required: int  # bytes: allocator peak on CUDA, sum of measured categories on CPU
    fixed: int  # weights, gradients, optimizer state, weight copies
    context: int | None  # NVML process used - allocator reserved (CUDA context, workspaces)
    source: str


def fit_points(memory: MemoryJSON, batch_dim: int | None = None) -> list[FitPoint]:
    """The measured steps as planning points, one per batch size (the largest need)."""
    best: dict[tuple[int, int | None], FitPoint] = {}
    for step in described_steps(memory.get("steps", [])):
        if not step.get("complete") or not step.get("input_shape"):
            continue
        cat = step["categories"]
        fixed = model_states(cat)
        if step.get("peak_allocated") is not None:
            required, source = step["peak_allocated"], "allocator peak"
        elif step.get("live_tensor_peak") is not None:
            required, source = step["live_tensor_peak"], "live-tensor peak (dispatch tracking, no allocator on CPU)"
        else:
            required, source = fixed + cat["activations"], "sum of measured categories (no allocator on CPU)"
        context = None
        if step.get("nvml_process_used_peak") is not None and step.get("reserved") is not None:
            context = max(0, step["nvml_process_used_peak"] - step["reserved"])
        batch, seq = batch_and_sequence(step, batch_dim)
        if batch is None:
            continue
        point = FitPoint(batch, seq, required, fixed, context, source)
        key = (point.batch, point.seq)
        if key not in best or best[key].required < point.required:
            best[key] = point
    return sorted(best.values(), key=lambda p: p.batch)


def _linear_fit(points: list[FitPoint]) -> tuple[float, float]:
    """Least squares of required bytes against batch size: (bytes per sample, fixed bytes)."""
    xs = [p.batch for p in points]
    ys = [p.required for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var
    return slope, my - slope * mx


def plan_fit(
    memory: MemoryJSON,
    extra_points: list[FitPoint] | None = None,
    cards: dict[str, float] | None = None,
    margin: float = 0.10,
    focus: str | None = None,
    batch_dim: int | None = None,
) -> dict[str, Any]:
    """Predict the memory at any batch size and the largest batch each card holds.

    ``batch_dim``: which dimension of the input is the batch, when ``--fit-batches``
    found it (the one that followed the batch flag); else each step's own.
    """
    check_margin(margin)
    cards = dict(CARDS if cards is None else cards)
    if focus is not None:
        key = resolve_card(focus, cards)
        cards = {key: cards[key]}
    own = fit_points(memory, batch_dim)
    points = own + list(extra_points or [])
    seqs = {p.seq for p in points}
    if not points:
        return {"available": False, "reason": "no complete step with a batch input was measured", "cards": []}
    if len(seqs) > 1:
        # Different sequence lengths do not share one line: keep the most common.
        common = max(seqs, key=lambda s: sum(p.seq == s for p in points))
        points = [p for p in points if p.seq == common]
    batches = sorted({p.batch for p in points})
    context = max((p.context for p in points if p.context is not None), default=None)
    if len(batches) >= 2:
        per_sample, fixed = _linear_fit(points)
        method = f"linear fit over measured batch sizes {batches}"
    else:
        p = points[0]
        per_sample = (p.required - p.fixed) / p.batch
        fixed = p.fixed
        method = (
            f"one measured batch size ({p.batch}): assumed everything but weights, gradients, optimizer state "
            "and weight copies grows in proportion to the batch"
        )
    notes = []
    if context is None:
        notes.append("CUDA context and library workspaces not measured (no NVML process figure): not included")
    if points[0].source.startswith("sum"):
        notes.append(
            "measured on CPU: temporaries, the allocator's slack and what only a GPU has are not counted, and the "
            "same dtypes are assumed on the GPU; --project (or --fit CARD) projects the step onto GPUs"
        )
    elif points[0].source.startswith("live"):
        notes.append(
            "measured on CPU: the allocator's slack and what only a GPU has are not counted; --project (or --fit "
            "CARD) projects the step onto GPUs"
        )
    ctx = context or 0

    def required(batch: int) -> int:
        return int(round(fixed + per_sample * batch)) + ctx

    measured_batch = max(p.batch for p in own) if own else max(batches)  # the size the user ran
    rows = []
    for name, gib in cards.items():
        capacity = int(gib * GIB)
        usable = capacity * (1 - margin)
        if per_sample > 0:
            largest = math.floor((usable - fixed - ctx) / per_sample)
            largest = max(largest, 0)
        else:
            largest = None
        rows.append(
            {
                "card": name,
                "capacity": capacity,
                "usable": int(usable),
                "required_at_measured_batch": required(measured_batch),
                "fits_at_measured_batch": required(measured_batch) <= usable,
                "largest_batch": largest,
            }
        )
    return {
        "available": True,
        "method": method,
        "sequence_length": points[0].seq,
        "measured_batches": batches,
        "measured_batch": measured_batch,
        "batch_source": _batch_source(memory, batch_dim),
        "source": points[0].source,
        "bytes_per_sample": per_sample,
        "fixed_bytes": int(fixed),
        "context_bytes": context,
        "margin": margin,
        "points": [
            {"batch": p.batch, "seq": p.seq, "required": p.required, "fixed": p.fixed, "context": p.context}
            for p in points
        ],
        "cards": rows,
        "notes": notes,
    }


def _batch_source(memory: MemoryJSON, batch_dim: int | None) -> str | None:
    """How the batch dimension was found: by ``--fit-batches``, or as the described step says."""
    if batch_dim is not None:
        return f"the input's dimension {batch_dim} (the one that followed the batch flag in the --fit-batches runs)"
    step = described_step(memory.get("steps", []))
    return step.get("batch_source") if step is not None else None


def predict_required(fit: dict[str, Any], batch: int, include_context: bool = True) -> int:
    """Bytes the fitted model predicts at ``batch``.

    Without the context it is directly comparable with the quantity that was
    fitted (the allocator's peak on CUDA, the measured categories on CPU).
    """
    context = (fit["context_bytes"] or 0) if include_context else 0
    return int(round(fit["fixed_bytes"] + fit["bytes_per_sample"] * batch)) + context


def check_margin(margin: float) -> None:
    """A safety margin is a fraction of the card left unused: 0 up to (not including) 1."""
    if not 0 <= margin < 1:
        raise ProfilerError(f"--margin must be at least 0 and below 1, got {margin}")


def resolve_card(name: str, cards: dict[str, float]) -> str:
    """Case-insensitive card lookup, with a one-line error listing the known names."""
    lowered = {k.lower(): k for k in cards}
    key = _CARD_ALIASES.get(name.upper(), name)
    if key.lower() in lowered:
        return lowered[key.lower()]
    raise ProfilerError(f"unknown card {name!r}; known: {', '.join(cards)} (add one with --gpu NAME=GiB)")
