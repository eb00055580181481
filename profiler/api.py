"""The two ways in from Python: ``analyze(model)`` and ``with profile(model) as prof:``.

>>> report = analyze(model)                      # static: parameters, bytes, ties, buckets
>>> print(report.render(depth=2))

>>> with profile(model) as prof:                 # measured: the training steps inside the block
...     for x, y in batches:
...         loss = model(x, y)
...         loss.backward()
...         opt.step()
...         opt.zero_grad()
>>> print(prof.render())
>>> prof.to_json("step.json")

The loop inside runs unchanged; steps are found by themselves (the
optimizer's ``step()``, or the end of backward when weights are updated by
hand). Hooks are removed when the block ends, however it ends.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import torch
from torch import nn

from .errors import ProfilerError
from .model.buckets import bucket_resolver
from .results.assemble import analyze_for_tracking, analyze_model, attach_memory
from .results.calibration import load_calibration
from .results.gather import DEFAULT_TIMEOUT, gather_ranks, rank_path
from .results.report import Report
from .tracking import StepTracker, drop_retired_hooks
from .tracking.fake_mode import FakePlan

__all__ = ["analyze", "fake_tensors", "profile"]


def analyze(model: nn.Module, name: str | None = None) -> Report:
    """Count the parameters, bytes, ties and buckets of ``model`` (CPU, CUDA or meta; nothing runs).

    >>> report = analyze(model)
    >>> print(report.render(depth=2))
    >>> report.to_json("model.json")
    """
    return Report(models=[analyze_model(model, name)])


def fake_tensors() -> FakePlan:
    """A block whose tensors have shapes and dtypes but no memory: plan a step larger than this machine.

    >>> with fake_tensors() as plan:
    ...     model = build_model()                  # a 7B model: no memory behind its weights
    ...     with profile(model) as prof:
    ...         train_one_step(model)             # every category counted as in a real step
    >>> print(prof.render())

    Values the step reads (``loss.item()``, a GradScaler's inf check) are
    answered with 0 and counted (``plan.reads``, ``plan.notes()``, and the
    report's notes); ``torch.save`` of fake tensors is skipped. Build the model
    inside the block.
    """
    return FakePlan()


class profile:  # noqa: N801 - lower case like torch.profiler.profile, used as a context manager
    """Measure the memory of the training steps of ``model`` run inside the block.

    Args:
        model: the model being trained.
        optimizer: its optimizer; found automatically from its first ``step()``
            when omitted.
        steps: measure at most this many steps, then remove the hooks so the
            rest of the block runs at full speed (default: every step).
        sample_interval: seconds between NVML / host-RSS samples; ``None``
            turns the sampler thread off.
        name: the model's name in the report (default: its class name).
        live_peak: also count every tensor an operator creates (a dispatch
            mode), for a memory peak on the CPU where no allocator keeps one.
            Costs a Python call per operator: opt-in.
        gather_timeout: under ``torchrun``, how long rank 0 waits at the
            block's end for the other ranks' figures (each rank's block ends
            at about the same point of the script).
        project: project the steps onto GPUs (``report.models[0].extra
            ["projection"]``, a table in ``render()``): autocast regions run
            CUDA's policy while measuring, and every allocation is recorded
            and replayed through a model of CUDA's caching allocator. Works on
            real and on fake tensors (``fake_tensors()``); costs what
            ``live_peak`` costs.
        calibrate: a JSON report of this tool from a GPU run (or a
            calibration file) whose memory beyond the allocator replaces the
            shipped H100 measurement; implies ``project``.
        reuse_repeats: take a forward called as one measured before (same
            input shapes and modes, same number of autograd nodes) as its
            repeat, without hooks on each saved tensor and module call: what
            makes measuring every step cheap (docs/limits.md says what the
            check cannot see). ``False`` measures every forward in full.

    Under ``torchrun`` each rank measures its own memory; rank 0's report
    also holds every rank's (``prof.report.ranks``, a table in ``render()``),
    and ``to_json(path)`` writes ``path`` with a ``.rank{N}`` suffix on every
    rank, and the merged ``path`` on rank 0.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        steps: int | None = None,
        sample_interval: float | None = 0.01,
        name: str | None = None,
        live_peak: bool = False,
        gather_timeout: float = DEFAULT_TIMEOUT,
        project: bool = False,
        calibrate: str | os.PathLike[str] | None = None,
        reuse_repeats: bool = True,
    ) -> None:
        if isinstance(gather_timeout, bool) or not isinstance(gather_timeout, (int, float)) or not gather_timeout > 0:
            raise ProfilerError(f"gather_timeout: expected a number of seconds above 0, got {gather_timeout!r}")
        self._gather_timeout = float(gather_timeout)
        self._plan = FakePlan.current()
        if live_peak and self._plan is not None:
            raise ProfilerError(
                "live_peak counts the tensors operators create: under fake_tensors() there is no memory"
            )
        project = project or calibrate is not None
        self._calibration = (
            load_calibration(os.fspath(calibrate) if calibrate else None, "calibrate=") if project else None
        )
        self._model_report, self._rebucketing = analyze_for_tracking(model, name)
        self._model, self._name = model, name
        self._run_order: dict[str, int] | None = None
        self.tracker = StepTracker(
            model,
            optimizer,
            max_steps=steps,
            sample_interval=sample_interval,
            bucket_of=bucket_resolver(self._model_report.buckets),
            live_peak=live_peak,
            rebucket=self._rebucket,
            project=project,
            reuse_repeats=reuse_repeats,
        )
        self.report: Report | None = None

    def _rebucket(self, order: dict[str, int]) -> object:
        self._run_order = order  # (kept for a lazy model analysed again when the block ends)
        return self._rebucketing(order)

    def __enter__(self) -> profile:
        self.tracker.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.tracker.stop()
            drop_retired_hooks()  # the block is over: no optimizer step of its is running
            if self._model_report.inventory.uninitialized:  # lazy parameters got shapes in the block
                self._model_report = analyze_model(self._model, self._name, self._run_order)
        finally:
            attach_memory(self._model_report, self.tracker, calibration=self._calibration)
            self.report = Report(models=[self._model_report])
            if self._plan is not None:  # measured on fake tensors: said, as the command line says it
                self.report.notes.extend(self._plan.notes())
            self._gather()

    def _gather(self) -> None:
        """Under torchrun: this rank's figures to rank 0, whose report then has every rank's (``report.ranks``).

        Every rank ends its block at about the same point of the script; rank 0
        waits at most ``gather_timeout`` seconds for the others.
        """
        setup = self._model_report.setup
        if setup is None or self.report is None:
            return
        try:
            gather_ranks(self.report, setup, None, self._gather_timeout)
        except Exception as exc:  # noqa: BLE001 - this rank's own report stands
            self.report.notes.append(f"the ranks' figures could not be gathered: {type(exc).__name__}: {exc}")

    @property
    def steps(self) -> list:
        for step in self.tracker.steps:
            step.settle()  # (a repeat's timeline is placed when read)
        return self.tracker.steps

    def _ready(self) -> Report:
        if self.report is None:
            raise RuntimeError("the report is ready once the `with profile(...)` block has ended")
        return self.report

    def render(self, depth: int = 2) -> str:
        return self._ready().render(depth)

    def to_dict(self) -> dict[str, Any]:
        return self._ready().to_dict()

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        report = self._ready()
        setup = self._model_report.setup
        if setup is None or path is None:
            return report.to_json(path)
        text = dataclasses.replace(report, ranks=None).to_json(rank_path(os.fspath(path), setup.rank))  # its own
        return report.to_json(path) if setup.rank == 0 else text

    def plot(self, path: str | os.PathLike[str], step: int | None = None) -> pathlib.Path:
        """Draw the step the tables describe (or step ``step``) as a PNG; needs matplotlib."""
        return self._ready().plot(path, step=step)

    def __str__(self) -> str:
        return self.render() if self.report is not None else "<profile: running>"
