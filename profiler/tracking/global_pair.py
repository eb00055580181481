"""Our pair of global module hooks, which a forward taken as a repeat runs without.

A global module hook, even one that returns at once, sends every module call
in the process down ``nn.Module._call_impl``'s slow path: a few microseconds a
call, most of what hooks cost a small model whose forwards are repeats. So
while a repeat runs, the pair is out of torch's dicts and the root module
alone carries a stand-in pair (for a nested call of the root, and for its
end), and the root's end puts the global pair back. Entries are moved by
their ids, without new handles (a handle made per forward cost as much as the
calls it spared).

After an exception in the forward, torch calls the root's always-called hooks
in a loop over the root's hook dict itself, where taking an entry out would
raise in the script: the stand-in pair then stays until the next module call
(``stale``). A copy of the model made meanwhile gets hooks that do nothing.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.nn.modules import module as module_hooks
from torch.utils.hooks import RemovableHandle

__all__ = ["GlobalPair"]


class _RootHook:
    """One of the stand-in pair on the root; a copy or a pickle of it does nothing."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable | None) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> None:
        if self.fn is not None:
            self.fn(*args)

    def __reduce__(self) -> tuple:
        return (_RootHook, (None,))

    def __deepcopy__(self, memo: dict) -> _RootHook:
        return _RootHook(None)


class GlobalPair:
    """A global forward pre-hook and an always-called forward hook, and their stand-ins on a root module.

    ``pre(module, args)`` and ``post(module, args, output)`` are the global
    pair; ``root_pre`` and ``root_post`` (same signatures) stand in for them on
    the root while it runs ``quiet``.
    """

    def __init__(self, pre: Callable, post: Callable, root_pre: Callable, root_post: Callable) -> None:
        self._pre, self._post = pre, post
        self._handles: list[RemovableHandle] = []
        self.on = False  # the global pair is in torch's dicts
        self._stand_ins = (_RootHook(root_pre), _RootHook(root_post))
        self._root: weakref.ref | None = None  # the root, while it carries the stand-ins
        self._ids: tuple[int, int] | None = None  # their ids in the root's hook dicts
        self.stale = False  # the stand-ins are to go at the next module call

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    @property
    def quiet(self) -> bool:
        """The root carries the stand-ins (a repeat runs, or one raised and they are stale)."""
        return self._root is not None

    @property
    def standing_in(self) -> bool:
        """The stand-ins on the root act for the global pair (a repeat runs: not stale)."""
        return self._root is not None and not self.stale

    def install(self) -> None:
        self._handles = [
            module_hooks.register_module_forward_pre_hook(self._pre),
            module_hooks.register_module_forward_hook(self._post, always_call=True),
        ]
        self.on = True

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.on = [], False
        self.leave_root()

    def go_quiet(self, root: nn.Module) -> None:
        """Take the global pair out of torch's dicts; ``root`` carries the stand-ins until ``go_loud``.

        (Inside torch's loop over the global pre-hooks: it holds them as a tuple already.)
        """
        if not (self.installed and self.on) or self.quiet:
            return
        pre, post = self._handles
        module_hooks._global_forward_pre_hooks.pop(pre.id, None)
        module_hooks._global_forward_hooks.pop(post.id, None)  # (its always-called mark stays: it comes back)
        self.on = False
        if self._ids is None:  # ids from torch's own counter, taken once
            self._ids = (RemovableHandle(root._forward_pre_hooks).id, RemovableHandle(root._forward_hooks).id)
        pre_id, post_id = self._ids
        root._forward_pre_hooks[pre_id], root._forward_hooks[post_id] = self._stand_ins
        root._forward_hooks_always_called[post_id] = True
        self._root = weakref.ref(root)

    def go_loud(self, now: bool) -> None:
        """Put the global pair back; the stand-ins go now, or (``now`` False: an exception) at the next call."""
        if not self.on and self.installed:
            pre, post = self._handles
            module_hooks._global_forward_pre_hooks[pre.id] = self._pre
            module_hooks._global_forward_hooks[post.id] = self._post
            self.on = True
        if now:
            self.leave_root()
        else:
            self.stale = True

    def leave_root(self) -> None:
        """Take the stand-ins off the root."""
        root = self._root() if self._root is not None else None
        if root is not None and self._ids is not None:
            pre_id, post_id = self._ids
            root._forward_pre_hooks.pop(pre_id, None)
            root._forward_hooks.pop(post_id, None)
            root._forward_hooks_always_called.pop(post_id, None)
        self._root, self.stale = None, False
