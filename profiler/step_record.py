"""The figures of one measured training step, as the tracker fills them in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["PHASES", "ForwardSaves", "PhaseRecord", "StepRecord"]

PHASES = ("forward", "backward", "optimizer")


@dataclass
class ForwardSaves:
    """What one forward (and the loss after it) saved for backward."""

    saved: dict[int, int] = field(default_factory=dict)  # storage ptr -> bytes (activations)
    copies: dict[int, int] = field(default_factory=dict)  # storage ptr -> bytes (autocast copies)
    # Bytes the script's pack hook moved off the device, summed per save: each
    # save is its own copy, and a freed device address is soon reused.
    offloaded: int = 0
    inside_compiled: int = 0  # saved inside a model compiled whole: not attributed to a block
    by_module: dict[tuple[str, str], int] = field(default_factory=dict)  # (path, bucket) -> bytes
    by_bucket: dict[str, int] = field(default_factory=dict)


@dataclass
class PhaseRecord:
    seconds: float = 0.0
    peak_allocated: int | None = None
    live_tensor_peak: int | None = None  # opt-in: baseline + peak of tensors created in the phase
    allocated_end: int | None = None
    reserved_end: int | None = None
    _start: float | None = None
    _device_spans: list[list[Any]] = field(default_factory=list)  # [start, end] CUDA events, see device_clock


@dataclass
class StepRecord:
    """Everything measured during one training step."""

    index: int
    parameters: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    optimizer_state_by_name: dict[str, int] = field(default_factory=dict)
    optimizer_state_by_group: list[int] = field(default_factory=list)
    activations: int = 0
    autocast_copies: int = 0
    # (module path, bucket) -> bytes: a container that saves before and after the
    # trunk (a root computing embeddings and the loss) has one row per bucket.
    activations_by_module: dict[tuple[str, str], int] = field(default_factory=dict)
    activations_by_bucket: dict[str, int] = field(default_factory=dict)
    saved_tensors: int = 0  # how many tensors autograd saved (before deduplication)
    forwards: int = 0
    backwards: int = 0
    optimizer_steps: int = 0
    optimizer_state_before: int = 0  # state bytes that existed when the step began
    phases: dict[str, PhaseRecord] = field(default_factory=lambda: {p: PhaseRecord() for p in PHASES})
    allocated_start: int | None = None
    live_start: int | None = None  # the live-tensor counter when the step began
    live_baseline: int = 0  # weights, gradients and optimizer state alive when the step began
    live_tensor_peak: int | None = None
    peak_allocated: int | None = None
    reserved: int | None = None
    seconds: float = 0.0
    complete: bool = False  # saw a forward and a backward
    optimizer_skipped: bool = False  # gradients were cleared without an optimizer step (GradScaler overflow)
    optimizer_failed: bool = False  # optimizer.step() raised (the script caught it and went on, or ended)
    activations_inside_compiled: int = 0  # of 'activations', saved inside a module compiled whole (no bucket known)
    activations_offloaded: int = 0  # saved tensors the script's own pack hook moved off the device (save_on_cpu)
    input_shape: tuple[int, ...] | None = None  # of the first forward's batch input
    input_is_tokens: bool = False
    checkpointing: bool = False  # checkpointed blocks or model: what they save is dropped and recomputed in backward
    saves_after_forward_unseen: bool = False  # the script's own saved-tensor hooks hid what the loss saved
    _t0: float = 0.0
    gradients_start: int = 0  # gradient bytes alive when the step began (zero_grad without set_to_none)
    events: list[tuple[float, str, int]] = field(default_factory=list)  # (perf_counter, category, +/- bytes)
    phase_spans: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # perf_counter spans
    _current: "ForwardSaves" = field(default_factory=lambda: ForwardSaves())

    def close_forward(self) -> None:
        """Fold the forward just measured into the step's figures, keeping the largest.

        With gradient accumulation each micro-batch's saved tensors are freed by
        its own backward before the next forward, so the step holds the largest
        forward's activations at once, not their sum. (Counting per forward also
        keeps a storage address that the allocator reuses in the next
        micro-batch from being mistaken for one already counted.)
        """
        f = self._current
        total = sum(f.saved.values())
        if total >= self.activations:
            self.activations = total
            self.activations_by_module = f.by_module
            self.activations_by_bucket = f.by_bucket
            self.activations_inside_compiled = f.inside_compiled
        self.autocast_copies = max(self.autocast_copies, sum(f.copies.values()))
        self.activations_offloaded = max(self.activations_offloaded, f.offloaded)
        self._current = ForwardSaves()

    @property
    def first(self) -> bool:
        """The step in which the optimizer created its state."""
        return self.optimizer_state > 0 and self.optimizer_state_before == 0
