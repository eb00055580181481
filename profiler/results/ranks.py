"""Rank 0's view of a job: every rank's categories side by side, and what other world sizes would hold.

Input: the summaries ``gather.exchange`` brought (each rank's
``rank_section`` per model). Output: the report's ``ranks`` section: per
category each rank's bytes, their sum, the largest and which rank holds it;
then projections of per-rank memory for DDP, ZeRO-1, ZeRO-2 and FSDP (ZeRO-3)
at other world sizes, from the global sizes measured here, each formula with
its source and, where the run used that strategy, its error against the
measured ranks.
"""

from __future__ import annotations

import math
from typing import Any

from .fit import CARDS, GIB
from .rank_section import CATEGORY_ORDER, strategy_of
from .report import Report

__all__ = ["PROJECTED_WORLD_SIZES", "STRATEGIES", "merge_ranks", "project_world_sizes", "unit_hints"]

PROJECTED_WORLD_SIZES = (1, 2, 4, 8, 16, 64)

# name -> (formula, source). P, G, O: global parameter, gradient and optimizer-state bytes;
# B: DDP's gradient buckets; R: FSDP's root unit, gathered from forward into backward; A: one
# rank's activations (its own micro-batch: the same at any world size); N: ranks.
STRATEGIES: dict[str, tuple[str, str]] = {
    "DDP": (
        "P + G + B + O + A",
        "PyTorch DDP design note: every rank holds the whole model; the reducer's buckets hold a copy of the "
        "gradients (B = G unless gradient_as_bucket_view)",
    ),
    "ZeRO-1": (
        "P + G + B + O/N + A",
        "Rajbhandari et al. 2020 (ZeRO), P_os: optimizer state partitioned; torch's ZeroRedundancyOptimizer "
        "partitions by whole parameters, so its largest rank holds more than O/N",
    ),
    "ZeRO-2": (
        "P + G/N + O/N + A",
        "Rajbhandari et al. 2020 (ZeRO), P_os+g: gradients reduce-scattered too (DeepSpeed stage 2; not in torch)",
    ),
    "FSDP": (
        "(P + G + O)/N + R + A",
        "Rajbhandari et al. 2020 (ZeRO), P_os+g+p, as torch FSDP runs it: every unit is freed after its forward "
        "except the root (R), which backward begins with",
    ),
}


# Figures each rank has its own of (the rest of a category's keys are the same on every rank).
_PER_RANK_KEYS = ("local_bytes", "storage_bytes", "saved_bytes", "bucket_bytes")


def _sum_or_none(values: list[int | None]) -> int | None:
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def _category_row(name: str, sections: dict[int, dict], reported: list[int]) -> dict[str, Any] | None:
    cats = {r: sections[r]["categories"].get(name) for r in reported if r in sections}
    present = {r: c for r, c in cats.items() if c is not None}
    if not present:
        return None
    by_rank = [int(present[r].get("bytes") or 0) if r in present else None for r in reported]
    known = [(b, r) for b, r in zip(by_rank, reported) if b is not None]
    biggest, where = max(known, key=lambda x: (x[0], -x[1])) if known else (None, None)  # ties: the lowest rank
    first = next(iter(present.values()))
    row: dict[str, Any] = {
        "placement": first.get("placement"),
        "by_rank": by_rank,
        "sum": _sum_or_none(by_rank),
        "max": biggest,
        "max_rank": where,
    }
    for key, value in first.items():
        if key in ("placement", "bytes"):
            continue
        if key in _PER_RANK_KEYS:
            row[f"{key}_by_rank"] = [present[r].get(key) if r in present else None for r in reported]
        else:
            row[key] = value  # the same on every rank: global sizes, the unit sizes, where a figure comes from
    return row


def merge_ranks(
    got: dict[int, dict], world_size: int, notes: list[str], unit_hints: dict[str, tuple[int, int]] | None = None
) -> dict[str, Any]:
    """The ``ranks`` section from every rank's summary (``got``: rank -> summary)."""
    reported = sorted(got)
    out: dict[str, Any] = {
        "world_size": world_size,
        "reported": reported,
        "missing": [r for r in range(world_size) if r not in got],
        "measured_nothing": [r for r in reported if not got[r].get("measured")],
        "files": {str(r): got[r].get("file") for r in reported},
        "notes": list(notes),
        "models": [],
    }
    if out["measured_nothing"]:
        out["notes"].append(
            f"rank {', '.join(map(str, out['measured_nothing']))} measured no training step of a model: nothing from it"
        )
    names: list[str] = []
    for r in reported:
        names += [m["name"] for m in got[r].get("models", []) if m["name"] not in names]
    for name in names:
        sections = {
            r: m["parallel"] for r in reported for m in got[r].get("models", []) if m["name"] == name and m["parallel"]
        }
        ranks = [r for r in reported if r in sections]
        first = sections[ranks[0]]
        entry: dict[str, Any] = {
            "name": name,
            "wrapper": first.get("wrapper"),
            "optimizer_sharding": first.get("optimizer_sharding"),
            "strategy": first.get("strategy"),
            "ranks": ranks,
            "step": {str(r): sections[r].get("step") for r in ranks},
            "categories": {},
        }
        complete = len(ranks) == world_size
        for cat in CATEGORY_ORDER:
            row = _category_row(cat, sections, ranks)
            if row is None:
                continue
            if row.get("global_bytes", 0) is None and complete:
                row["global_bytes"] = row["sum"]  # split with no global view on any rank: the ranks' parts
                row["global_from"] = "sum over ranks"
            entry["categories"][cat] = row
        totals = [int(sections[r].get("total") or 0) for r in ranks]
        top = max(zip(totals, ranks), key=lambda x: (x[0], -x[1])) if totals else (0, None)
        entry["total"] = {"by_rank": totals, "sum": sum(totals), "max": top[0], "max_rank": top[1]}
        entry["projection"] = project_world_sizes(entry, world_size, complete, (unit_hints or {}).get(name))
        out["models"].append(entry)
    return out


