"""How long the GPU spent in each phase, from CUDA events at the phase boundaries.

CUDA runs kernels asynchronously: a host clock read when backward begins
measures how fast Python launched the forward, not how long the GPU ran it,
and the first synchronising call (GradScaler's ``.item()``, a loss print)
charges the wait to whichever phase is open. An event recorded on the
current stream at each boundary times what the device did between them.
Recording costs a few microseconds and never waits; the events are read
(waiting for them to complete) only when the report is built, after the
measured steps.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["DeviceClock", "span_seconds"]


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
