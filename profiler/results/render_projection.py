"""The GPU projection as text: one row per card, each figure's method below the table."""

from __future__ import annotations

from typing import Any

from tabulate import tabulate

from .units import format_bytes

__all__ = ["render_projection"]


def render_projection(projection: dict[str, Any]) -> list[str]:
    """Allocated, reserved and device-used peaks per card, whether the measured batch fits, the largest batch."""
    if not projection.get("available"):
        return [f"GPU projection: {projection.get('reason')}"]
    rows, skipped = [], []
    for c in projection["cards"]:
        if not c.get("projected"):
            skipped.append(f"{c['card']}: not projected: {c['reason']}")
            continue
        rows.append(
            [
                c["card"],
                format_bytes(c["capacity"]),
                format_bytes(c["allocated_peak"]),
                format_bytes(c["reserved_peak"]),
                format_bytes(c["device_used_peak"]),
                "yes" if c["fits"] else "no",
                "n/a" if c["largest_batch"] is None else str(c["largest_batch"]),
            ]
        )
    batch, seq = projection.get("batch"), projection.get("sequence_length")
    shape = "" if batch is None else f"batch {batch}" + ("" if seq is None else f", seq {seq}") + "; "
    dtypes = ", ".join(projection.get("autocast_dtypes") or []) or "no autocast"
    head = (
        f"GPU projection of step {projection['step']} ({shape}{dtypes}; "
        f"safety margin {100 * projection['margin']:.0f}% of each card)"
    )
    if not rows:  # nothing to show figures for: say why, card by card
        return [
            f"GPU projection of step {projection['step']} ({shape}{dtypes}): no card asked for can run it\n"
            + "\n".join(skipped)
        ]
    parts = [
        head
        + "\n"
        + tabulate(
            rows,
            headers=["card", "memory", "allocated peak", "reserved peak", "device used", "fits", "largest batch"],
            colalign=("left", "right", "right", "right", "right", "left", "right"),
        )
    ]
    methods = projection["methods"]
    parts.append(
        "\n".join(
            [
                f"allocated peak: {methods['allocated_peak']}",
                f"reserved peak: {methods['reserved_peak']}",
                f"device used: {methods['device_used_peak']}",
                f"calibration: {projection['calibration']['source']}",
            ]
            + ([f"largest batch: {projection['scaling']['method']}"] if projection.get("scaling") else [])
            + skipped
            + [f"note: {n}" for n in projection.get("notes", [])]
            + [f"note: {n}" for c in projection["cards"] for n in c.get("notes", [])]
        )
    )
    return parts