def _global(entry: dict[str, Any], cat: str, complete: bool) -> int | None:
    """A category's global bytes: read from the model, else (split without a global view) the ranks' sum."""
    row = entry["categories"].get(cat)
    if row is None:
        return 0
    if row.get("global_bytes") is not None:
        return int(row["global_bytes"])
    if row.get("placement") in ("partitioned", "sharded"):
        return row["sum"] if complete else None
    return row["max"]


def project_world_sizes(
    entry: dict[str, Any], world_size: int, complete: bool, unit_hint: tuple[int, int] | None
) -> dict[str, Any]:
    """Per-rank bytes for each strategy at several world sizes, beside the measured ranks."""
    cats = entry["categories"]
    p, g, o = (_global(entry, c, complete) for c in ("parameters", "gradients", "optimizer_state"))
    notes: list[str] = []
    if None in (p, g, o):
        return {
            "available": False,
            "reason": "the optimizer state is split without a global view and some rank did not report",
        }
    a = max(
        (x or 0) + (y or 0)
        for x, y in zip(
            cats.get("activations", {}).get("by_rank", [0]), cats.get("autocast_copies", {}).get("by_rank", [0])
        )
    )
    buckets = cats.get("reducer_buckets")
    b = g if buckets is None or buckets.get("max") is None else buckets["max"]
    if buckets is None:
        notes.append("B: not measured (no DDP in this run): taken as G, DDP's default")
    unsharded = cats.get("unsharded_parameters")
    if unsharded is not None:
        r = int(unsharded.get("root_unit_bytes") or 0)
        x = int(unsharded.get("largest_unit_bytes") or 0)
    elif unit_hint is not None:
        r, x = unit_hint
        notes.append("R: no FSDP in this run: the parameters outside the trunk's blocks, as if each block were a unit")
    else:
        r, x = p, 0
        notes.append("R: no FSDP unit and no repeated block known: the whole model as one unit")
    if x:
        notes.append(
            f"FSDP: while backward runs, the unit being computed (and the next, prefetched) is gathered too: up "
            f"to 2 x the largest unit = {_mib(2 * x)} more at moments, a transient like temporaries, not in these "
            "figures"
        )
    notes.append("FSDP at N=1: nothing is sharded, so nothing is gathered beside it (no R)")
    inputs = {"P": p, "G": g, "O": o, "B": b, "R": r, "A": a}
    sizes = sorted(set(PROJECTED_WORLD_SIZES) | {world_size})
    measured_strategy = strategy_of(entry.get("wrapper"), entry.get("optimizer_sharding"))
    measured = entry["total"]["max"] if complete else None
    rows = []
    for name, (formula, source) in STRATEGIES.items():
        per_rank = {str(n): _formula(name, n, inputs) for n in sizes}
        row: dict[str, Any] = {
            "strategy": name,
            "formula": formula,
            "source": source,
            "per_rank": per_rank,
            "smallest_card": {n: _smallest_card(v) for n, v in per_rank.items()},
        }
        if name == measured_strategy and measured:
            predicted = per_rank[str(world_size)]
            row["measured"] = measured
            row["measured_world_size"] = world_size
            row["error"] = round((predicted - measured) / measured, 4)
        rows.append(row)
    notes.append(
        "A is one rank's measured activations (its own micro-batch, the same at any world size); "
        "temporaries, communication buffers and the CUDA context are not in these figures"
    )
    return {"available": True, "inputs": inputs, "world_sizes": sizes, "strategies": rows, "notes": notes}


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _formula(name: str, n: int, x: dict[str, int]) -> int:
    p, g, o, b, r, a = x["P"], x["G"], x["O"], x["B"], x["R"], x["A"]
    if name == "DDP":
        return p + g + b + o + a
    if name == "ZeRO-1":
        return p + g + b + math.ceil(o / n) + a
    if name == "ZeRO-2":
        return p + math.ceil(g / n) + math.ceil(o / n) + a
    return math.ceil((p + g + o) / n) + (r if n > 1 else 0) + a  # the gathered root is a buffer beside its shard


def _smallest_card(nbytes: int, margin: float = 0.10) -> str | None:
    """The smallest card (of ``fit.CARDS``) whose memory, less the margin, holds ``nbytes``."""
    fitting = [(gib, name) for name, gib in CARDS.items() if nbytes <= gib * GIB * (1 - margin)]
    return min(fitting)[1] if fitting else None


def unit_hints(report: Report) -> dict[str, tuple[int, int]]:
    """Per model, as if FSDP wrapped each trunk block: (the root unit's bytes, the largest unit's).

    The root unit is then what is outside the blocks (embeddings, final norm, head).
    """
    hints = {}
    for m in report.models:
        inv = m.inventory
        if m.buckets.trunks and inv.total:
            per_param = inv.bytes / inv.total
            block = max(t.params_per_block for t in m.buckets.trunks)
            outside = inv.total - sum(t.params for t in m.buckets.trunks)
            hints[m.name] = (round(outside * per_param), round(max(block, outside) * per_param))
    return hints
