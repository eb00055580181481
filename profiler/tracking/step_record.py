"""The figures of one measured training step, as the tracker fills them in.

Plain records with public fields: the tracker and its parts write them, the
results package reads them. ``StepRecord.fold`` and ``StepRecord.merge`` are
the two operations on a step that need no hook: deciding which forwards of a
step were alive together, and joining steps that turned out to be one.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PHASES",
    "SKIPPED_STEPS_LIMIT",
    "ForwardSaves",
    "PhaseRecord",
    "StepRecord",
    "batch_dimension",
    "enough_steps",
    "trained",
]

PHASES = ("forward", "backward", "optimizer")
# A GradScaler halves its scale at every skipped step: 16 skips take the default
# initial scale of 2**16 down to 1, past which overflow is not the scale's doing.
SKIPPED_STEPS_LIMIT = 16


_TICK = 1e-9  # seconds: a moved release is kept strictly between two gradient arrivals


def _by_place(
    saves: Iterable[tuple[int, tuple[str, str | None]]], bucket_of: Callable[[str, str], str]
) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
    """Bytes of saves placed at (module path, where relative to the trunk), by (module, bucket) and by bucket.

    ``where`` None: saved inside a module compiled whole, bucket "other".
    """
    by_module: dict[tuple[str, str], int] = {}
    by_bucket: dict[str, int] = {}
    for nbytes, (path, state) in saves:
        bucket = "other" if state is None else bucket_of(path, state)
        by_module[path, bucket] = by_module.get((path, bucket), 0) + nbytes
        by_bucket[bucket] = by_bucket.get(bucket, 0) + nbytes
    return by_module, by_bucket


def gradient_arrivals(events: list[tuple[float, str, int]]) -> list[float]:
    """When the step's gradients arrived (first seen), in order."""
    return [t for t, c, n in events if c == "gradients" and n > 0]


def placed(
    o: ForwardSaves, began_at: float, ended_at: float | None, reached_at: float | None, arrivals: list[float]
) -> list[tuple[float, str, int]]:
    """A repeat's saves and releases: its original ``o``'s, moved to its own forward and backward.

    A release in backward is put between the same two gradient arrivals
    of the step (``arrivals``, see ``gradient_arrivals``) as in its
    original (``anchors``), so the step's replayed timeline, and its live
    peak, are its original's.
    """
    if None in (o.reached_at, reached_at, o.anchors, o.ended_at, ended_at):
        return [(t + began_at - o.began_at, c, n) for t, c, n in o.events]
    # Before backward reached it: the original's forward's saves over its own forward (scaled:
    # the original was slower, measured), the loss's saves right after it, and the loss's
    # releases (backward frees those before it reaches the model's output) just before it was
    # reached, after every forward's saves.
    early = sum(1 for (_, _, n), g in zip(o.events, o.anchors) if g is None and n < 0)
    scale = (ended_at - began_at) / max(o.ended_at - o.began_at, _TICK)
    after = released = 0
    backward = reached_at - o.reached_at
    grads = arrivals[bisect.bisect_left(arrivals, reached_at) :]
    out = []
    for (t, c, n), g in zip(o.events, o.anchors):
        if g is None:
            if n < 0:
                released += 1
                at = reached_at - _TICK * (early - released + 1)
            elif t <= o.ended_at:
                at = began_at + (t - o.began_at) * scale
            else:
                after += 1
                at = ended_at + _TICK * after
            out.append((at, c, n))
            continue
        low = grads[g - 1] if 0 < g <= len(grads) else reached_at
        high = grads[g] if g < len(grads) else math.inf
        out.append((min(max(t + backward, low + _TICK), high - _TICK), c, n))
    return out


