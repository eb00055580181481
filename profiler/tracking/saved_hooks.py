"""Our pair of saved-tensor hooks on autograd's stack, and how it lives beside other pairs.

Every ``torch._C._autograd`` saved-tensor-hook call of the package is here.
Autograd runs only the innermost pair of a thread's stack, which is why the
rules below exist:

* a pair the script pushed before ours (``save_on_cpu``, a lossy compressor,
  a checkpoint) is called from ours, so the training is the same with us as
  without; ours then nests strictly inside the script's context (it is popped
  at the end of the forward, since the script pops the top pair when its
  ``with`` ends);
* another model's tracker is passed over to the script's pair beneath it,
  and a tracker of the same model (nested ``profile`` blocks, or a script's
  own ``profile()`` under ``python -m profiler``) is told of each save too;
* pairs of other trackers whose model is not running (between their
  forwards, or after a forward whose output the script keeps: a GAN's
  generator rendering samples) are taken off when our forward begins, so its
  saves come to us; a loss computed after both forwards is the later
  model's, ours.

What to do with a save is the owner's business (the tracker decides which
step it belongs to, the ledger keeps it): this module only asks them,
through the ``HooksOwner`` and ``SaveKeeper`` interfaces.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from .saved_tensors import NOT_PACKED, SavedTensor

__all__ = ["PASS_ON", "HooksOwner", "SaveKeeper", "SavedHooks"]

# What ``HooksOwner.observe_saved`` returns for a save that is not its model's:
# its forward's graph is gone, so this is the loss of a model whose pair is below ours.
PASS_ON = object()

_autograd = torch._C._autograd


class HooksOwner(Protocol):
    """What the saved-tensor hooks ask of the tracker that owns them."""

    @property
    def model(self) -> nn.Module | None: ...

    @property
    def measuring(self) -> bool: ...

    @property
    def forwarding(self) -> bool:
        """A root forward of the owner's model is running now: its pair must stay on top."""

    def observe_saved(self, t: torch.Tensor, packed: Any = NOT_PACKED) -> Any:
        """Count a saved tensor: the storage pointer counted, None, or ``PASS_ON``."""


class SaveKeeper(Protocol):
    """Where counted saves are kept (the ledger)."""

    def hold(self, saved: SavedTensor) -> None:
        """Register ``saved`` (counted) with the forward that saved it, to be told when autograd frees it."""

    def unpacked(self, ptr: int) -> None:
        """Backward used the saved storage ``ptr``."""


def _top() -> tuple[Callable, Callable] | None:
    return _autograd._top_saved_tensors_default_hooks(False)


def hooks_of(pack: Callable) -> SavedHooks | None:
    """The ``SavedHooks`` whose pack hook ``pack`` is (itself, or wrapped by ``torch._dynamo.disable``)."""
    owner = getattr(getattr(pack, "__wrapped__", pack), "__self__", None)
    return owner if isinstance(owner, SavedHooks) else None


def _pop_tracker_pairs(thread: int, may_go: Callable[[SavedHooks], bool]) -> None:
    """Pop trackers' pairs off the top of this thread's stack while ``may_go(hooks)``.

    Stops at the first pair that is not a tracker's own (the script's), or
    whose tracker is of another thread or must stay.
    """
    while (top := _top()) is not None:
        other = hooks_of(top[0])
        if other is None or other.thread != thread or top[0] is not other.pair[0] or not may_go(other):
            break
        _autograd._pop_saved_tensors_default_hooks()
        other.pushed = False


