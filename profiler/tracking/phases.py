"""The phases of a step (forward, backward, optimizer) and what is read at their boundaries.

Cheap reads only, at boundaries: the host clock, a CUDA event (device time),
the caching allocator's counters (whose peak statistic is reset at each phase
start, so each phase has its own peak; ``empty_cache()`` is never called), a
mark in the sampler's timeline and, opt-in, the live-tensor counter's peak.

For a GPU projection (``project=True``) autocast regions run CUDA's policy
(``cuda_autocast.py``), dropout and attention with dropout take CUDA's fused
kernels' path (``cuda_kernels.py``), and the live-tensor counter records
every allocation and free, with a mark at each phase boundary, for the
caching-allocator replay. The optimizer runs as the script built it: on the
calibration GPU step (AdamW with its defaults) the optimizer's peak matched
the per-parameter implementation the CPU runs, not the foreach one.

Device time: CUDA runs kernels asynchronously, so a host clock read when
backward begins measures how fast Python launched the forward, not how long
the GPU ran it, and the first synchronising call (GradScaler's ``.item()``, a
loss print) charges the wait to whichever phase is open. An event recorded on
the current stream at each boundary times what the device did between them.
Recording costs a few microseconds and never waits; the events are read
(waiting for them to complete) only when the report is built.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import torch

from .step_record import StepRecord

__all__ = ["DeviceClock", "PhaseClock", "span_seconds"]


class DeviceClock:
    """Records timing events on a CUDA device; on any other device it records nothing.

    A failure to record (inside a CUDA graph capture, say) turns the clock off
    for the rest of the run rather than disturbing the training.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.enabled = device.type == "cuda"
        self.error: str | None = None

    def mark(self) -> Any | None:
        """A recorded event, or None when device time is not being measured."""
        if not self.enabled:
            return None
        try:
            if self._capturing():
                return None  # a timing event cannot be part of a captured graph
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return event
        except Exception as exc:  # noqa: BLE001 - device time is a bonus, never a crash
            self.enabled = False
            self.error = f"CUDA events failed ({type(exc).__name__}: {exc}); no device time"
            return None

    def _capturing(self) -> bool:
        """Whether the model's device is capturing a CUDA graph on its current stream.

        torch answers for the current device only; the model's may be another.
        """
        index = self.device.index
        if index is None or index == torch.cuda.current_device():
            return torch.cuda.is_current_stream_capturing()
        with torch.cuda.device(index):
            return torch.cuda.is_current_stream_capturing()


def span_seconds(spans: list[list[Any]]) -> float | None:
    """Seconds between each (start, end) event pair, summed; None if any pair is missing."""
    if not spans:
        return None
    total_ms = 0.0
    try:
        for start, end in spans:
            if start is None or end is None:
                return None
            # Both: the phases may have begun and ended on different streams
            # (a script's `with torch.cuda.stream(s)`), which complete in any order.
            start.synchronize()
            end.synchronize()
            total_ms += start.elapsed_time(end)
    except Exception:  # noqa: BLE001 - an event from another device or never recorded
        return None
    return total_ms / 1000.0


