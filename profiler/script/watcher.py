"""Find the models a script builds and calls, without touching the script.

A model is a module that is *called from outside any other module* and owns
parameters. Two global hooks (the mechanism of ``torch.utils.module_tracker``)
keep a per-thread nesting depth; a call at depth 0 is a root call. Each new
root is reported to a callback once, with the call's positional arguments, so
the caller can analyse it or start measuring it on its first forward (a model
with lazy modules: at its second call, once its first gave them shapes).

The hooks cost one dict lookup per module call and are removed by ``close()``
(also on exceptions: use it as a context manager). In a forked child (a
DataLoader worker) they do nothing, so workers never report. While dynamo
traces a compiled region they return at once (a constant there), so they put
no graph break into the script's compiled code. A model compiled in place
(``model.compile()``) runs no Python hook when called, so the watcher wraps
``nn.Module.compile`` while it watches, and calls its hooks around that
model's compiled call.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.nn.parameter import is_lazy

from ..tracking.compiled import unwrap_compiled_call, wrap_compiled_call
from ..tracking.module_calls import PROCESS, hide_global_hook_warning, restore_warnings, running_call_kwargs

__all__ = ["Listening", "ModelWatcher", "outermost"]


class ModelWatcher:
    """Watch every ``nn.Module`` call and collect the root modules with parameters.

    >>> with ModelWatcher() as watcher:
    ...     train()
    >>> watcher.models  # [model, ...] in order of first call
    """

    def __init__(
        self,
        on_new_model: Callable[[nn.Module, tuple, dict], None] | None = None,
        on_compiled_first_call_end: Callable[[nn.Module, tuple, object], None] | None = None,
    ) -> None:
        self._on_new_model = on_new_model
        # A hook-less compiled call has no forward hook to end the call in which
        # the model was found: this is told instead (the caller's tracker began there).
        self._on_compiled_first_call_end = on_compiled_first_call_end
        self._compile_patch: tuple[Callable, Callable] | None = None  # (torch's nn.Module.compile, ours)
        self._shimmed: list[tuple[weakref.ref, weakref.ref]] = []  # (module, our shim around its compiled call)
        self._forks = PROCESS.forks  # a forked child (a DataLoader worker) has more: the hooks do nothing there
        self._local = threading.local()
        # Weak references only: a script that builds a model per fold or per
        # trial and drops it must get its memory back. (Sets of ids would also
        # mistake a new module for a freed one whose id Python reused.)
        self._seen: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._models: list[weakref.ref[nn.Module]] = []
        self._inside_models: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # every module of every model found
        self._lazy_called: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # called once with lazy parameters
        self._handles: list = []
        self._warning_filter: tuple | None = None
        self._raise_at_next_call: BaseException | None = None
        self._stop_when: Callable[[], bool | None] | None = None  # asked at each call: see stop_script_at_next_call
        self._listeners: list[tuple[Callable, Callable]] = []  # (pre, post) called at every module call: see listen()

    # Hooks ------------------------------------------------------------------
    def stop_script_at_next_call(self, exc: BaseException, when: Callable[[], bool | None] | None = None) -> None:
        """Raise ``exc`` from the next module call (the runner's --stop-after-steps).

        With ``when``, from the first module call at which ``when()`` is True;
        None calls the stop off. (A model whose forward ran but whose backward
        has not yet may still turn out to train: the other model of a GAN.)
        """
        self._raise_at_next_call = exc
        self._stop_when = when

    def _stop_now(self) -> BaseException | None:
        """The exception to raise from this call, if the stop asked for comes now (see ``stop_script_at_next_call``)."""
        exc, when = self._raise_at_next_call, self._stop_when
        decided = True if when is None else when()
        if decided is not False:  # raised now, or called off
            self._raise_at_next_call, self._stop_when = None, None
        return exc if decided else None

    def _pre(self, module: nn.Module, args: object, kwargs: dict | None = None) -> None:
        # Called at every module call of the script: the common path is kept to a few lookups.
        if PROCESS.forks != self._forks or torch.compiler.is_compiling():
            return
        if self._raise_at_next_call is not None and (exc := self._stop_now()) is not None:
            raise exc
        local = self._local
        depth = getattr(local, "depth", 0)
        local.depth = depth + 1
        listeners = self._listeners  # as before this call: a tracker started by it began the call itself
        if depth == 0:
            local.root = module
            if module not in self._seen:
                self._discover(module, args, kwargs)
        for pre, _ in listeners:
            pre(module, args)

    def _discover(self, module: nn.Module, args: object, kwargs: dict | None) -> None:
        """A root call of a module not seen before: a new model, if it owns parameters."""
        if torch._C._current_graph_task_id() != -1:
            return  # backward recomputing checkpointed blocks: not a model of its own
        if module not in self._lazy_called and any(is_lazy(p) for p in module.parameters()):
            # A lazy module gets its shapes in this first forward: found at its
            # next call (with shapes, except in parts that did not run).
            self._lazy_called.add(module)
            return
        self._seen.add(module)
        if module in self._inside_models:
            return  # a part of a model already found, called on its own
        if any(True for _ in module.parameters()):
            self._models.append(weakref.ref(module))
            self._inside_models.update(module.modules())
            if self._on_new_model is not None:
                self._on_new_model(module, args, running_call_kwargs(module) if kwargs is None else kwargs)

    def _post(self, module: nn.Module, args: object, output: object) -> None:
        if PROCESS.forks != self._forks or torch.compiler.is_compiling():
            return
        local = self._local
        depth = getattr(local, "depth", 1)
        local.depth = depth - 1 if depth > 0 else 0
        if depth <= 1:
            local.root = None
        for _, post in self._listeners:
            post(module, args, output)

    def listen(
        self, pre: Callable[[nn.Module, tuple], None], post: Callable[[nn.Module, tuple, object], None]
    ) -> Listening:
        """Have ``pre`` and ``post`` called at every module call, from this watcher's global hooks.

        The runner's trackers observe through these rather than global hooks
        of their own: dynamo guards compiled code on how many global hooks
        exist, so adding and removing some as each model's steps are measured
        would recompile every compiled model once more.
        """
        pair = (pre, post)
        self._listeners = self._listeners + [pair]  # copied, never changed in place: _pre iterates a snapshot
        return Listening(self, pair)

    def model_running(self) -> nn.Module | None:
        """The model (or a part of one) whose root call is running on this thread now, if any.

        A module without parameters called at the top (a loss module) is no model.
        """
        root = getattr(self._local, "root", None)
        return root if root is not None and root in self._inside_models else None

    def stop_listening(self, pair: tuple) -> None:
        """End what ``listen`` began (``Listening.remove`` calls this)."""
        self._listeners = [p for p in self._listeners if p is not pair]

    # Models compiled in place ------------------------------------------------
    def _patch_compile(self) -> None:
        original = nn.Module.__dict__.get("compile")
        if original is None:
            return
        watcher = weakref.ref(self)

        @functools.wraps(original)
        def compile(module: nn.Module, *args: object, **kwargs: object) -> object:
            result = original(module, *args, **kwargs)
            w = watcher()
            if w is not None and w._handles:
                w._shim_compiled_call(module)
            return result

        nn.Module.compile = compile
        self._compile_patch = (original, compile)

    def _shim_compiled_call(self, module: nn.Module) -> None:
        """Call the watcher's hooks, in eager Python, around ``module``'s compiled call."""

        def before(args: tuple, kwargs: dict) -> bool | None:
            if not self._handles or PROCESS.forks != self._forks:
                return None
            known = module in self._seen
            self._pre(module, args, kwargs)
            return not known and module in self._seen  # found at this call

        def after(args: tuple, output: object, found_now: bool) -> None:
            self._post(module, args, output)
            if found_now and self._on_compiled_first_call_end is not None:
                self._on_compiled_first_call_end(module, args, output)

        shim = wrap_compiled_call(module, before, after)
        if shim is not None:
            self._shimmed.append((weakref.ref(module), shim))

    def _unpatch_compile(self) -> None:
        patch, self._compile_patch = self._compile_patch, None
        if patch is not None and nn.Module.__dict__.get("compile") is patch[1]:
            nn.Module.compile = patch[0]
        for module, shim in self._shimmed:
            unwrap_compiled_call(module(), shim)
        self._shimmed = []

    # Lifecycle ---------------------------------------------------------------
    def start(self) -> ModelWatcher:
        if not self._handles:
            self._handles = [
                module_hooks.register_module_forward_pre_hook(self._pre),
                # always_call: the depth must come back down when a forward raises.
                module_hooks.register_module_forward_hook(self._post, always_call=True),
            ]
            self._patch_compile()
            self._warning_filter = hide_global_hook_warning()
        return self

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._unpatch_compile()
        entry, self._warning_filter = self._warning_filter, None
        restore_warnings(entry)

    def __enter__(self) -> ModelWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def models(self) -> list[nn.Module]:
        """Root models still alive, in order of first call, a submodule called on its own left out."""
        return outermost([m for ref in self._models if (m := ref()) is not None])


class Listening:
    """What ``ModelWatcher.listen`` returns: ``remove()`` ends it (like a hook's handle)."""

    def __init__(self, watcher: ModelWatcher, pair: tuple) -> None:
        self._watcher, self._pair = weakref.ref(watcher), pair

    def remove(self) -> None:
        watcher = self._watcher()
        if watcher is not None:
            watcher.stop_listening(self._pair)


def outermost(candidates: list[nn.Module]) -> list[nn.Module]:
    """Drop every candidate that is a submodule of another candidate."""
    inner: set[int] = set()
    for m in candidates:
        for sub in m.modules():
            if sub is not m:
                inner.add(id(sub))
    unique, seen = [], set()
    for m in candidates:
        if id(m) not in inner and id(m) not in seen:
            seen.add(id(m))
            unique.append(m)
    return unique