@dataclass(eq=False, slots=True)  # (one forward is itself only; made for every forward: slots)
class ForwardSaves:
    """What one root forward (and the loss computed after it) saved for backward.

    Saves are kept per forward, storage by storage, because which forwards of
    a step were alive together is known only once its backward passes ran:
    two views of a contrastive loss are alive at once (their sum), two
    micro-batches one after the other (the larger), and a probe whose output
    the script keeps but never backpropagates is no part of the step.
    """

    # storage ptr -> bytes (activations); a repeat's keys for storages not its own are (id, ptr) pairs
    saved: dict[Any, int] = field(default_factory=dict)
    copies: dict[int, int] = field(default_factory=dict)  # storage ptr -> bytes (autocast copies)
    # storage ptr -> (module path, where relative to the trunk: before / in / after, None for bucket "other")
    where: dict[int, tuple[str, str | None]] = field(default_factory=dict)
    compiled: set[int] = field(default_factory=set)  # ptrs saved inside a model compiled whole (no block known)
    # Bytes the script's pack hook moved off the device, summed per save: each
    # save is its own copy, and a freed device address is soon reused.
    offloaded: int = 0
    # FSDP's gathered parameters saved for backward: storage identity -> bytes when saved (see Ledger)
    unsharded: dict[int, int] = field(default_factory=dict)
    unsharded_storages: list[Any] = field(default_factory=list)
    unsharded_held: int = 0  # of those, bytes still gathered when the forward returned
    events: list[tuple[float, str, int]] = field(default_factory=list)  # its saves and their releases
    backwards_before: int = 0  # backward passes of the step begun before this forward began
    reached_by: int | None = None  # the step's backward pass (1-based) that first reached its output
    watched: bool = False  # its output had autograd nodes to watch (else reaching it cannot be seen)
    graph: list[Any] = field(default_factory=list)  # weak references that die with its output's nodes
    holders: dict[int, int] = field(default_factory=dict)  # storage ptr -> saved tensors autograd still holds
    # storage ptr -> (backward passes begun, autograd's graph task) when autograd let go of it
    freed: dict[int, tuple[int, int]] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None  # of its batch input
    input_is_tokens: bool = False
    # (batch size, batch_first, which module) from the first module with a batch_first attribute it ran
    batch_hint: tuple[int, bool, str] | None = None
    n_saved: int = 0  # tensors autograd saved (before deduplication)
    trunk_input_shape: tuple[int, ...] | None = None  # its step's, when it was measured (for its repeats)
    began_at: float = 0.0  # perf_counter when it began
    ended_at: float | None = None  # and when it returned
    reached_at: float | None = None  # perf_counter when a backward pass first reached its output
    # Taking later forwards as repeats of this one (see repeats.py):
    signature: tuple | None = None  # what it was called with, and the state around the call
    plain_hooks: bool = False  # measured under our pair alone (no script's pair below, no peer tracker)
    data_dependent: bool = False  # its graph has an operator whose output size follows the data
    seq_begin: int | None = None  # autograd's node counter when it began
    seq_end: int | None = None  # and when it returned
    nodes: int | None = None  # graph nodes it made
    nodes_after: int | None = None  # graph nodes made between its return and the model's next forward
    original: ForwardSaves | None = None  # the measured forward this one repeats, taken without hooks
    anchors: list[int | None] | None = None  # as an original: see ``anchor``
    held: set[int] = field(default_factory=set)  # as an original: its saves alive when its backward began
    io: list[int] = field(default_factory=list)  # storages of its input tensors, then of its output's
    summaries: dict[int, tuple] = field(default_factory=dict)  # as an original: ``summary`` by bucket resolver

    def own_figures(self) -> None:
        """A repeat: hold what its original saved, storage by storage, as this forward saves it (made once).

        Its inputs and outputs are its own storages, not the original's: what
        the original saved of those is put under this forward's (so the same
        batch given to two forwards alive together is still counted once).
        Made only where a step's forwards are counted together: a repeat alone
        in its backward pass is counted from its original's ``summary``.
        """
        original = self.original
        if original is None or self.saved or self.copies:
            return
        held, mine = original.held, dict(zip(original.io, self.io)) if len(original.io) == len(self.io) else {}
        # (the original's other storages are not this forward's: keys of their own, equal to no address)
        key = {p: mine.get(p, (id(self), p)) for p in held}
        self.saved = {key[p]: n for p, n in original.saved.items() if p in held}
        self.copies = {key[p]: n for p, n in original.copies.items() if p in held}
        self.where = {key[p]: w for p, w in original.where.items() if p in held}

    def io_saves(self) -> list[tuple[int, str, int]]:
        """A repeat: (storage, category, bytes) of what its original saved of its own inputs and outputs."""
        o = self.original
        if o is None or len(o.io) != len(self.io):
            return []
        out = []
        for mine, theirs in zip(self.io, o.io):
            if theirs in o.held:
                category = "activations" if theirs in o.saved else "autocast_copies"
                out.append((mine, category, o.saved.get(theirs) or o.copies.get(theirs, 0)))
        return out

    def summary(self, bucket_of: Callable[[str, str], str]) -> tuple[int, dict, dict, int]:
        """An original's held saves: activations, by (module, bucket), by bucket, and autocast copies (kept)."""
        cached = self.summaries.get(id(bucket_of))
        if cached is None:
            held = ((nbytes, self.where[ptr]) for ptr, nbytes in self.saved.items() if ptr in self.held)
            by_module, by_bucket = _by_place(held, bucket_of)
            copies = sum(n for ptr, n in self.copies.items() if ptr in self.held)
            cached = self.summaries[id(bucket_of)] = (sum(by_bucket.values()), by_module, by_bucket, copies)
        return cached

    def anchor(self, step_events: list[tuple[float, str, int]]) -> None:
        """For each of its events in backward, how many gradients of the step arrived before it (see ``placed``)."""
        if self.reached_at is None:
            return
        grads = [t for t in gradient_arrivals(step_events) if t >= self.reached_at]
        self.anchors = [None if t < self.reached_at else bisect.bisect_left(grads, t) for t, _, _ in self.events]

    @property
    def graph_freed(self) -> bool:
        """Its output's graph is gone unused: nothing can backpropagate through it any more."""
        return self.watched and self.reached_by is None and all(r() is None for r in self.graph)

    @property
    def consumed_by(self) -> int:
        """The backward pass that frees it: the one that reached it, or (not watched) the next one."""
        return self.reached_by if self.reached_by is not None else self.backwards_before + 1

    def alive_until(self, pass_of_task: dict[int, int]) -> float:
        """The last backward pass at which any of its saves can be alive (``alive_at``), for skipping it after."""
        if self.holders:
            return math.inf
        freed = [pass_of_task.get(task, begun) for begun, task in self.freed.values()]
        return max([self.consumed_by, *freed])

    def alive_at(self, ptr: int, k: int, pass_of_task: dict[int, int]) -> bool:
        """Whether its saved storage ``ptr`` was held when the step's backward pass ``k`` began.

        A storage seen saved through our hook is alive until autograd let go of
        it (freed by an earlier pass, or dropped unused: a retained graph stays);
        one found otherwise (on a custom Function's ctx) until the pass that
        reached this forward.
        """
        if k <= self.backwards_before:
            return False
        if ptr in self.freed:
            begun, task = self.freed[ptr]
            return pass_of_task.get(task, begun) >= k  # freed by the backward call that became pass k: alive at it
        return ptr in self.holders or k <= self.consumed_by


