"""One run of a script: the models it calls, each analysed and measured for its first steps.

The runner's bookkeeping, kept out of the command line: the session owns the
model watcher, which reports each new model here at its first call; this
attaches a StepTracker, and at the end turns what was measured into one Report
with the script's names for its models. Models are held weakly, by the
trackers too: a script that builds a model per fold, per trial or per
checkpoint gets each one's memory back when it drops it, as without us. A
model's figures are taken out of its tracker once its steps are measured, or
once the script has dropped it.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from dataclasses import dataclass

from torch import nn

from ..model.buckets import bucket_resolver
from ..model.traits import ModelTraits, model_traits
from ..results.assemble import analyze_model, attach_measurements, rebucketing
from ..results.fit import plan_fit
from ..results.gpu_projection import project_gpu
from ..results.report import ModelReport, Report
from ..tracking import StepTracker, drop_retired_hooks
from ..tracking.fake_mode import FakePlan
from .batch_sweep import SweepResult
from .options import Options
from .runner import Program, ScriptResult, run_program
from .signals import Terminated
from .watcher import ModelWatcher, outermost

__all__ = ["ScriptSession", "StopAfterSteps", "name_models", "script_models"]


class StopAfterSteps(SystemExit):
    """Raised to end a script once its steps are measured (``--stop-after-steps``)."""

    def __init__(self) -> None:
        super().__init__(0)


def name_models(models: list[nn.Module | None], script_globals: dict, defaults: list[str] | None = None) -> list[str]:
    """Call each model by the script's variable name for it, else by its class (or its default name)."""
    by_id = {}
    for var, value in script_globals.items():
        if isinstance(value, nn.Module) and not var.startswith("_"):
            by_id.setdefault(id(value), var)
    names, used = [], set()
    for i, m in enumerate(models):
        fallback = defaults[i] if defaults else type(m).__name__
        base = by_id.get(id(m), fallback) if m is not None else fallback
        name, k = base, 2
        while name in used:
            name, k = f"{base}#{k}", k + 1
        used.add(name)
        names.append(name)
    return names


def _global_name(model: nn.Module) -> str | None:
    """The script's global name for ``model`` when it is found (its first call), if it has one.

    Kept as the model's name: a script may rebind the name later (a model
    reloaded from a checkpoint for evaluation), and the model trained under it
    keeps it.
    """
    main = sys.modules.get("__main__")
    for var, value in vars(main).items() if main is not None else ():
        if value is model and not var.startswith("_"):
            return var
    return None


def _fake_limit(exc: BaseException | None) -> str | None:
    """What fake tensors could not run, when that is why the script failed (else None)."""
    module = sys.modules.get("torch._subclasses.fake_tensor")
    if exc is None or module is None:
        return None
    func = getattr(exc, "func", None)
    what = str(func) if func is not None else "an operation"
    unsupported = getattr(module, "UnsupportedOperatorException", None)
    if unsupported is not None and isinstance(exc, unsupported):
        return f"{what} (an operator with no fake or meta implementation: a custom kernel?)"
    data = tuple(
        k
        for k in (
            getattr(module, "DataDependentOutputException", None),
            getattr(module, "DynamicOutputShapeException", None),
        )
        if k is not None
    )
    if data and isinstance(exc, data):
        return f"{what} (its output depends on the data)"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if "fake impl" in first or "meta impl" in first:  # a custom op registered without one
        return f"an operator without a fake implementation: {first[:200]}"
    if ".numpy()" in first and "subclass" in first:
        return "tensor.numpy(): fake tensors have no values to give"
    return None


def script_models(script_globals: dict) -> list[nn.Module]:
    """Models left in the script's globals: the fallback when none was ever called."""
    found = [v for v in script_globals.values() if isinstance(v, nn.Module) and any(True for _ in v.parameters())]
    return outermost(found)


