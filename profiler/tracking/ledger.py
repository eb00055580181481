"""The ledger of a step: which storages autograd saved, which gradients exist, and when.

What is counted, and why:

* a saved tensor is counted by the storage it views (views and aliases once,
  per forward: see ``ForwardSaves``), parameter storages are left out, and
  autocast's 16-bit copies of the weights (a ``ToCopyBackward`` node on a leaf
  parameter) are their own category rather than "activations";
* what a script's own pack hook made of a saved tensor is what backward holds
  on the device: a copy or a compressed form there, nothing if it moved the
  tensor elsewhere (``save_on_cpu``), nothing for a checkpoint's placeholder;
* gradients are counted per unique storage, so a tied weight has one;
* each save and release, and each gradient's arrival, is an event on the
  step's timeline (the plot and ``categories_live_peak`` replay it).

The ledger only counts: the tracker decides which step and forward a save
belongs to, and the module-call stack says where it was made.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils import checkpoint as torch_checkpoint

from ..errors import guarded
from .parallel import fsdp_wrapped
from .parameters import ModelParameters, unique_bytes
from .repeats import DATA_DEPENDENT
from .saved_tensors import (
    CHECKPOINT_HOLDER,
    NOT_PACKED,
    SavedTensor,
    memory_of,
    storage_key,
    tensors_held,
    tensors_in,
    weight_copy_source,
)
from .step_record import ForwardSaves, StepRecord

__all__ = ["CTX_PATH", "Ledger"]

CTX_PATH = "(kept on a custom autograd.Function's ctx)"  # see Ledger.count_function_ctx
_FUNCTION_NODE = torch.autograd.function.BackwardCFunction
_CHECKPOINT_FUNCTION = getattr(torch_checkpoint, "CheckpointFunction", None)


def _is_parameter(t: torch.Tensor) -> bool:
    """A parameter, or a view of one: weights, not activations, whichever model or loss they belong to.

    A loss's own trained weights (proxies, a projector) or another model's
    (the other tower of a two-tower model) are saved for backward as often as
    this model's, whose storages are known beforehand.
    """
    base = t._base
    if type(t) is torch.Tensor and (base is None or type(base) is torch.Tensor):
        # (An activation, checked at every save: for a plain tensor, Parameter's isinstance test is its
        # _is_param flag alone. Read directly: about 220 ns a call, against 790 ns through the metaclass.)
        return bool(getattr(t, "_is_param", False) or getattr(base, "_is_param", False))
    return isinstance(t, nn.Parameter) or isinstance(base, nn.Parameter)


def _count_unsharded(f: ForwardSaves, t: torch.Tensor, nbytes: int) -> None:
    """A parameter FSDP gathered (unsharded) for this forward, saved for backward.

    Keyed by the storage itself, not its address: FSDP frees an unsharded
    storage after the unit's forward (its size set to 0) and the next unit's
    tensors reuse the address. The storage is held (its memory is FSDP's to
    free) so that its identity stays unique while the step is counted.
    """
    storage = t.untyped_storage()
    if id(storage) not in f.unsharded:
        f.unsharded[id(storage)] = nbytes
        f.unsharded_storages.append(storage)


class Ledger:
    """Counts what one model's steps save and hold, and puts it on their timelines.

    ``current_step()`` is the step being measured (None when none is);
    ``locate()`` says where the running code is: (module path, where relative
    to the trunk, inside a module compiled whole), from the module-call stack; ``accumulated`` is
    set each time a parameter's ``.grad`` is accumulated (the owner clears it when a backward pass
    begins: a pass that accumulates none is ``torch.autograd.grad``'s).
    """

    def __init__(
        self,
        parameters: ModelParameters,
        device: torch.device,
        *,
        current_step: Callable[[], StepRecord | None],
        locate: Callable[[], tuple[str, str | None, bool]],
        fail: Callable[[str, Exception], None],
    ) -> None:
        self.parameters = parameters
        self._device = device
        self._current_step = current_step
        self._locate = locate
        self.accumulated = False  # a parameter's .grad was accumulated since the owner cleared this
        self.fail = fail  # for @guarded
        self.live: dict[
            int, tuple[str, int, ForwardSaves]
        ] = {}  # saved storages not yet released: (category, bytes, forward)
        self.gradients_seen: dict[int, int] = {}  # gradient storages on the step's timeline -> bytes
        self._grad_hooked: set[int] = set()
        self._grad_handles: list[Any] = []
        model = parameters.model
        # FSDP gathers the full parameters for forward: those it saves are their own category.
        self.fsdp = model is not None and fsdp_wrapped(model)

    def begin_step(self, step: StepRecord) -> None:
        """A step begins: the gradients alive now are its baseline, nothing saved is alive yet."""
        step.parameters = unique_bytes(self.parameters.shaped())
        self.gradients_seen = self.parameters.gradients()
        step.gradients_start = sum(self.gradients_seen.values())
        self.live = {}

    # ------------------------------------------------------------ saved tensors
    def observe(self, step: StepRecord, t: torch.Tensor, packed: Any = NOT_PACKED) -> int | None:
        """Count a tensor saved in ``step``'s current forward; the storage pointer counted for it, if any.

        ``packed`` is what the script's own pack hook made of ``t``: what backward
        then holds on the device is the tensors in it there (a copy, a
        compressed form), or nothing if it moved ``t`` elsewhere (``save_on_cpu``).
        """
        key = storage_key(t)
        if key is None:
            return None
        forward = step.current_forward
        if packed is not NOT_PACKED:
            if CHECKPOINT_HOLDER is not None and isinstance(packed, CHECKPOINT_HOLDER):
                step.checkpointing = True  # dropped now, recomputed in backward: nothing held
                return None
            inside = tensors_held(packed)
            held = [(x, k) for x in inside if x.device == t.device and (k := storage_key(x)) is not None]
            if inside and not held:  # every tensor it keeps is elsewhere (save_on_cpu from a GPU)
                if key[0] not in self.parameters.storages:
                    forward.offloaded += key[1]
                return None
            if held and all(k[0] != key[0] for _, k in held):  # a copy or a compressed form stays on the device
                for x, k in held:
                    self.count_saved(forward, x, *k)
                ptr = held[0][1][0]
                return ptr if ptr in forward.saved or ptr in forward.copies else None
        self.count_saved(forward, t, *key)
        return key[0] if key[0] in forward.saved or key[0] in forward.copies else None

    def count_saved(self, f: ForwardSaves, t: torch.Tensor, ptr: int, nbytes: int, path: str | None = None) -> None:
        """Charge a saved storage once: to autocast copies, or to the running module's (or ``path``'s) activations."""
        if ptr in self.parameters.storages or _is_parameter(t):
            if self.fsdp and ptr not in self.parameters.storages:
                _count_unsharded(f, t, nbytes)
            return
        if ptr in f.freed:
            # Saved again after autograd let go of it: the same storage (a
            # detached output saved anew) or a new one at its address. Alive
            # again, counted afresh.
            del f.freed[ptr]
            f.saved.pop(ptr, None)
            f.copies.pop(ptr, None)
        elif ptr in f.saved or ptr in f.copies:
            return
        # A storage an earlier forward of this step saved and backward has not
        # freed (the same batch through the model twice) is alive once: its
        # timeline event is that forward's.
        alive = ptr in self.live
        now = time.perf_counter()
        if weight_copy_source(t):
            f.copies[ptr] = nbytes
            if not alive:
                f.events.append((now, "autocast_copies", nbytes))
                self.live[ptr] = ("autocast_copies", nbytes, f)
            return
        f.saved[ptr] = nbytes
        if not alive:
            f.events.append((now, "activations", nbytes))
            self.live[ptr] = ("activations", nbytes, f)
        if path is not None:
            state = None  # (what a custom Function's ctx holds: which module made it is not seen)
        else:
            path, state, inside_compiled = self._locate()
            if inside_compiled:
                f.compiled.add(ptr)  # inside a model compiled whole: which block saved it is not seen
        f.where[ptr] = (path, state)

    def repeat_returned(self, f: ForwardSaves) -> None:
        """A forward taken as a repeat returned: the inputs and outputs it saves are alive on the timeline.

        (Another forward of the step saving the same batch then adds no second
        event for it, as when both are measured.)
        """
        for ptr, category, nbytes in f.io_saves():
            self.live.setdefault(ptr, (category, nbytes, f))

    def forward_returned(self, f: ForwardSaves) -> None:
        """A root forward returned: which of FSDP's gathered parameters it saved are still gathered now.

        FSDP frees a unit's gathered storages after the unit's forward (size
        0), except where backward needs them at once (FSDP2's root): what is
        left is alive beside the activations when backward begins.
        """
        if f.unsharded_storages:
            f.unsharded_held = sum(s.nbytes() for s in f.unsharded_storages)

    @guarded
    def count_function_ctx(self, step: StepRecord, roots: list, floor: int) -> None:
        """Tensors a custom ``autograd.Function`` keeps as attributes of its ``ctx``.

        ``ctx.mask = mask`` holds a tensor for backward as ``save_for_backward``
        does, but passes no saved-tensor hook. The nodes this forward made (the
        graph from its outputs back to its inputs' nodes, numbered above
        ``floor``) are walked once, and what a custom Function's ctx holds on
        the model's device is counted as activations, charged to ``CTX_PATH``. The walk also notes an
        operator whose output size follows the data (``repeats.DATA_DEPENDENT``).
        Torch's own checkpoint Function keeps only RNG states there, not
        activations.
        """
        seen, stack = set(), list(roots)
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if node._sequence_nr() <= floor:
                continue  # made before this forward (the inputs' graph: another model's, say)
            if type(node).__name__ in DATA_DEPENDENT:
                step.current_forward.data_dependent = True  # not to be taken as repeating (repeats.py)
            if isinstance(node, _FUNCTION_NODE) and getattr(node, "_forward_cls", None) is not _CHECKPOINT_FUNCTION:
                for t in tensors_in(list(vars(node).values())):
                    key = storage_key(t)
                    if key is not None and t.device == self._device:
                        self.count_saved(step.current_forward, t, *key, path=CTX_PATH)
            stack.extend(n for n, _ in node.next_functions)

    def hold(self, saved: SavedTensor) -> None:
        """Autograd holds ``saved`` (counted in the current forward) until it lets go of it: told then."""
        forward = self._current_step().current_forward
        forward.holders[saved.ptr] = forward.holders.get(saved.ptr, 0) + 1
        saved.forward, saved.owner = forward, self

    def saved_freed(self, forward: ForwardSaves, ptr: int) -> None:
        """Autograd let go of a saved tensor of ``forward`` (``SavedTensor.__del__``): the storage's last one frees it.

        Freed while no backward pass of the step has begun, it was never alive
        at one (another model's forward whose graph was dropped, or freed by
        its own backward): ``StepRecord.fold`` leaves it out of what that pass held.
        """
        left = forward.holders.get(ptr, 0) - 1
        if left > 0:
            forward.holders[ptr] = left
            return
        forward.holders.pop(ptr, None)
        step = self._current_step()
        if step is not None and ptr not in forward.freed:
            # (during backward pass k: k, alive when it began; a backward call frees
            # the loss's saves before it reaches the model's output: its task says
            # which pass it turns out to be, see StepRecord.fold)
            forward.freed[ptr] = (step.backwards, torch._C._current_graph_task_id())

    @guarded
    def unpacked(self, ptr: int) -> None:
        """Backward used a saved storage: the timeline releases it here."""
        if self._current_step() is not None and ptr in self.live:
            category, nbytes, forward = self.live.pop(ptr)
            forward.events.append((time.perf_counter(), category, -nbytes))

    def release_at_backward_end(self) -> None:
        """Saved tensors backward never used (a branch that needed no gradient) are freed with the graph now.

        A forward whose output this backward did not reach keeps its own.
        """
        now, alive = time.perf_counter(), {}
        for ptr, (category, nbytes, forward) in self.live.items():
            if forward.watched and forward.reached_by is None:
                alive[ptr] = (category, nbytes, forward)
            else:
                forward.events.append((now, category, -nbytes))
        self.live = alive

    # ---------------------------------------------------------------- gradients
    def hook_gradients(self) -> None:
        """A hook on each trainable parameter with a shape (again for lazy ones that got theirs)."""
        for p in {id(p): p for p in self.parameters.shaped()}.values():
            if p.requires_grad and id(p) not in self._grad_hooked:
                self._grad_hooked.add(id(p))
                self._grad_handles.append(p.register_post_accumulate_grad_hook(self._gradient_accumulated))

    def unhook_gradients(self) -> None:
        for handle in self._grad_handles:
            handle.remove()
        self._grad_handles = []

    def _gradient_accumulated(self, param: torch.Tensor) -> None:
        """A parameter's gradient was accumulated: the timeline's gradient growth.

        Called once per parameter per backward: guarded inline (as ``guarded``
        does) rather than through its wrapper, one call less each time.
        """
        try:
            grad = param.grad
            if grad is None:
                return
            step = self._current_step()
            if step is None:
                return
            self.accumulated = True
            ident, nbytes = memory_of(grad)
            if ident not in self.gradients_seen:
                self.gradients_seen[ident] = nbytes
                step.events.append((time.perf_counter(), "gradients", nbytes))
        except Exception as exc:  # noqa: BLE001 - reported, never raised into the backward pass
            self.fail("_gradient_accumulated", exc)

    def release_cleared_gradients(self, step: StepRecord) -> None:
        """Take gradients that ``zero_grad()`` freed in mid-step off the timeline.

        A script may clear gradients between forward and backward, or in an
        LBFGS closure; the storages seen so far are then gone, and the
        backward that follows allocates new ones.
        """
        if not self.gradients_seen:
            return
        alive = self.parameters.gradients()
        gone = [ident for ident in self.gradients_seen if ident not in alive]
        if gone:
            now = time.perf_counter()
            step.events.extend([(now, "gradients", -self.gradients_seen.pop(ident)) for ident in gone])

    def count_gradients(self, step: StepRecord) -> None:
        """The step's gradient bytes: the most its parameters' unique gradient storages held."""
        step.gradients = max(step.gradients, sum(self.parameters.gradients().values()))
