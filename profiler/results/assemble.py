"""Assemble a report entry: the static count of a model, then what its tracker measured.

The one place where a model, its tracker and the formulas meet: the
``profile`` API and the script session both build their entries here, so a
model measured either way is reported the same way.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from torch import nn

from ..errors import ProfilerError
from ..model.buckets import Structure, bucket_resolver, find_buckets, find_structure
from ..model.inventory import take_inventory
from ..model.traits import ModelTraits
from ..tracking import StepTracker
from .calibration import Calibration
from .estimates import estimates_section
from .fit import FitPoint, plan_fit
from .gpu_projection import project_gpu
from .memory_section import memory_section
from .rank_section import rank_section
from .report import ModelReport

__all__ = ["analyze_for_tracking", "analyze_model", "attach_measurements", "attach_memory", "rebucketing"]


def analyze_model(model: nn.Module, name: str | None = None, run_order: dict[str, int] | None = None) -> ModelReport:
    """Inventory and buckets of one model, as one entry of a Report.

    A module without parameters (``nn.ReLU()``, an empty ``Sequential``) is
    counted too: zero parameters is an answer, not an error. ``run_order``:
    the order its modules were seen to run in, when a forward was measured.
    """
    return _analyzed(model, name, run_order)[0]


def _analyzed(model: nn.Module, name: str | None, run_order: dict[str, int] | None) -> tuple[ModelReport, Structure]:
    if not isinstance(model, nn.Module):
        raise ProfilerError(
            f"analyze() needs a torch.nn.Module, got {type(model).__module__}.{type(model).__qualname__}"
        )
    inventory = take_inventory(model)
    structure = find_structure(model, inventory)
    buckets = find_buckets(model, inventory, run_order, structure)
    return ModelReport(name=name or type(model).__name__, inventory=inventory, buckets=buckets), structure


def analyze_for_tracking(
    model: nn.Module, name: str | None = None
) -> tuple[ModelReport, Callable[[dict[str, int]], Callable[[str, str], str]]]:
    """``analyze_model``, and the entry's ``rebucketing`` made from the same reading of its structure.

    The rebucketing then runs inside the first training step without walking
    the model again (only the run order is new).
    """
    entry, structure = _analyzed(model, name, None)
    return entry, rebucketing(entry, model, structure)


def rebucketing(
    entry: ModelReport, model: nn.Module, structure: Structure | None = None
) -> Callable[[dict[str, int]], Callable[[str, str], str]]:
    """What a tracker calls once a forward showed the order the modules run in: the entry's buckets follow it.

    Returns the bucket resolver the tracker charges saves with from then on.
    The model is held weakly (the runner lets the script drop it).
    """
    model_ref = weakref.ref(model)
    # Read now (the first forward is inside a training step), unless lazy parameters get their shapes only then.
    lazy = entry.inventory.uninitialized
    if structure is None and not lazy:
        structure = find_structure(model, entry.inventory)

    def rebucket(order: dict[str, int]) -> Callable[[str, str], str]:
        model = model_ref()
        if model is not None:
            entry.buckets = find_buckets(model, entry.inventory, order, None if lazy else structure)
        return bucket_resolver(entry.buckets)

    return rebucket


def attach_measurements(model_report: ModelReport, tracker: StepTracker, traits: ModelTraits | None = None) -> None:
    """The memory section and the estimates beside it: all that needs the tracker and its model.

    ``traits`` stand in for a model the script has dropped (the runner's trackers hold it weakly).
    """
    model_report.memory = memory_section(tracker, model_report.buckets)
    parallel = rank_section(tracker.parallel, model_report.memory)
    if parallel is not None:  # a rank of a distributed job
        model_report.extra["parallel"] = parallel
        model_report.setup = tracker.parallel.setup
    model = tracker.model
    model_report.estimates = estimates_section(model_report, model if model is not None else traits)


def attach_memory(
    model_report: ModelReport,
    tracker: StepTracker,
    *,
    cards: dict[str, float] | None = None,
    margin: float = 0.10,
    focus: str | None = None,
    extra_points: list[FitPoint] | None = None,
    calibration: Calibration | None = None,
) -> None:
    """Put a tracker's measurements, the estimates beside them and the fit plan into a report entry.

    With a ``calibration`` (a projection was asked for), the GPU projection too.
    """
    attach_measurements(model_report, tracker)
    model_report.fit = plan_fit(model_report.memory, extra_points=extra_points, cards=cards, margin=margin, focus=focus)
    if calibration is not None:
        model_report.extra["projection"] = project_gpu(
            model_report.memory, calibration, cards=cards, margin=margin, focus=focus
        )