@dataclass
class _Found:
    """One model the script called: its report entry, its tracker, and a weak reference to it."""

    model: weakref.ref
    entry: ModelReport
    tracker: StepTracker | None
    traits: ModelTraits | None = None  # what the estimates read from the model, for when it is gone
    measured: bool = False  # figures taken out of the tracker, model and optimizer let go


class ScriptSession:
    """Models found while the script runs, each measured for its first steps.

    A model is analysed and a StepTracker attached at its first call. Whatever
    goes wrong here is written into the report as a note: it must never stop
    the user's training.
    """

    def __init__(self, options: Options) -> None:
        self.options = options
        self._found: list[_Found] = []
        self.notes: list[str] = []
        self._watcher: ModelWatcher | None = None  # while the script runs
        self.plan: FakePlan | None = None  # --fake

    def run(self, program: Program) -> ScriptResult:
        """Run the script under the model watcher; every tracker is stopped when it ends, however it ends.

        Trackers observe module calls through the watcher's global hooks (see
        ``ModelWatcher.listen``), and ``--stop-after-steps`` is raised from its
        next module call (a tracker may finish inside ``optimizer.step()``;
        the rest of that iteration, scheduler and logging included, still runs).
        """
        self.plan = FakePlan() if self.options.fake else None
        try:
            with (
                self.plan if self.plan is not None else contextlib.nullcontext(),
                ModelWatcher(
                    on_new_model=self.on_new_model, on_compiled_first_call_end=self.on_compiled_first_call_end
                ) as watcher,
            ):
                self._watcher = watcher
                return run_program(program, self.options.args)
        finally:
            self._watcher = None
            self.close()

    def on_new_model(self, model: nn.Module, args: tuple = (), kwargs: dict | None = None) -> None:
        self._let_go_of_dropped_models()
        self._forget_parts_of(model)
        try:
            entry = analyze_model(model, _global_name(model) or type(model).__name__)
            traits = model_traits(model)
        except Exception as exc:  # noqa: BLE001 - a report note, never a crash of the script
            self.notes.append(f"could not analyse {type(model).__name__}: {type(exc).__name__}: {exc}")
            return
        tracker = None
        if self.options.steps > 0:
            try:
                tracker = StepTracker(
                    model,
                    max_steps=self.options.steps,
                    sample_interval=self.options.interval,
                    bucket_of=bucket_resolver(entry.buckets),
                    on_finished=self._on_tracker_finished,
                    live_peak=self.options.live_peak,
                    reuse_repeats=self.options.reuse_repeats,
                    project=self.options.project,
                    hold_model=False,
                    hooks_host=self._watcher,
                    rebucket=rebucketing(entry, model),
                )
                tracker.start()
                tracker.calls.enter_root(args, kwargs)  # the call it was found in is running
            except Exception as exc:  # noqa: BLE001 - a report note, never a crash of the script
                self.notes.append(f"could not measure {entry.name}: {type(exc).__name__}: {exc}")
                if tracker is not None:
                    tracker.stop()  # no hook, sampler thread or NVML handle left behind
                tracker = None
        self._found.append(_Found(weakref.ref(model), entry, tracker, traits))

    def on_compiled_first_call_end(self, model: nn.Module, args: tuple, output: object) -> None:
        """The call of a model compiled in place in which it was found has returned."""
        for found in self._found:
            if found.model() is model and found.tracker is not None:
                try:
                    found.tracker.calls.leave_root(args, output)
                except Exception as exc:  # noqa: BLE001 - a report note, never a crash of the script
                    self.notes.append(f"could not measure {found.entry.name}'s first call: {type(exc).__name__}: {exc}")

    def _forget_parts_of(self, model: nn.Module) -> None:
        """Drop what was found for a part of ``model`` called on its own before it.

        A part run alone first (a shape probe in ``__init__``, a frozen encoder
        warmed up) looked like a model. Its tracker, left on, would take the
        whole model's saved tensors when the part runs inside it; the part is
        measured as what it is, a part of ``model``. (Its report row would be
        left out for the same reason: the report lists outermost models.)
        """
        inner = {id(m) for m in model.modules() if m is not model}
        for found in list(self._found):
            part = found.model()
            if part is not None and id(part) in inner:
                if found.tracker is not None:
                    found.tracker.stop()
                self._found.remove(found)

    def _on_tracker_finished(self, tracker: StepTracker) -> None:
        for found in self._found:
            if found.tracker is tracker:
                self._take_measurements(found)
        # A model that has not trained (a teacher run under no_grad, an EMA copy)
        # never finishes its steps and must not keep the script running. A
        # tracker that stopped on an error of ours never asks for the stop.
        if not (self.options.stop_after_steps and tracker.measured_all_steps):
            return
        running = [f.tracker for f in self._found if f.tracker is not None and not f.tracker.finished]
        if any(t.trained for t in running):
            return  # the last of them to finish asks
        if self._watcher is None:
            raise StopAfterSteps()
        # A model whose forward ran with gradients on but no backward yet: the
        # other model of a GAN (its backward comes later in this iteration), or
        # an EMA copy evaluated with gradients on (never). The stop waits until
        # each shows which: a backward through it, or a graph freed unused.
        undecided = [t for t in running if t.started_measuring]

        def decide() -> bool | None:
            if any(t.trained and not t.finished for t in undecided):
                return None  # it trains: it asks for the stop when its steps are done
            return all(t.finished or t.never_trained for t in undecided)

        self._watcher.stop_script_at_next_call(StopAfterSteps(), decide if undecided else None)

    def _let_go_of_dropped_models(self) -> None:
        """Stop the trackers of models the script dropped before their steps were all measured.

        Done here, when a model is found, and at ``close()``, not from a
        weakref callback: that may run on any thread (the sampler's too) and
        inside torch's loop over optimizer hooks. Until then a dropped model's
        tracker ignores every hook.
        """
        for found in self._found:
            if found.tracker is not None and not found.measured and found.tracker.parameters.model_dropped:
                found.tracker.stop()
                self._take_measurements(found)

    def _take_measurements(self, found: _Found) -> None:
        """Turn a finished tracker's figures into the report entry, then let the model go."""
        try:
            attach_measurements(found.entry, found.tracker, found.traits)
        except Exception as exc:  # noqa: BLE001 - a report note, never a crash of the script
            self.notes.append(f"could not report the memory of {found.entry.name}: {type(exc).__name__}: {exc}")
        found.tracker.release()
        found.measured = True

    def unfinished(self) -> list[str]:
        """Models that began training but ran fewer steps than asked for (so far)."""
        return [
            f.entry.name
            for f in self._found
            if f.tracker is not None and f.tracker.started_measuring and not f.tracker.measured_all_steps
        ]

    def close(self) -> None:
        """Stop every tracker (the script has ended: no optimizer step is running)."""
        self._let_go_of_dropped_models()
        for found in self._found:
            if found.tracker is not None:
                found.tracker.stop()
        drop_retired_hooks()

    def report(self, result: ScriptResult, sweep: SweepResult | None = None) -> Report:
        """The Report of the run: one entry per model found (alive or let go), and notes on how the run went."""
        fallback = []
        if not self._found:
            fallback = script_models(result.globals)
            if fallback:
                self.notes.append("no model was called; reporting the models left in the script's globals")
        if isinstance(result.exception, Terminated):
            self.notes.append(
                f"the script was {result.exception} (a time limit?); the report covers what ran before it"
            )
        elif result.failed and self.plan is not None and _fake_limit(result.exception):
            self.notes.append(
                f"the plan stopped: fake tensors cannot run {_fake_limit(result.exception)} "
                f"({type(result.exception).__name__}); the report covers what ran before it, and nothing is "
                "projected for the rest"
            )
        elif result.failed:
            self.notes.append(
                f"the script raised {type(result.exception).__name__}; the report covers what ran before it"
                + (
                    " (on fake tensors, values read are answered with 0 or False: a check such as "
                    "`assert torch.isfinite(loss)` fails)"
                    if self.plan is not None and self.plan.reads
                    else ""
                )
            )
        elif isinstance(result.exception, StopAfterSteps):
            self.notes.append(
                "the script was ended by --stop-after-steps once its models' steps were measured (exit 0)"
            )
        sweep = sweep or SweepResult()
        self.notes.extend(sweep.notes)
        report = self._entries(result.globals, fallback, sweep)
        report.notes.extend(self._run_notes(report, result))
        report.script = {"path": self.options.target, "args": self.options.args, "exit_code": result.exit_code}
        if self.options.run_module:
            report.script["module"] = True
        if self.plan is not None:
            report.script["fake"] = True
            report.notes[:0] = self.plan.notes()
        interrupted = sweep.interrupted if sweep.interrupted is not None else result.exception
        if isinstance(interrupted, (KeyboardInterrupt, Terminated)):
            # The script's own status stays exit_code; the process ends by the signal (130 or 143 in a shell).
            report.script["interrupted_by"] = "SIGTERM" if isinstance(interrupted, Terminated) else "SIGINT (Ctrl-C)"
        return report

    def _run_notes(self, report: Report, result: ScriptResult) -> list[str]:
        """Models that were not measured as far as asked, and why."""
        notes = []
        steps = self.options.steps
        if isinstance(result.exception, StopAfterSteps):
            waiting = [
                m.name
                for m in report.models
                if m.memory is not None and not m.memory.get("steps") and m.inventory.trainable
            ]
            if waiting:
                notes.append(
                    f"{', '.join(waiting)} had no training step before the stop: a model whose training begins later "
                    "(a GAN's generator after several discriminator steps) is not waited for; run without "
                    "--stop-after-steps, or with more --steps, to measure it"
                )
        unfinished = self.unfinished()  # after the entries: by the names the report gives them
        if self.options.stop_after_steps and not isinstance(result.exception, StopAfterSteps) and unfinished:
            notes.append(
                f"--stop-after-steps did not stop the script: {', '.join(unfinished)} completed fewer than "
                f"{steps} step(s) in this run"
            )
        elif unfinished and not result.failed:
            notes.append(f"{', '.join(unfinished)} completed fewer than {steps} training step(s): what ran is measured")
        return notes

    def _entries(self, script_globals: dict, fallback: list[nn.Module], sweep: SweepResult) -> Report:
        """One entry per model found (alive or already let go), else per ``fallback`` model."""
        if self._found:
            alive = [f.model() for f in self._found]
            roots = {id(m) for m in outermost([m for m in alive if m is not None])}
            rows = [(m, f) for m, f in zip(alive, self._found) if m is None or id(m) in roots]
        else:
            rows = [(m, None) for m in fallback]
        names = name_models(
            [m for m, _ in rows], script_globals, [f.entry.name if f else type(m).__name__ for m, f in rows]
        )
        reports = []
        for (model, found), name in zip(rows, names):
            try:
                entry = found.entry if found is not None else analyze_model(model, name)
                entry.name = name
                if found is not None and found.tracker is not None:
                    if not found.measured:
                        attach_measurements(entry, found.tracker, found.traits)
                    points, dim, notes = sweep.fit_inputs(name, entry.memory)
                    self.notes.extend(notes)
                    entry.fit = plan_fit(entry.memory, extra_points=points, batch_dim=dim, **self.options.plan)
                    if self.options.calibration is not None:
                        entry.extra["projection"] = project_gpu(
                            entry.memory, self.options.calibration, others=sweep.memories(name), **self.options.plan
                        )
            except Exception as exc:  # noqa: BLE001 - one model we cannot describe must not cost the others
                self.notes.append(f"could not report {name}: {type(exc).__name__}: {exc}")
                continue
            reports.append(entry)
        return Report(models=reports, notes=list(self.notes))