class SavedHooks:
    """One tracker's pack/unpack pair: pushed when its forward begins, popped when it may be."""

    def __init__(self, owner: HooksOwner, keeper: SaveKeeper) -> None:
        self.owner = owner
        self.keeper = keeper
        self.thread = threading.get_ident()  # the pair lives on the thread that pushed it
        self.pair: tuple[Callable, Callable] = (self._pack, self._unpack)  # what is pushed: see _hook_pair
        self.pushed = False
        self.balanced = False  # the script's own pair is below ours: ours must go at the end of the forward
        self.pushed_in_backward = False  # pushed while backward ran (a reentrant checkpoint's recomputation)
        self.outer: tuple[Callable, Callable] | None = None  # the script's pair below ours
        self.below: tuple[Callable, Callable] | None = None  # the pair right below ours when it was pushed
        self.peers: list[SavedHooks] = []  # pairs of trackers of this same model below ours

    # ---------------------------------------------------------------- stack
    def push(self) -> None:
        """Put our pair on top for a forward of the owner's model (see the module's rules)."""
        if self.pushed:
            _pop_tracker_pairs(self.thread, lambda other: other is not self and not other.owner.forwarding)
            top = _top()
            if not (self.pushed_in_backward and (top is None or top[0] is not self.pair[0])):
                return
            # Pushed while backward ran (a reentrant checkpoint's recomputation): the
            # engine ran it with its own copy of the thread's hooks, gone with it.
            self.pushed = False
        # Without a script's pair, ours stays until the step's backward is done, to
        # see what the loss outside the model saves.
        top = _top()
        outer, peers = top, []
        while outer is not None and (other := hooks_of(outer[0])) is not None:
            if other is not self and other.owner.model is self.owner.model:
                peers.append(other)
            outer = other.outer
        self.outer = outer
        self.peers = peers
        for other in peers:  # and the other way: once our pair is popped, theirs sees the loss
            if self not in other.peers:
                other.peers.append(self)
        # Only the script's own pair pops the top of the stack when its `with`
        # ends; another model's tracker pops its pair only when it is on top,
        # so above one of those ours stays for the loss (it is this model's).
        self.balanced = outer is not None
        self.below = top
        pack, unpack = self._hook_pair()
        _autograd._push_saved_tensors_default_hooks(pack, unpack)
        self.pushed = True
        self.pushed_in_backward = torch._C._current_graph_task_id() != -1

    def _hook_pair(self) -> tuple[Callable, Callable]:
        """The pack and unpack hooks to push: ours, kept out of dynamo once it is loaded.

        Autograd calls them from inside compiled code too (what a compiled
        graph saves is seen); dynamo must not compile them into the script's
        graphs (nor recompile for every tensor shape), so they are wrapped in
        ``torch._dynamo.disable``. Without dynamo imported no code is compiled,
        and importing it for nothing would change the script's process.
        """
        dynamo = sys.modules.get("torch._dynamo")
        if dynamo is not None and not hasattr(self.pair[0], "__wrapped__"):
            self.pair = (dynamo.disable(self._pack), dynamo.disable(self._unpack))
        return self.pair

    def pop(self) -> None:
        """Pop our pair if it is the innermost one on this thread.

        The pair lives on the thread that pushed it. When measuring ends
        elsewhere (on CUDA, backward and its callbacks run on autograd's device
        thread) or under a pair the user pushed later, it cannot be popped
        here; the owner pops it the next time a save comes with measuring over.
        """
        if not self.pushed or threading.get_ident() != self.thread:
            return
        top = _top()
        if top is not None and top[0] is self.pair[0]:
            _autograd._pop_saved_tensors_default_hooks()
            self.pushed = False
            # A pair of another model's tracker under ours that stopped meanwhile
            # (it could not pop it from beneath ours) goes with ours.
            _pop_tracker_pairs(self.thread, lambda other: not other.owner.measuring)

    def clear(self) -> bool:
        """Take our pair, and idle trackers' pairs, off the top: True when the stack is then empty.

        A forward taken as a repeat (see ``repeats.py``) runs with no pair: its
        saves go to no hook at all, as without us.
        """
        self.pop()
        _pop_tracker_pairs(self.thread, lambda other: other is not self and not other.owner.forwarding)
        return _top() is None

    def foreign_pair_on_top(self) -> bool:
        """Another pair than ours is innermost: a non-reentrant checkpoint's, around a block."""
        top = _top()
        return top is not None and top[0] is not self.pair[0]

    # ------------------------------------------------------------ the hooks
    def _pack(self, t: torch.Tensor) -> SavedTensor:
        """Autograd saves ``t`` for backward: tell the owner, then save it as autograd would have.

        Without a script's pair, what is saved is a detached alias (returning
        ``t`` itself would make a reference cycle through its grad_fn, see
        ``torch.autograd.graph.saved_tensors_hooks``) with ``t``'s version,
        checked at unpack: with hooks installed autograd no longer checks
        whether a saved tensor was modified in place, so we do.
        """
        outer = self.outer
        packed = NOT_PACKED
        if outer is not None:
            packed = outer[0](t)
            ptr = self.owner.observe_saved(t, packed)
            saved = SavedTensor(packed, None, outer[1], None if ptr is PASS_ON else ptr)
        else:
            ptr = self.owner.observe_saved(t)
            below = self.below
            if ptr is PASS_ON:
                if below is not None and hooks_of(below[0]) is not None:
                    # Our forward's graph is gone: what is saved now is the loss of a
                    # model whose pair is below ours (a teacher run with gradients on
                    # inside a student's step). Ours is popped; this one is its.
                    return below[0](t)
                ptr = None
            saved = SavedTensor(t.detach(), t._version, None, ptr)
        if saved.ptr is not None:
            # Told when autograd lets go of it (SavedTensor.__del__): used by
            # backward, or its graph dropped unused before any backward.
            self.keeper.hold(saved)
        if self.peers:
            saved.peers = tuple((peer, _counted(peer.owner.observe_saved(t, packed))) for peer in self.peers)
        return saved

    def _unpack(self, saved: SavedTensor) -> torch.Tensor:
        """Backward uses a saved tensor, then frees it: the timeline's release point."""
        if saved.ptr is not None:
            self.keeper.unpacked(saved.ptr)
        for peer, ptr in saved.peers:
            if ptr is not None:
                peer.keeper.unpacked(ptr)
        if saved.unpack is not None:
            return saved.unpack(saved.value)
        value = saved.value
        if value._version != saved.version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: [{value.type()} {list(value.shape)}] is at version {value._version}; expected "
                f"version {saved.version} instead (checked by profiler's saved-tensor hook, as autograd "
                "checks when no hook is installed)"
            )
        return value


def _counted(ptr: Any) -> int | None:
    """A peer's answer as a storage pointer: a save it passes on is one it did not count."""
    return None if ptr is PASS_ON else ptr