@dataclass
class PhaseRecord:
    """One phase of a step: its host time, and on CUDA the allocator's figures at its end."""

    seconds: float = 0.0
    peak_allocated: int | None = None
    live_tensor_peak: int | None = None  # opt-in: baseline + peak of tensors created in the phase
    allocated_end: int | None = None
    reserved_end: int | None = None
    started_at: float | None = None  # perf_counter when the phase opened; None while it is closed
    device_spans: list[list[Any]] = field(default_factory=list)  # [start, end] CUDA events, see phases.DeviceClock


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
    unsharded_parameters_saved: int = 0  # FSDP: gathered parameters saved for backward (not activations)
    unsharded_parameters_held: int = 0  # of those, still gathered when the forward returned (alive into backward)
    activations_offloaded: int = 0  # saved tensors the script's own pack hook moved off the device (save_on_cpu)
    forwards_repeated: int = 0  # forwards taken as repeats of one measured before (see repeats.py)
    repeats_unverified: int = 0  # of those, whose graph (or loss) made another number of nodes than the original's
    repeats_raised: int = 0  # forwards taken as repeats that raised: what they saved before the error is not known
    input_shape: tuple[int, ...] | None = None  # of the first forward's batch input (of those kept, see fold)
    input_is_tokens: bool = False
    batch_dim: int | None = None  # which dimension of input_shape is the batch
    batch_source: str | None = None  # how that is known
    trunk_input_shape: tuple[int, ...] | None = None  # of the first trunk block's first tensor input, once a step
    checkpointing: bool = False  # checkpointed blocks or model: what they save is dropped and recomputed in backward
    saves_after_forward_unseen: bool = False  # the script's own saved-tensor hooks hid what the loss saved
    started_at: float = 0.0  # perf_counter when the step began: the timeline's zero
    gradients_start: int = 0  # gradient bytes alive when the step began (zero_grad without set_to_none)
    events: list[tuple[float, str, int]] = field(default_factory=list)  # (perf_counter, category, +/- bytes)
    phase_spans: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # perf_counter spans
    # Forwards whose output no backward of the step reached while another's was (see fold).
    forwards_left_out: int = 0
    activations_left_out: int = 0  # what they saved (alive while the script holds their output)
    current_forward: ForwardSaves = field(default_factory=ForwardSaves)  # the forward running or just run
    open_forwards: list[ForwardSaves] = field(default_factory=list)  # forwards not yet folded
    # Folded repeats not yet on the timeline: (original, began_at, ended_at, reached_at), what ``placed`` needs.
    # (Not the repeats themselves: a step of twenty closure evaluations would keep twenty of them, and their
    # lists, sets and signatures, for as long as the run is measured, each more for the garbage collector.)
    repeats_unplaced: list[tuple[ForwardSaves, float, float | None, float | None]] = field(default_factory=list)
    pass_of_task: dict[int, int] = field(default_factory=dict)  # autograd graph task -> the backward pass it was

    def begin_forward(self) -> ForwardSaves:
        """A root forward of this step begins: its saves are kept apart until ``fold``."""
        self.forwards += 1
        self.current_forward = ForwardSaves(backwards_before=self.backwards, began_at=time.perf_counter())
        self.open_forwards.append(self.current_forward)
        return self.current_forward

    @property
    def open_phases(self) -> list[str]:
        """The phases begun and not yet ended (at most one: phases tile the step)."""
        return [name for name, ph in self.phases.items() if ph.started_at is not None]

    def fold(self, bucket_of: Callable[[str, str], str]) -> None:
        """Fold the forwards measured since the last fold into the step's figures.

        Activations are what was alive at once: for each backward pass, the
        forwards begun before it and not freed by an earlier one (two views of
        a contrastive loss: both; micro-batches of gradient accumulation: one
        at a time), storages shared between them counted once; the step holds
        the largest such set. A forward whose output no backward of the step
        reached, while another's was, is left out: a probe (``out = model(x)``)
        or a metric computed with gradients on, whose graph the script keeps.
        When no backward reached any forward's output (a loss on a hook's
        features), each forward counts on its own, as micro-batches would.
        (Counting per forward also keeps a storage address that the allocator
        reuses in the next micro-batch from being mistaken for one already
        counted.) Each save's bucket is named here, by ``bucket_of(path, where)``.
        """
        forwards, self.open_forwards = self.open_forwards, []
        self.current_forward = ForwardSaves()
        if not forwards:
            return
        if any(f.reached_by is not None for f in forwards):
            left_out = [f for f in forwards if f.watched and f.reached_by is None]
            kept = [f for f in forwards if not (f.watched and f.reached_by is None)]
            passes = range(1, max([self.backwards] + [f.consumed_by for f in kept]) + 1)
            members: dict[int, list[ForwardSaves]] = {k: [] for k in passes}
            for f in kept:  # (each forward only in the passes it can be alive at: linear in the step's length)
                for k in range(f.backwards_before + 1, int(min(f.alive_until(self.pass_of_task), passes[-1])) + 1):
                    members[k].append(f)
            groups = list(members.items())
        else:
            left_out, kept = [], forwards
            groups = [(None, [f]) for f in forwards]
        for k, group in groups:
            lone = group[0] if len(group) == 1 else None
            if lone is not None and lone.original is not None and not lone.holders and not lone.freed:
                total, by_module, by_bucket, copies_total = lone.original.summary(bucket_of)  # (a repeat, alone)
                if total >= self.activations:
                    self.activations, self.activations_inside_compiled = total, 0
                    self.activations_by_module, self.activations_by_bucket = dict(by_module), dict(by_bucket)
                self.autocast_copies = max(self.autocast_copies, copies_total)
                continue
            saved: dict[int, ForwardSaves] = {}
            copies: dict[int, int] = {}
            for f in group:
                f.own_figures()
                for ptr in f.saved:
                    if k is None or f.alive_at(ptr, k, self.pass_of_task):
                        saved.setdefault(ptr, f)
                copies.update(
                    (ptr, n) for ptr, n in f.copies.items() if k is None or f.alive_at(ptr, k, self.pass_of_task)
                )
            total = sum(f.saved[ptr] for ptr, f in saved.items())
            if total >= self.activations:
                by_module, by_bucket = _by_place(((f.saved[ptr], f.where[ptr]) for ptr, f in saved.items()), bucket_of)
                self.activations = total
                self.activations_by_module, self.activations_by_bucket = by_module, by_bucket
                self.activations_inside_compiled = sum(f.saved[ptr] for ptr, f in saved.items() if ptr in f.compiled)
            self.autocast_copies = max(self.autocast_copies, sum(copies.values()))
            unsharded = {k: n for f in group for k, n in f.unsharded.items()}
            self.unsharded_parameters_saved = max(self.unsharded_parameters_saved, sum(unsharded.values()))
            held = sum(f.unsharded_held for f in group)
            self.unsharded_parameters_held = max(self.unsharded_parameters_held, held)
            offloaded = sum(f.offloaded for f in group if k is None or k <= f.consumed_by)
            self.activations_offloaded = max(self.activations_offloaded, offloaded)
        for f in kept:
            if f.original is None:
                self.events.extend(f.events)
            else:
                # (on the timeline when it is read: see settle)
                self.repeats_unplaced.append((f.original, f.began_at, f.ended_at, f.reached_at))
            if self.input_shape is None and f.input_shape is not None:
                self.input_shape, self.input_is_tokens = f.input_shape, f.input_is_tokens
                self.batch_dim, self.batch_source = batch_dimension(f.input_shape, f.batch_hint)
        if left_out:
            self.forwards -= len(left_out)
            self.forwards_left_out += len(left_out)
            for f in left_out:
                f.own_figures()
            self.activations_left_out += sum({ptr: n for f in left_out for ptr, n in f.saved.items()}.values())

    def settle(self) -> None:
        """Put the repeats' saves and releases on the step's timeline, once the step is over.

        Left out of ``fold``, which runs inside the script's training step:
        only what reads the timeline (the report, ``merge``) needs them.
        """
        if self.repeats_unplaced:
            arrivals = gradient_arrivals(self.events)
            for original, began_at, ended_at, reached_at in self.repeats_unplaced:
                self.events.extend(placed(original, began_at, ended_at, reached_at, arrivals))
            self.repeats_unplaced = []

    def merge(self, earlier: list[StepRecord]) -> StepRecord:
        """One step made of ``earlier`` steps and this one (all folded): the first of them, grown.

        Until an optimizer steps, each backward followed by a new forward looks
        like a step of its own (a hand-written update); the optimizer's first
        ``step()`` shows they were micro-batches of one step. Activations are
        the largest micro-batch's, as for accumulation seen from the start;
        the optimizer phase is this step's, the one still open.
        """
        merged = earlier[0]
        for s in earlier + [self]:
            s.settle()
        for s in earlier[1:] + [self]:
            merged.forwards += s.forwards
            merged.backwards += s.backwards
            merged.saved_tensors += s.saved_tensors
            merged.forwards_repeated += s.forwards_repeated
            merged.repeats_unverified += s.repeats_unverified
            merged.repeats_raised += s.repeats_raised
            merged.gradients = max(merged.gradients, s.gradients)
            if s.activations >= merged.activations:
                merged.activations = s.activations
                merged.activations_by_module = s.activations_by_module
                merged.activations_by_bucket = s.activations_by_bucket
                merged.activations_inside_compiled = s.activations_inside_compiled
            merged.autocast_copies = max(merged.autocast_copies, s.autocast_copies)
            merged.activations_offloaded = max(merged.activations_offloaded, s.activations_offloaded)
            merged.unsharded_parameters_saved = max(merged.unsharded_parameters_saved, s.unsharded_parameters_saved)
            merged.unsharded_parameters_held = max(merged.unsharded_parameters_held, s.unsharded_parameters_held)
            merged.events.extend(s.events)
            for name, spans in s.phase_spans.items():
                merged.phase_spans.setdefault(name, []).extend(spans)
            for name, ph in s.phases.items():
                mp = merged.phases[name]
                mp.seconds += ph.seconds
                mp.device_spans.extend(ph.device_spans)
                if ph.peak_allocated is not None:
                    mp.peak_allocated = max(mp.peak_allocated or 0, ph.peak_allocated)
                    mp.allocated_end, mp.reserved_end = ph.allocated_end, ph.reserved_end
            for attr in ("peak_allocated", "reserved"):
                if getattr(s, attr) is not None:
                    setattr(merged, attr, max(getattr(merged, attr) or 0, getattr(s, attr)))
        merged.phases["optimizer"] = self.phases["optimizer"]
        merged.complete = False
        return merged

    @property
    def first(self) -> bool:
        """The step in which the optimizer created its state; without any state, the first one measured.

        Where no optimizer keeps state (weights updated by hand, plain SGD), the
        first step still differs from the next ones when it begins with no
        gradient held: it allocates them.
        """
        if self.optimizer_state or self.optimizer_state_before:
            return self.optimizer_state > 0 and self.optimizer_state_before == 0
        return self.index == 1 and self.gradients_start == 0


