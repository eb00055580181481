"""Text tables of a job's ranks (rank 0's report): each category rank by rank, then other world sizes."""

from __future__ import annotations

from typing import Any

from tabulate import tabulate

from .units import format_bytes

__all__ = ["render_ranks"]

_LABELS = {
    "parameters": "parameters",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "reducer_buckets": "DDP gradient buckets",
    "unsharded_parameters": "FSDP gathered parameters (held after forward)",
    "activations": "activations (saved for backward)",
    "autocast_copies": "autocast weight copies",
}


def render_ranks(ranks: dict[str, Any]) -> list[str]:
    """The per-rank table and the projections of every model, then the job's notes."""
    parts = []
    for entry in ranks["models"]:
        parts.append(_by_rank(entry, ranks["world_size"]))
        projection = entry.get("projection") or {}
        if projection.get("available"):
            parts.append(_projection(projection))
    parts.extend(f"note: {n}" for n in ranks.get("notes", []))
    return parts


def _by_rank(entry: dict[str, Any], world_size: int) -> str:
    ranks = entry["ranks"]
    wrapper = entry.get("wrapper") or "no wrapper"
    if entry.get("optimizer_sharding"):
        wrapper += f" + {entry['optimizer_sharding']}"
    rows = []
    for cat, row in entry["categories"].items():
        label = _LABELS.get(cat, cat)
        cells = [format_bytes(b) if b is not None else "n/a" for b in row["by_rank"]]
        rows.append(
            [
                label,
                row.get("placement") or "",
                *cells,
                format_bytes(row["sum"]),
                format_bytes(row["max"]),
                row["max_rank"],
                format_bytes(row.get("global_bytes")),
            ]
        )
    total = entry["total"]
    rows.append(
        [
            "total",
            "",
            *map(format_bytes, total["by_rank"]),
            format_bytes(total["sum"]),
            format_bytes(total["max"]),
            total["max_rank"],
            "",
        ]
    )
    headers = ["category", "placement", *(f"rank {r}" for r in ranks), "sum", "max", "max on", "global"]
    title = (
        f"Memory by rank: {entry['name']} ({wrapper}, {len(ranks)} of {world_size} ranks reported; "
        "each rank's described step)"
    )
    return title + "\n" + tabulate(rows, headers=headers, disable_numparse=True)


def _projection(projection: dict[str, Any]) -> str:
    sizes = projection["world_sizes"]
    rows = []
    for s in projection["strategies"]:
        measured = ""
        if s.get("measured") is not None:
            err = s["error"] * 100
            measured = f"{format_bytes(s['measured'])} at N={s['measured_world_size']} ({err:+.1f}%)"
        rows.append([s["strategy"], s["formula"], *(format_bytes(s["per_rank"][str(n)]) for n in sizes), measured])
    x = projection["inputs"]
    inputs = ", ".join(f"{k} = {format_bytes(v)}" for k, v in x.items())
    table = tabulate(
        rows, headers=["strategy", "per rank", *(f"N={n}" for n in sizes), "measured (error)"], disable_numparse=True
    )
    smallest = []
    for s in projection["strategies"]:
        cards = [f"N={n}: {c or 'none'}" for n, c in s["smallest_card"].items()]
        smallest.append([s["strategy"], ", ".join(cards)])
    every = {c for s in projection["strategies"] for c in s["smallest_card"].values()}
    lines = [
        "Per-rank memory at other world sizes (formulas from the measured global sizes; " + inputs + ")",
        table,
        "",
    ]
    if len(every) == 1:
        lines.append(
            f"Smallest card that holds it (10% margin; CPU-measured categories only): {every.pop() or 'none'}, "
            "for every strategy and world size"
        )
    else:
        lines += [
            "Smallest card that holds it (10% margin; CPU-measured categories only, see the notes)",
            tabulate(smallest, headers=["strategy", "smallest card by world size"], disable_numparse=True),
        ]
    lines += [
        "",
        tabulate([[s["strategy"], s["source"]] for s in projection["strategies"]], headers=["formula", "source"]),
    ]
    lines += [f"note: {n}" for n in projection.get("notes", [])]
    return "\n".join(lines)