class PhaseClock:
    """Opens and closes a step's phases, and owns what is read at their boundaries.

    Phases tile the step with no gap: forward runs until backward begins (a
    loss computed outside the model belongs to it), backward until the
    optimizer step or the next forward (gradient unscaling and clipping belong
    to it), so the step's peak is the largest phase peak and nothing between
    phases escapes. Replaceable: a test hands the tracker a clock whose
    ``begin`` fails to check that a failure of ours never reaches the script.
    """

    def __init__(
        self,
        device: torch.device,
        *,
        sample_interval: float | None,
        live_peak: bool,
        notes: list[str],
        project: bool = False,
    ) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.device_clock = DeviceClock(device)
        self.sample_interval = sample_interval
        self.project = project and not self.cuda  # on CUDA the allocator itself is read
        self.live_peak = live_peak or self.project
        self.live_counter: Any = None  # a LiveTensorCounter while measuring with live_peak
        self.trace: list[tuple[str, Any, int, bool]] | None = None  # the recorded allocations, once stopped
        self.trace_initial: list[int] = []  # storages alive when the trace began (parameters, gradients)
        self.autocast_dtypes: set[torch.dtype] = set()  # the CPU autocast dtypes forwards ran under
        self.kernel_swaps: Any = None  # with project: the calls that took CUDA's fused path (cuda_kernels)
        self._as_on_cuda = contextlib.ExitStack()
        self.sampler: Any = None  # a MemorySampler while measuring with a sample interval
        self._notes = notes
        self._thread = threading.get_ident()

    # ------------------------------------------------------------ lifecycle
    def start(self, tensors: list[torch.Tensor] = ()) -> None:
        """Enter the live-tensor counter (opt-in) and start the sampler thread.

        ``tensors``: the model's parameters, whose storages (and gradients')
        begin a recorded trace.
        """
        if self.project:
            from .cuda_autocast import cuda_autocast_policy
            from .cuda_kernels import cuda_kernels

            self._as_on_cuda.enter_context(cuda_autocast_policy())
            self.kernel_swaps = self._as_on_cuda.enter_context(cuda_kernels())
            seen: dict[int, int] = {}
            for t in tensors:
                for u in (t, t.grad):
                    if u is not None and u.untyped_storage().nbytes():
                        seen.setdefault(u.untyped_storage()._cdata, u.untyped_storage().nbytes())
            self.trace_initial = list(seen.values())
        if self.live_peak:
            from .live_tensors import LiveTensorCounter

            shapes = {tuple(t.shape) for t in tensors}
            self.live_counter = LiveTensorCounter(record=self.project, fixed_shapes=shapes)
            self.live_counter.__enter__()
        if self.sample_interval:
            from .sampler import MemorySampler

            self.sampler = MemorySampler(device=self.device, interval=self.sample_interval, max_samples=20_000)
            self.sampler.start()

    def stop(self) -> None:
        """Leave the live-tensor counter and stop the sampler (its figures stay readable)."""
        if self.live_counter is not None and self.project:
            self.trace = self.live_counter.events
        self._leave_live_counter()
        self._as_on_cuda.close()
        if self.sampler is not None:
            self.sampler.stop()

    def _leave_live_counter(self) -> None:
        """Leave the dispatch mode if it is still the innermost one (modes must nest)."""
        counter, self.live_counter = self.live_counter, None
        if counter is None:
            return
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        if _get_current_dispatch_mode() is counter and threading.get_ident() == self._thread:
            counter.__exit__(None, None, None)
        else:
            self._notes.append(
                "the live-tensor counter could not be removed in order (another dispatch mode was entered after it)"
            )

    # ---------------------------------------------------------------- reads
    def read(self) -> tuple[int, int, int] | None:
        """(allocated, reserved, peak allocated) of the caching allocator; None off CUDA."""
        if not self.cuda:
            return None
        return (
            torch.cuda.memory_allocated(self.device),
            torch.cuda.memory_reserved(self.device),
            torch.cuda.max_memory_allocated(self.device),
        )

    def begin_step(self, step: StepRecord) -> None:
        """What the step starts from: allocated memory, and the live counter's baseline.

        The baseline is what the categories held when the step began (weights,
        gradients and optimizer state, already set on ``step``).
        """
        read = self.read()
        if read is not None:
            step.allocated_start = read[0]
        if self.live_counter is not None:
            step.live_start = self.live_counter.live
            step.live_baseline = step.parameters + step.gradients_start + step.optimizer_state_before

    # --------------------------------------------------------------- phases
    def begin(self, step: StepRecord, name: str) -> None:
        """Close the open phase and open ``name``."""
        now = time.perf_counter()
        for other, open_ph in step.phases.items():  # (at most one is open: phases tile the step)
            if open_ph.started_at is not None:
                self.end(step, other, now)
        ph = step.phases[name]
        ph.started_at = now
        step.phase_spans.setdefault(name, []).append((now, now))
        if self.device_clock.enabled:
            ph.device_spans.append([self.device_clock.mark(), None])
        if self.live_counter is not None:
            self.live_counter.restart_peak()
            self.live_counter.mark(f"{step.index}:{name}")
            if name == "forward" and self.project and torch.is_autocast_enabled("cpu"):
                self.autocast_dtypes.add(torch.get_autocast_dtype("cpu"))
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.sampler is not None:
            self.sampler.mark(f"{step.index}:{name}")

    def end(self, step: StepRecord, name: str, now: float | None = None) -> None:
        """Close phase ``name`` (if open) and take its peaks."""
        ph = step.phases[name]
        if ph.started_at is not None:
            now = time.perf_counter() if now is None else now
            ph.seconds += now - ph.started_at
            spans = step.phase_spans.get(name)
            if spans:
                spans[-1] = (spans[-1][0], now)
            if ph.device_spans and ph.device_spans[-1][1] is None:
                ph.device_spans[-1][1] = self.device_clock.mark()
            ph.started_at = None
        counter = self.live_counter
        if counter is not None and step.live_start is not None:
            live = step.live_baseline + counter.peak - step.live_start
            ph.live_tensor_peak = max(ph.live_tensor_peak or 0, live)
            step.live_tensor_peak = max(step.live_tensor_peak or 0, live)
        if self.cuda:
            allocated, reserved, peak = self.read()
            ph.peak_allocated = max(ph.peak_allocated or 0, peak)
            ph.allocated_end, ph.reserved_end = allocated, reserved
            step.peak_allocated = max(step.peak_allocated or 0, peak)
            step.reserved = max(step.reserved or 0, reserved)

    def end_open(self, step: StepRecord) -> None:
        """Close whichever phase is open (the step ends)."""
        for name in step.open_phases:
            self.end(step, name)
