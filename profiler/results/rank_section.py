"""One rank's memory, category by category, with how the data-parallel wrapper spreads each.

The measured step gives what this rank's memory held (its local shards, its
own activations); the tracker's ``ParallelWatch`` gives the wrapper and the
global figures read from the model (a DTensor's global shape, a flat
parameter's unpadded size). Each category says its placement, so the per-rank
table and the projections to other world sizes know which figures divide by
the number of ranks and which do not.
"""

from __future__ import annotations

from typing import Any

from ..tracking.parallel import ParallelWatch
from .schema import MemoryJSON
from .steps import described_step

__all__ = ["CATEGORY_ORDER", "rank_section", "rank_total", "strategy_of"]

# Rows of the per-rank table, in order (the JSON keys of rank_section's "categories").
CATEGORY_ORDER = (
    "parameters",
    "gradients",
    "optimizer_state",
    "reducer_buckets",
    "unsharded_parameters",
    "activations",
    "autocast_copies",
)


def strategy_of(wrapper: str | None, optimizer_sharding: str | None) -> str:
    """The data-parallel strategy a run used, as the projections name them."""
    if wrapper in ("FSDP", "FSDP2"):
        return "FSDP"
    if optimizer_sharding == "ZeRO-1":
        return "ZeRO-1"
    return "DDP"


def rank_section(watch: ParallelWatch, memory: MemoryJSON | None) -> dict[str, Any] | None:
    """This rank's categories for one model, or None outside a distributed job."""
    setup = watch.setup
    if setup is None:
        return None
    out: dict[str, Any] = {
        "rank": setup.rank,
        "world_size": setup.world_size,
        "local_rank": setup.local_rank,
        "backend": setup.backend,
    }
    layout = watch.layout or {}
    if "error" in layout:
        out["notes"] = [f"the wrapper's layout could not be read: {layout['error']}"]
    step = described_step(memory["steps"]) if memory is not None else None
    out["wrapper"] = layout.get("wrapper")
    out["optimizer_sharding"] = layout.get("optimizer_sharding")
    out["strategy"] = strategy_of(out["wrapper"], out["optimizer_sharding"])
    out["step"] = step["index"] if step is not None else None
    count = layout.get("parameters", {}).get("global_count")
    if out["wrapper"] == "FSDP" and count is not None:
        out.setdefault("notes", []).append(
            "FSDP1: the parameter tables show this rank's flat-parameter shards, as model.parameters() does; "
            f"the model has {count:,} parameters in all"
        )
    if step is None:
        out["categories"] = {}
        out["total"] = 0
        return out
    cats = step["categories"]
    params = dict(layout.get("parameters", {"placement": "replicated"}))
    params["bytes"] = cats["parameters"]  # what the rank holds: its (padded) local storages
    grads = dict(layout.get("gradients", {"placement": "replicated"}))
    grads["bytes"] = cats["gradients"]
    opt = dict(layout.get("optimizer_state", {"placement": "replicated"}))
    opt["bytes"] = cats["optimizer_state"]
    categories: dict[str, Any] = {"parameters": params, "gradients": grads, "optimizer_state": opt}
    buckets = layout.get("reducer_buckets")
    if buckets is not None:
        views = buckets["gradients_are_views"]
        categories["reducer_buckets"] = {
            "placement": "replicated",
            # With gradient_as_bucket_view the gradients live in the buckets: counted once, as gradients.
            "bytes": 0 if views or buckets["bytes"] is None else buckets["bytes"],
            "bucket_bytes": buckets["bytes"],
            "gradients_are_views": views,
            "source": "DDP's reducer (its logging data: bucket sizes)",
        }
    if "fsdp_units" in layout:
        categories["unsharded_parameters"] = {
            "placement": "per-rank",
            "bytes": step.get("unsharded_parameters_held", 0),
            "saved_bytes": step.get("unsharded_parameters_saved", 0),
            "largest_unit_bytes": max(layout["fsdp_units"], default=0),
            "root_unit_bytes": layout.get("fsdp_root_unit", 0),
            "units": len(layout["fsdp_units"]),
        }
    categories["activations"] = {"placement": "per-rank", "bytes": cats["activations"]}
    categories["autocast_copies"] = {"placement": "per-rank", "bytes": cats["autocast_copies"]}
    out["categories"] = categories
    out["total"] = rank_total(categories)
    return out


def rank_total(categories: dict[str, Any]) -> int:
    """Bytes one rank held in all categories (a bucket that is the gradients' own memory counts once)."""
    return sum(int(c.get("bytes") or 0) for c in categories.values())