def enough_steps(steps: list[StepRecord], max_steps: int | None) -> bool:
    """``max_steps`` steps that updated the weights, or too many GradScaler skips to wait for.

    An iteration whose optimizer step a GradScaler skipped (overflowing fp16
    gradients, common while the loss scale settles) has no optimizer phase
    and shows nothing of the step the user asked about, so it does not
    count; after ``SKIPPED_STEPS_LIMIT`` of them measuring ends anyway.
    An iteration whose ``optimizer.step()`` raised (an out-of-memory error
    the script caught to retry smaller) does not count either. Never enough
    without a limit.
    """
    if max_steps is None:
        return False
    skipped = sum(s.optimizer_skipped or s.optimizer_failed for s in steps)
    return len(steps) - skipped >= max_steps or skipped >= SKIPPED_STEPS_LIMIT


def trained(steps: list[StepRecord]) -> bool:
    """A backward through the model's output, or its optimizer's step, was seen in one of these steps."""
    return any(s.backwards or s.optimizer_steps for s in steps)


def batch_dimension(shape: tuple[int, ...], hint: tuple[int, bool, str] | None) -> tuple[int, str]:
    """Which dimension of a forward's input is the batch, and how that is known.

    A module with a ``batch_first`` attribute (an LSTM, a Transformer layer,
    attention) says where its input's batch is, hence its size; the input's
    dimension of that size is the batch (token ids of shape (sequence, batch)
    for a recurrent language model). Without one, the first dimension, as
    PyTorch's own layers take it by default, and the report says so.
    """
    if hint is not None:
        size, batch_first, module = hint
        dims = [i for i, d in enumerate(shape) if d == size]
        if len(dims) > 1:  # as long as the sequence: the module's own layout decides
            dims = [d for d in dims if d == (0 if batch_first else 1)] or dims[:1]
        if dims:
            return dims[0], f"the input's dimension {dims[0]}: {module}"
    return 0, "the input's first dimension (nothing in the model says otherwise)"
