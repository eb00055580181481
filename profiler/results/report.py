"""The Report: one object that every collector fills and every renderer reads, and its JSON.

Data only: the text tables are in ``render``, the picture in ``plot``. The
JSON form is a public contract (see ``schema``): keys may be added freely, but
renaming or dropping one needs a new ``SCHEMA`` version.
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any

from ..model.buckets import Buckets
from ..model.inventory import Inventory
from .render import render_model, render_report
from .schema import SCHEMA, MemoryJSON

__all__ = ["SCHEMA", "ModelReport", "Report"]


@dataclass
class ModelReport:
    """What is known about one model: its inventory, buckets and (later) memory."""

    name: str
    inventory: Inventory
    buckets: Buckets
    memory: MemoryJSON | None = None
    estimates: dict[str, Any] | None = None
    fit: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # further sections, already JSON-shaped
    setup: Any = field(default=None, repr=False)  # the distributed job it was measured in (not in the JSON)

    def parameters_dict(self) -> dict[str, Any]:
        inv, b = self.inventory, self.buckets
        return {
            "total": inv.total,
            "total_with_duplicates": inv.total_with_duplicates,
            "trainable": inv.trainable,
            "frozen": inv.total - inv.trainable,
            "uninitialized": list(inv.uninitialized),
            "bytes": inv.bytes,
            "dtypes": inv.dtype_counts(),
            "weight_memory": inv.weight_memory(),
            "buckets": dict(b.totals),
            "buckets_placed_by": "run order" if b.run_order else "registration order",
            "recurrent_cores": list(b.cores),
            "bucket_bytes": dict(b.bytes),
            "trunks": [
                {
                    "path": t.path,
                    "blocks": t.blocks,
                    "params_per_block": t.params_per_block,
                    "params": t.params,
                    "block_paths": t.block_paths,
                    "representative": t.representative,
                    "breakdown": [
                        {"module": p.module, "type": p.type, "name": p.name, "shape": list(p.shape), "numel": p.numel}
                        for p in t.breakdown
                    ],
                }
                for t in b.trunks
            ],
            "tied": [
                {
                    "aliases": list(p.aliases),
                    "numel": p.numel,
                    "bytes": p.nbytes,
                    "charged_to": b.param_bucket[p.name],
                    "alias_buckets": {a: b.alias_bucket[a] for a in p.aliases},
                }
                for p in inv.tie_groups
            ],
            "modules": [
                {
                    "path": m.path,
                    "type": m.type,
                    "depth": m.depth,
                    "params": m.params,
                    "bytes": m.bytes,
                    "own_params": m.own_params,
                    "trainable": m.trainable,
                    "frozen": m.frozen,
                    "dtypes": m.dtypes,
                    "buffers": m.buffers,
                    "buffer_bytes": m.buffer_bytes,
                    "bucket": b.module_bucket[m.path],
                }
                for m in inv.modules
            ],
        }

    def to_dict(self) -> dict[str, Any]:
        inv = self.inventory
        out: dict[str, Any] = {
            "name": self.name,
            "class": inv.model_class,
            "parameters": self.parameters_dict(),
            "buffers": {
                "total": inv.buffer_total,
                "bytes": inv.buffer_bytes,
                "persistent": sum(x.numel for x in inv.buffers if x.persistent),
                "non_persistent": sum(x.numel for x in inv.buffers if not x.persistent),
            },
        }
        if self.memory is not None:
            out["memory"] = self.memory
        if self.estimates is not None:
            out["estimates"] = self.estimates
        if self.fit is not None:
            out["fit"] = self.fit
        out.update(self.extra)
        return out

    def render(self, depth: int = 2) -> str:
        """This model's text report (see ``render.render_model``)."""
        return render_model(self, depth)


@dataclass
class Report:
    """The result of ``analyze`` or ``profile``: one entry per model."""

    models: list[ModelReport]
    notes: list[str] = field(default_factory=list)
    script: dict[str, Any] | None = None
    ranks: dict[str, Any] | None = None  # rank 0 of a distributed job: every rank's figures (see results.ranks)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema": SCHEMA, "models": [m.to_dict() for m in self.models]}
        if self.ranks is not None:
            out["ranks"] = self.ranks
        if self.notes:
            out["notes"] = list(self.notes)
        if self.script is not None:
            out["script"] = self.script
        return out

    def to_json(self, path: str | os.PathLike[str] | None = None, indent: int = 2) -> str:
        """Return the JSON text and, when ``path`` is given, write it there."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
        return text

    def render(self, depth: int = 2) -> str:
        """The text tables (see ``render.render_report``)."""
        return render_report(self, depth)

    def plot(self, path: str | os.PathLike[str], model: str | None = None, step: int | None = None) -> pathlib.Path:
        """Draw one model's measured step as a PNG (needs matplotlib; see ``plot.plot_report``)."""
        from .plot import plot_report

        return plot_report(self.to_dict(), path, model=model, step=step)

    def __str__(self) -> str:
        return self.render()

    def model(self, name: str) -> ModelReport:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)
