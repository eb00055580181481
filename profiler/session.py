"""The models a script runs, each analysed and measured for its first steps.

The runner's bookkeeping, kept out of the command line: the watcher reports
each new model here at its first call, this attaches a StepTracker, and at the
end turns what was measured into one Report with the script's names for its
models.
"""

from __future__ import annotations

from torch import nn

from .analysis import analyze_model
from .discovery import outermost
from .memory import bucket_resolver
from .profiling import attach_memory
from .report import ModelReport, Report
from .tracking import StepTracker, StopAfterSteps

__all__ = ["ScriptSession", "name_models", "script_models"]


def name_models(models: list[nn.Module], script_globals: dict) -> list[str]:
    """Call each model by the script's variable name for it, else by its class."""
    by_id = {}
    for var, value in script_globals.items():
        if isinstance(value, nn.Module) and not var.startswith("_"):
            by_id.setdefault(id(value), var)
    names, used = [], set()
    for m in models:
        base = by_id.get(id(m), type(m).__name__)
        name, k = base, 2
        while name in used:
            name, k = f"{base}#{k}", k + 1
        used.add(name)
        names.append(name)
    return names


def script_models(script_globals: dict) -> list[nn.Module]:
    """Models left in the script's globals: the fallback when none was ever called."""
    found = [v for v in script_globals.values() if isinstance(v, nn.Module) and any(True for _ in v.parameters())]
    return outermost(found)


class ScriptSession:
    """Models found while the script runs, each measured for its first steps.

    A model is analysed and a StepTracker attached at its first call. Whatever
    goes wrong here is written into the report as a note: it must never stop
    the user's training.
    """

    def __init__(
        self, steps: int, stop_after_steps: bool, interval: float | None, plan: dict | None = None, live_peak: bool = False
    ) -> None:
        self.plan = plan or {}
        self.live_peak = live_peak
        self.steps = steps
        self.stop_after_steps = stop_after_steps
        self.interval = interval
        self.entries: dict[int, tuple[ModelReport, StepTracker | None]] = {}
        self.notes: list[str] = []

    def on_new_model(self, model: nn.Module, args: tuple = ()) -> None:
        try:
            entry = analyze_model(model, type(model).__name__)
        except Exception as exc:  # noqa: BLE001 - a report note, never a crash of the script
            self.notes.append(f"could not analyse {type(model).__name__}: {type(exc).__name__}: {exc}")
            return
        tracker = None
        if self.steps > 0:
            try:
                tracker = StepTracker(
                    model,
                    max_steps=self.steps,
                    sample_interval=self.interval,
                    bucket_of=bucket_resolver(entry.buckets),
                    on_finished=self._on_tracker_finished,
                    live_peak=self.live_peak,
                )
                tracker.start()
                tracker.enter_current_forward(args)
            except Exception as exc:  # noqa: BLE001 - a report note, never a crash of the script
                self.notes.append(f"could not measure {entry.name}: {type(exc).__name__}: {exc}")
                if tracker is not None:
                    tracker.stop()  # no hook, sampler thread or NVML handle left behind
                tracker = None
        self.entries[id(model)] = (entry, tracker)

    def _on_tracker_finished(self, tracker: StepTracker) -> None:
        # A model that has not trained (a teacher run under no_grad, an EMA copy)
        # never finishes its steps and must not keep the script running.
        pending = [t for _, t in self.entries.values() if t is not None and not t.finished and t.started_measuring]
        if self.stop_after_steps and not pending:
            raise StopAfterSteps()

    def close(self) -> None:
        for _, tracker in self.entries.values():
            if tracker is not None:
                tracker.stop()

    def report(self, models: list[nn.Module], script_globals: dict, extra_points: dict | None = None) -> Report:
        reports = []
        for model, name in zip(models, name_models(models, script_globals)):
            entry, tracker = self.entries.get(id(model), (None, None))
            try:
                if entry is None:
                    entry = analyze_model(model, name)
                entry.name = name
                if tracker is not None:
                    attach_memory(entry, tracker, extra_points=(extra_points or {}).get(name), **self.plan)
            except Exception as exc:  # noqa: BLE001 - one model we cannot describe must not cost the others
                self.notes.append(f"could not report {name}: {type(exc).__name__}: {exc}")
                continue
            reports.append(entry)
        return Report(models=reports, notes=list(self.notes))
