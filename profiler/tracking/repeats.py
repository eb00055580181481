"""Forwards that repeat one already measured: recognised cheaply, not measured again.

A training loop runs one forward step after step on batches of one shape (an
LBFGS step runs it twenty times), and what it saves is the same each time.
Measuring a forward tensor by tensor costs a saved-tensor hook per save and a
module hook per call, most of a small model's short step; so the first forward
of each kind is measured that way, and a later one is taken as its repeat when

* its call matches (``call_signature``): the shapes, dtypes, devices and
  ``requires_grad`` of the tensors it is given and its other arguments'
  values, with its modules' training flags, autocast's state and its
  parameters' shapes, dtypes and ``requires_grad`` (``mode_signature``);
* it runs alone: no other forward of the step awaits its backward (two views
  of one loss are each measured), no saved-tensor hook pair is on the stack
  (a checkpoint's, ``save_on_cpu``), no backward is running;
* its original was plain (``eligible``): every save freed by the backward
  that reached it, no checkpoint, offload, FSDP gathering or script hook
  pair, and no operator whose output size depends on the data
  (``DATA_DEPENDENT``: boolean masks, a mixture of experts' routing), which
  no signature can see.

A repeat is checked after the fact with autograd's node counter (read, never
changed): its forward must make as many graph nodes as its original's, and
what runs between it and the next forward (the loss) as many as between its
original and the one after it. A mismatch is counted in the step
(``repeats_unverified``) and the original is dropped, so the next forward of
that kind is measured again. A repeat's figures are its original's; its
timeline is its original's, moved to its own forward and backward.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .parallel import PLAIN_TYPES
from .saved_tensors import fake_tensor_type, memory_of
from .step_record import ForwardSaves, StepRecord

__all__ = ["DATA_DEPENDENT", "MAX_ORIGINALS", "RepeatBook", "call_signature", "mode_signature", "sequence_nr"]

# Autograd nodes of operators whose output size can follow the data (advanced
# and boolean indexing, masked selection, splits by computed sizes): a forward
# that makes one is measured every time.
DATA_DEPENDENT = frozenset(
    {
        "IndexBackward0",
        "IndexSelectBackward0",
        "IndexPutBackward0",
        "MaskedSelectBackward0",
        "MaskedScatterBackward0",
        "SplitWithSizesBackward0",
        "NonzeroBackward0",
    }
)
_SCALARS = frozenset({int, float, bool, str, bytes, type(None), torch.dtype, torch.device})
_MAX_ITEMS = 256  # a call with longer containers than this is measured (no signature)
# Originals kept, by signature: a script with dynamic padding has one per sequence length; past
# this many the oldest is let go of (its kind is measured again when it comes back).
MAX_ORIGINALS = 64

# This thread's autograd node counter (read only), and whether the running backward keeps its graph:
# private to torch, looked up softly; without them no forward is taken as a repeat.
sequence_nr = getattr(torch._C._autograd, "_get_sequence_nr", None)
_keeps_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)


def _describe(obj: Any, out: list, depth: int) -> bool:
    """Append what of ``obj`` decides what a forward saves; False when that cannot be said cheaply."""
    kind = type(obj)
    if kind in PLAIN_TYPES or (isinstance(obj, torch.Tensor) and kind is fake_tensor_type()):
        out.append((obj.shape, obj.dtype, obj.device, obj.requires_grad))  # (a plan's fake tensors too)
        return True
    if kind in _SCALARS:
        out.append(obj)
        return True
    if depth >= 3:
        return False
    if kind is tuple or kind is list:
        if len(obj) > _MAX_ITEMS:
            return False
        out.append((kind, len(obj)))
        return all(_describe(v, out, depth + 1) for v in obj)
    if isinstance(obj, dict):  # (a ModelOutput or BatchEncoding too)
        if len(obj) > _MAX_ITEMS:
            return False
        out.append((kind, len(obj)))
        for key, value in obj.items():
            out.append(key)
            if not _describe(value, out, depth + 1):
                return False
        return True
    return False  # another tensor subclass (a DTensor), a cache object, a dataclass: not said cheaply


def call_signature(args: Any, kwargs: dict | None) -> tuple | None:
    """What a forward call is given, as far as it decides the saves; None when not said cheaply."""
    if kwargs is None:
        return None  # the keyword arguments could not be read
    out: list = []
    try:
        if _describe(args, out, 0) and _describe(kwargs, out, 0):
            return tuple(out)
    except Exception:  # noqa: BLE001 - an odd argument: measured rather than matched
        pass
    return None


def mode_signature(modules: list[nn.Module], parameters: list[nn.Parameter]) -> tuple:
    """The state around a forward that changes its saves: training flags, autocast, which parameters train."""
    # (Read at every root forward: comprehensions into tuples, not generators, cost less per item;
    # an autocast dtype only where autocast is on, the only place it changes what is saved.)
    cpu, cuda = torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda")
    return (
        tuple([m.training for m in modules]),  # (a part put in .eval(): frozen batch norm, no dropout)
        cpu and torch.get_autocast_dtype("cpu"),
        cuda and torch.get_autocast_dtype("cuda"),
        tuple([(p.shape, p.dtype, p.requires_grad) for p in parameters]),  # (.half() keeps the Parameter)
    )


def eligible(forward: ForwardSaves, step: StepRecord) -> bool:
    """A measured forward that later forwards of its signature may repeat (see the module's rules)."""
    return (
        forward.signature is not None
        and forward.plain_hooks
        and forward.nodes is not None
        and not forward.data_dependent
        and forward.reached_by is not None
        and not forward.holders  # all it saved was freed: no retained graph
        and not forward.offloaded
        and not forward.unsharded
        and not forward.compiled
        and not step.checkpointing
        and not step.saves_after_forward_unseen
    )


class RepeatBook:
    """The measured forwards later ones may repeat, by signature, and the checks of each repeat."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sequence_nr is not None and _keeps_graph is not None
        self.originals: dict[tuple, ForwardSaves] = {}
        self._last: tuple[ForwardSaves, StepRecord] | None = None  # the last root forward, and its step
        self._candidates: list[ForwardSaves] = []  # forwards measured in full, their backward not yet ended

    @staticmethod
    def signature(args: Any, kwargs: dict | None, modules: list[nn.Module], parameters: list) -> tuple | None:
        """A root forward's ``call_signature`` with its ``mode_signature``; None when not said cheaply."""
        call = call_signature(args, kwargs)
        return None if call is None or not modules else (call, mode_signature(modules, parameters))

    def match(self, signature: tuple | None) -> ForwardSaves | None:
        """The original a forward of this signature repeats, if any."""
        return self.originals.get(signature) if signature is not None else None

    def begin(
        self,
        forward: ForwardSaves,
        step: StepRecord,
        call: tuple,
        inputs: list[torch.Tensor],
        alone: bool,
        clear_hooks: Callable[[], bool],
    ) -> bool:
        """A root forward begins: True when it is taken as a repeat (then with no hook pair on the stack).

        ``call``: (args, kwargs, the model's modules, its parameters); ``inputs``: the tensors
        in args and kwargs; ``alone``: no other
        forward of the step awaits its backward; ``clear_hooks()`` takes
        tracker pairs off the stack and says whether it is then empty.
        """
        if not self.enabled:
            return False
        self.forward_begins(forward, step, inputs)
        forward.signature = self.signature(*call)
        original = self.match(forward.signature)
        if original is None or not alone or step.checkpointing or torch._C._current_graph_task_id() != -1:
            return False
        if not clear_hooks():  # (a script's pair: a checkpoint's, save_on_cpu)
            return False
        forward.original = original
        # (Its input's shape is its original's: the signature holds it. Not read again.)
        forward.input_shape, forward.input_is_tokens = original.input_shape, original.input_is_tokens
        return True

    def measured(self, forward: ForwardSaves, plain_hooks: bool) -> None:
        """A forward measured in full (``plain_hooks``: under our pair alone): an original once its backward ends."""
        forward.plain_hooks = plain_hooks
        if self.enabled and forward.signature is not None and forward.signature not in self.originals:
            self._candidates.append(forward)

    def backward_ended(self, step: StepRecord) -> None:
        """A backward pass of ``step`` ended: the measured forwards it reached may be originals now."""
        if not self._candidates:
            return
        waiting = []
        for forward in self._candidates:
            if forward.reached_by == step.backwards:
                self.offer(forward, step)
            elif forward.reached_by is None and any(f is forward for f in step.open_forwards):
                waiting.append(forward)  # (not reached yet: a later pass of its step may)
        self._candidates = waiting

    def offer(self, forward: ForwardSaves, step: StepRecord) -> None:
        """A measured forward whose backward ended: the original of its signature, if it is the first."""
        if forward.original is None and forward.signature not in self.originals and eligible(forward, step):
            # What it held when its backward began (a teacher's saves under its pair, freed at once, are not).
            forward.held = {
                ptr
                for ptr in (*forward.saved, *forward.copies)
                if forward.alive_at(ptr, forward.reached_by, step.pass_of_task)
            }
            others = {ptr for f in step.open_forwards if f is not forward for ptr in f.io}
            if not forward.held.isdisjoint(others):
                return  # its loss saved another forward's input or output: not a forward that repeats alone
            forward.trunk_input_shape = step.trunk_input_shape
            forward.anchor(step.events)
            if len(self.originals) >= MAX_ORIGINALS:
                del self.originals[next(iter(self.originals))]
            self.originals[forward.signature] = forward

    def forward_begins(self, forward: ForwardSaves, step: StepRecord, inputs: list[torch.Tensor]) -> None:
        """Check what ran since the last forward ended against its original's, then remember this one."""
        forward.seq_begin = now = sequence_nr()
        forward.io = [memory_of(t)[0] for t in inputs]
        last = self._last
        if last is not None:
            before, its_step = last
            before.nodes_after = now - before.seq_end if before.seq_end is not None else None
            original = before.original
            if original is not None and original.nodes_after is not None and before.nodes_after is not None:
                if before.nodes_after != original.nodes_after:
                    self._mismatch(original, its_step)
        self._last = (forward, step)

    def forward_ends(self, forward: ForwardSaves, step: StepRecord, outputs: list[torch.Tensor]) -> None:
        """A root forward returned (``outputs``: its tensors): its node count; a repeat takes its original's figures."""
        if not self.enabled:
            return
        forward.seq_end, forward.ended_at = sequence_nr(), time.perf_counter()
        forward.nodes = forward.seq_end - forward.seq_begin if forward.seq_begin is not None else None
        forward.io += [memory_of(t)[0] for t in outputs]
        original = forward.original
        if original is None:
            return
        if not outputs and sys.exc_info()[1] is not None:
            # It raised (its hooks run in torch's except block): what it saved before the
            # error is not known, and went with it. Not its original's figures: nothing, said.
            forward.original = None
            step.repeats_raised += 1
            return
        step.forwards_repeated += 1
        forward.n_saved, forward.batch_hint = original.n_saved, original.batch_hint
        step.saved_tensors += original.n_saved
        if step.trunk_input_shape is None:
            step.trunk_input_shape = original.trunk_input_shape
        if forward.nodes != original.nodes:
            self._mismatch(original, step)

    @staticmethod
    def reached(forward: ForwardSaves, backwards: int, task: int) -> None:
        """Backward pass ``backwards`` (autograd's ``task``) reached a repeat.

        A repeat has no saved-tensor hook to say when autograd lets go of what
        it saved: that is the backward that reaches it, unless that backward
        keeps the graph (``retain_graph=True``); then the saves are held until
        a backward that does not.
        """
        keep = _keeps_graph()
        if not keep and not forward.holders:
            return
        forward.own_figures()
        ptrs = [*forward.saved, *forward.copies]
        if keep:
            if not forward.holders:
                forward.holders = dict.fromkeys(ptrs, 1)
        elif forward.holders:
            forward.holders = {}
            forward.freed = dict.fromkeys(ptrs, (backwards, task))

    def _mismatch(self, original: ForwardSaves, step: StepRecord) -> None:
        """A repeat made another graph than its original: said in its step; the next one is measured."""
        step.repeats_unverified += 1
        if self.originals.get(original.signature) is original:
            del self.originals[original.signature]
