"""``analyze(model)``: the static inventory, buckets and ties of any ``nn.Module``.

Works on CPU, CUDA and the meta device because it reads only shapes, dtypes and
storage identity, never values.
"""

from __future__ import annotations

from torch import nn

from .buckets import find_buckets
from .errors import ProfilerError
from .inventory import take_inventory
from .report import ModelReport, Report

__all__ = ["analyze", "analyze_model"]


def analyze_model(model: nn.Module, name: str | None = None) -> ModelReport:
    """Inventory and buckets of one model, as one entry of a Report."""
    if not isinstance(model, nn.Module):
        raise ProfilerError(f"analyze() needs a torch.nn.Module, got {type(model).__module__}.{type(model).__qualname__}")
    inventory = take_inventory(model)
    if not inventory.parameters and not inventory.uninitialized:
        raise ProfilerError(f"{name or type(model).__name__} has no parameters to analyse")
    return ModelReport(name=name or type(model).__name__, inventory=inventory, buckets=find_buckets(model, inventory))


def analyze(model: nn.Module, name: str | None = None) -> Report:
    """Count the parameters, bytes, ties and buckets of ``model``.

    >>> report = analyze(model)
    >>> print(report.render(depth=2))
    >>> report.to_json("model.json")
    """
    return Report(models=[analyze_model(model, name)])
