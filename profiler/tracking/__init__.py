"""Measuring a training step: the hooks, what they observe, and the records they fill.

``StepTracker`` owns one part per thing observed (module calls, saved-tensor
hooks, the ledger of saved storages and gradients, phases, the optimizer,
backward reaching a forward's output); ``StepRecord`` is what one step
measured. Nothing here knows about reports: ``profiler.results`` reads the
records.
"""

from .module_calls import OUTSIDE
from .optimizers import drop_retired_hooks
from .step_record import PHASES, ForwardSaves, PhaseRecord, StepRecord
from .tracker import StepState, StepTracker

__all__ = [
    "OUTSIDE",
    "PHASES",
    "ForwardSaves",
    "PhaseRecord",
    "StepRecord",
    "StepState",
    "StepTracker",
    "drop_retired_hooks",
]
