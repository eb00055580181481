"""The module-call stack of a measured model, and what a global module hook can learn.

The trackers and the model watcher use global module hooks
(``register_module_forward_pre_hook``), as ``torch.utils.module_tracker``
does: they live outside every module, so a model can be deep-copied,
pickled (``torch.save(model)``) or scripted while it is measured, which a
hook stored on its modules would break. A global pre-hook is given the
call's positional arguments only; the keyword ones are read here.

``ModuleCalls`` keeps, for one model, the stack of its modules running now
(so every saved tensor is charged to the innermost module that saved it) and
where execution is relative to its trunk of blocks; it tells its owner (the
tracker) when a root forward begins and ends, and notes in the open step what
the calls show: the batch input's shape, a block's input shape, a
checkpointed block.
"""

from __future__ import annotations

import sys
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import guarded
from .compiled import compiled_parts, hookable_modules, is_compiled, unwrap_compiled_call, wrap_compiled_call
from .global_pair import GlobalPair
from .process import PROCESS
from .saved_tensors import tensors_in

__all__ = [
    "COMPILED_NOTE",
    "OUTSIDE",
    "PROCESS",
    "ModuleCalls",
    "batch_input",
    "hide_global_hook_warning",
    "restore_warnings",
    "running_call_kwargs",
]

OUTSIDE = "(outside the model)"  # saved while no module of the model was running
COMPILED_NOTE = (
    "torch.compile'd module: what its graphs save for backward is measured (autograd's saved-tensor hooks "
    "run for compiled graphs), but no module hook runs inside it, so it is charged to the compiled "
    "module itself (autocast's weight copies made inside it are counted as activations)"
)


def _module_call_codes() -> frozenset:
    """The code of ``nn.Module._call_impl`` and of the function inside it that runs the hooks."""
    outer = nn.Module._call_impl.__code__
    return frozenset([outer, *(c for c in outer.co_consts if getattr(c, "co_name", None) == "inner")])


_MODULE_CALL_CODES = _module_call_codes()


def running_call_kwargs(module: nn.Module) -> dict:
    """The keyword arguments of ``module``'s call running now.

    A global forward pre-hook is given the positional ones only; a model called
    as ``model(input_ids=ids, labels=labels)`` (every Hugging Face script) has
    its batch in these. They are read from torch's frame that calls the hook
    (a few frames up: call this from the hook itself), once per root call.
    None when that frame is not found: what the call was given is not known.
    """
    frame = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            break
        if frame.f_code in _MODULE_CALL_CODES:
            local = frame.f_locals  # (a copy of the frame's locals, made at each read: read once)
            if local.get("self") is module:
                kwargs = local.get("kwargs")
                return dict(kwargs) if isinstance(kwargs, dict) else {}
        frame = frame.f_back
    return None


def hide_global_hook_warning() -> tuple:
    """Silence torch's warning that global hooks exist, given at a ``torch.compile(module)`` call.

    It says they "fire an extra time" for the compile wrapper: these are ours,
    and they allow for the wrapper. Not the script's concern. Returns the
    filter entry for ``restore_warnings``.
    """
    warnings.filterwarnings("ignore", message=r"Using `torch\.compile\(module\)` when there are global hooks")
    return warnings.filters[0]


def restore_warnings(entry: tuple | None) -> None:
    """Remove a filter ``hide_global_hook_warning`` added (one equal entry: each caller removes its own)."""
    if entry is not None and entry in warnings.filters:
        warnings.filters.remove(entry)
        getattr(warnings, "_filters_mutated", lambda: None)()  # as warnings.filterwarnings does


def batch_input(args: Any, kwargs: Any) -> tuple[tuple[int, ...], bool] | None:
    """A forward's batch input shape, and whether it is token ids; None without a tensor.

    Token ids are (batch, sequence) integers, taken first; 1-D class labels or
    a segmentation mask passed beside the pixels are not. Otherwise the first
    tensor.
    """
    tensors = tensors_in(args) + tensors_in(dict(kwargs or {}))
    if not tensors:
        return None
    ids = [t for t in tensors if not t.is_floating_point() and not t.is_complex() and t.dim() == 2]
    return tuple(int(d) for d in (ids or tensors)[0].shape), bool(ids)


class CallsOwner(Protocol):
    """What the module-call stack tells the tracker that owns it, and asks of it."""

    @property
    def model(self) -> nn.Module | None: ...

    @property
    def step(self) -> Any:
        """The step being measured, or None: inside the model only a step's calls matter."""

    @property
    def measuring(self) -> bool: ...

    def fail(self, where: str, exc: Exception) -> None: ...

    def root_forward_begins(self, args: Any, kwargs: dict | None) -> None: ...

    def root_forward_ends(self, output: Any) -> None: ...

    def run_order_known(self, order: dict[str, int]) -> None:
        """The first training forward ran its modules in this order (path -> index of its first call)."""

    @property
    def forwarding(self) -> bool:
        """A root forward of the model is running (not yet returned)."""


class ModuleCalls:
    """The stack of the model's modules running now, seen through global module hooks.

    ``bucket_of(path, trunk_state)`` names the bucket of a module path, a
    container being placed by where execution is relative to the trunk
    (``before``, ``in``, ``after``). ``host``, when given (the runner's model
    watcher), calls our hooks from its own global hooks (see
    ``ModelWatcher.listen``) instead of us adding a pair.
    """

    def __init__(
        self,
        owner: CallsOwner,
        model: nn.Module,
        bucket_of: Callable[[str, str], str],
        notes: list[str],
        host: Any = None,
        foreign_saved_hooks: Callable[[], bool] = lambda: False,
    ) -> None:
        self.owner = owner
        self._model_ref = weakref.ref(model)  # (read at every module call: no property chain)
        self._foreign_saved_hooks = foreign_saved_hooks  # a pair not ours is innermost (a checkpoint's)
        self.fail = owner.fail  # for @guarded
        self.bucket_of = bucket_of  # replaced once the first forward showed the order the modules run in
        self._notes = notes
        self._host = host
        self._paths: dict[int, str] = {}
        for path, mod in model.named_modules(remove_duplicate=False):
            self._paths.setdefault(id(mod), path)
        # Looked up on every module call: which modules are trunk blocks (or inside one).
        self._block_modules = {mid for mid, path in self._paths.items() if bucket_of(path, "") == "block"}
        # Compiled modules whose inside spans buckets (a model compiled whole): what
        # they save is measured, but no module hook runs inside to say where.
        self._compiled_mixed = {
            id(m)
            for path, m in model.named_modules()
            if is_compiled(m) and bucket_of(path, "before") != bucket_of(path, "after")
        }
        if any(is_compiled(m) for m in model.modules()):
            notes.append(COMPILED_NOTE)
        # Modules that say where their input's batch is (an LSTM, a Transformer layer, attention).
        self._batch_first = {id(m) for m in model.modules() if isinstance(getattr(m, "batch_first", None), bool)}
        self.stack: list[int] = []
        self.skip_inside = False  # a forward taken as a repeat runs: calls inside the model are not followed
        self.trunk_state = "before"  # where execution is relative to the trunk: before/in/after
        self._hooked: set[int] = set()  # ids of the model's modules whose calls are observed
        self._handles: list[Any] = []
        # Our two global hooks (not under a host), out of torch's dicts while a repeat runs.
        self._pair = GlobalPair(self._any_pre, self._any_post, self._quiet_pre, self._quiet_post)
        self._root_called = False  # the running root call came through the model's own call (hooks ran)
        self._warning_filter: tuple | None = None
        self._compiled_calls: list[tuple[weakref.ref, weakref.ref | None]] = []  # (module, our wrapper)
        self._forks = PROCESS.forks  # a forked child (a DataLoader worker) has more: the hooks do nothing there
        self._thread = threading.get_ident()
        # module path -> the order of its first call, in the first training forward; None once taken
        self._run_order: dict[str, int] | None = {}

    # ------------------------------------------------------------ lifecycle
    def install(self) -> None:
        """Observe the model's module calls (global hooks, filtered by module).

        Hooks stored on the model's modules would go with it into a deepcopy
        (an EMA copy), a pickle (``torch.save(model)``) or ``torch.jit.script``,
        and break them.
        """
        self._wrap_compiled_calls()
        self._hooked = {id(m) for m in hookable_modules(self.owner.model)}
        if self._host is not None:  # no global hook added or removed (see ModelWatcher.listen)
            self._handles.append(self._host.listen(self._any_pre, self._any_post))
        else:
            self._pair.install()
            self._warning_filter = hide_global_hook_warning()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._pair.remove()
        self._handles = []
        restore_warnings(self._warning_filter)
        self._warning_filter = None
        for module, wrapper in self._compiled_calls:
            unwrap_compiled_call(module(), wrapper)
        self._compiled_calls = []
        self.stack = []

    def _wrap_compiled_calls(self) -> None:
        """Call our hooks around the compiled call of the model, or of its parts, compiled in place.

        A module compiled with ``.compile()`` goes straight to its compiled
        ``_call_impl``, where module hooks would be traced by dynamo: ours are
        called around it instead, in eager Python. For the model that is its
        root hooks (steps and phases are seen); a part (``block.compile()``) is
        put on the module stack, so what it saves is charged to it, its bucket
        known (a compiled block is the block bucket). ``remove()`` puts the
        compiled functions back.
        """
        calls, model = weakref.ref(self), self.owner.model
        modules = [model] if getattr(model, "_compiled_call_impl", None) is not None else []
        for module in modules + compiled_parts(model):

            def before(args: tuple, kwargs: dict, module: nn.Module = module) -> bool | None:
                me = calls()
                if me is None or me.owner.model is None or torch.compiler.is_compiling():
                    return None  # (dynamo tracing a caller of this compiled call: no graph break from us)
                if module is me.owner.model:
                    me._root_pre(module, args, kwargs)
                elif me.owner.step is not None and not me.skip_inside:
                    me._pre(module, args)
                else:
                    return None  # as for any part: only a step's calls matter
                return True

            def after(args: tuple, output: Any, token: Any, module: nn.Module = module) -> None:
                me = calls()
                if me is not None and not torch.compiler.is_compiling():
                    me._post(module, args, output)

            self._compiled_calls.append((weakref.ref(module), wrap_compiled_call(module, before, after)))

    # ------------------------------------------------- a repeat runs quietly
    def skip_repeat(self) -> None:
        """A forward taken as a repeat begins: no call inside the model is followed until it returns.

        Our global hooks leave torch's dicts until it returns (``global_pair.py``),
        unless the root call came another way (a compiled wrapper's, or under the
        runner's watcher, whose global hooks stay on anyway).
        """
        self.skip_inside = True
        model = self._model_ref()
        if self._root_called and model is not None:
            self._pair.go_quiet(model)

    def _quiet_pre(self, module: nn.Module, args: Any) -> None:
        """The root called again inside its own repeat (with the global pair back: nothing to do)."""
        if self._pair.standing_in:
            self._any_pre(module, args)

    def _quiet_post(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._pair.standing_in:
            return
        if self.stack == [id(module)]:  # the repeat's own end, not a nested call's
            self._pair.go_loud(now=sys.exc_info()[1] is None)
        self._any_post(module, args, output)

    def step_begins(self) -> None:
        """A step begins before the trunk."""
        self.trunk_state = "before"

    def in_another_model(self) -> bool:
        """A model other than ours is running at the top now (known only under the runner, from its watcher).

        Its saves are not our model's, even when no tracker of its own takes
        them (its steps are measured already): a GAN's discriminator training
        while the generator's sampling output is kept.
        """
        host = self._host
        if host is None:
            return False
        running = host.model_running()
        return running is not None and id(running) not in self._hooked

    def where(self) -> tuple[str, str | None, bool]:
        """(module path, where execution is relative to the trunk, inside a module compiled whole) now.

        The bucket is named from these when the step is folded (``bucket_of``),
        once the first forward has shown the order the modules run in. A save
        inside a model compiled whole has no place (None: bucket "other").
        """
        stack = self.stack
        if stack and stack[-1] in self._compiled_mixed:
            return self._paths.get(stack[-1], OUTSIDE), None, True  # which block saved it is not seen
        return (self._paths.get(stack[-1], OUTSIDE) if stack else OUTSIDE), self.trunk_state, False

    # ---------------------------------------------------------------- hooks
    def _any_pre(self, module: nn.Module, args: Any) -> None:
        """Every module call in the process: this model's are passed on (one set lookup for the others).

        Inside the model only a step's calls matter (which module saves what):
        a forward that is not a training step (evaluation, a teacher) costs one
        call at its root, and so does a forward taken as a repeat.
        """
        if torch.compiler.is_compiling() or (self.skip_inside and module is not self._model_ref()):
            return  # (dynamo tracing a caller: touch nothing; a repeat's calls inside the model)
        if self._pair.stale:  # the root's stand-ins after a repeat that raised: no loop of torch's over them now
            self._pair.leave_root()
        if id(module) not in self._hooked:
            if self._wraps_the_model(module):  # torch.compile(model): its call is the model's, compiled whole
                self._measure_as_compiled_whole()
                kwargs = running_call_kwargs(module)
                self._pre(self._model_ref(), args, kwargs)
                self._note_inputs(args, kwargs)
            return
        model = self._model_ref()
        if module is model:
            if self._pair.quiet and not self.stack:  # (the stand-ins, left by a repeat no hook saw end)
                self._pair.go_loud(now=True)
            kwargs = running_call_kwargs(module)
            self._root_called = True
            self._pre(module, args, kwargs)
            self._root_called = False
            self._note_inputs(args, kwargs)
        elif self.owner.step is not None and model is not None and not self.skip_inside:
            self._pre(module, args)  # (ids of a dropped model's modules are reused: model is checked)

    def _any_post(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling() or (self.skip_inside and module is not self._model_ref()):
            return
        if id(module) not in self._hooked:
            if self._wraps_the_model(module):
                self._post(self._model_ref(), args, output)
            return
        if (self.owner.step is not None and not self.skip_inside) or module is self._model_ref():
            self._post(module, args, output)

    def _wraps_the_model(self, module: nn.Module) -> bool:
        """``module`` is a ``torch.compile`` wrapper of the model that ``profile(model)`` was given.

        The script trains through ``torch.compile(model)`` (made before or inside
        the block): the model's own hooks then run only inside the compiled
        code, where ours do nothing, but the wrapper's run in eager Python.
        What the compiled graphs save is measured as for a model compiled
        whole. (Under the runner the wrapper is found as a model of its own.)
        """
        if type(module).__name__ != "OptimizedModule" or self._host is not None:
            return False
        model = self.owner.model
        return model is not None and getattr(module, "_orig_mod", None) is model

    def _measure_as_compiled_whole(self) -> None:
        """The model runs compiled whole: no module hook inside says which block saves what; said in a note."""
        if self.bucket_of("", "before") != self.bucket_of("", "after"):
            self._compiled_mixed.add(id(self.owner.model))
        if COMPILED_NOTE not in self._notes:
            self._notes.append(COMPILED_NOTE)

    @guarded
    def _pre(self, module: nn.Module, args: Any, kwargs: dict | None = None) -> None:
        """A call of one of the model's modules begins (callers return at once while dynamo traces).

        ``kwargs``: a root call's keyword arguments (None: not known).
        """
        if PROCESS.forks != self._forks or threading.get_ident() != self._thread:
            return
        if module is self._model_ref() and not self.stack:
            self.owner.root_forward_begins(args, kwargs)
        self.stack.append(id(module))
        if self._run_order is not None and self.owner.forwarding:
            self._run_order.setdefault(self._paths.get(id(module), OUTSIDE), len(self._run_order))
        if id(module) in self._block_modules:
            self.trunk_state = "in"
            self._block_entered(args)
        if id(module) in self._batch_first:
            self._batch_first_entered(module, args)

    def _batch_first_entered(self, module: nn.Module, args: Any) -> None:
        """A module that says where its input's batch is: the forward's batch size, once a forward."""
        step = self.owner.step
        if step is None or not self.owner.forwarding or step.current_forward.batch_hint is not None:
            return
        tensors = tensors_in(args)
        if tensors and tensors[0].dim() == 3:  # (unbatched or packed inputs say nothing)
            first = bool(module.batch_first)
            where = f"{type(module).__name__} '{self._paths.get(id(module), '')}' is batch_first={first}"
            step.current_forward.batch_hint = (int(tensors[0].shape[0 if first else 1]), first, where)

    def _block_entered(self, args: Any) -> None:
        """A block of the trunk begins: its input's shape, and whether it is checkpointed."""
        step = self.owner.step
        if step is None or not self.owner.forwarding:
            return
        if step.trunk_input_shape is None:
            # (batch, sequence, hidden) where the input is not token ids: a ViT's patches
            tensors = tensors_in(args)
            if tensors:
                step.trunk_input_shape = tuple(int(d) for d in tensors[0].shape)
        if not step.checkpointing:
            # A checkpointed block runs its forward without saving: reentrant
            # checkpointing under no_grad, the other kind under its own
            # saved-tensor hooks (which sit on top of ours).
            # (A frozen block run under no_grad has no input that requires grad.)
            reentrant = not torch.is_grad_enabled() and any(t.requires_grad for t in tensors_in(args))
            step.checkpointing = reentrant or self._foreign_saved_hooks()

    @guarded
    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        """A call of one of the model's modules returned (callers return at once while dynamo traces)."""
        if PROCESS.forks != self._forks or threading.get_ident() != self._thread:
            return
        mid = id(module)
        if mid in self.stack:
            while self.stack and self.stack.pop() != mid:
                pass
        if mid in self._block_modules:
            self.trunk_state = "after"
        if module is self._model_ref() and not self.stack:
            self.owner.root_forward_ends(output)
            if self._run_order:  # the first training forward is over: its order, once
                order, self._run_order = self._run_order, None
                self.owner.run_order_known(order)

    @guarded
    def _root_pre(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if torch.compiler.is_compiling():
            return
        self._pre(module, args, kwargs)
        self._note_inputs(args, kwargs)

    @guarded
    def _note_inputs(self, args: Any, kwargs: Any) -> None:
        """Remember the open forward's batch input shape, once a forward."""
        step = self.owner.step
        if step is None or step.current_forward.input_shape is not None:
            return
        found = batch_input(args, kwargs)
        if found is not None:
            step.current_forward.input_shape, step.current_forward.input_is_tokens = found

    # -------------------------------------------------- a call already running
    def enter_root(self, args: Any, kwargs: Any) -> None:
        """Begin measuring a root forward that is already running.

        The runner creates the tracker from inside the model's first call, when
        that call's pre-hooks have already been gathered; this does what the
        root pre-hook would have done.
        """
        if self.owner.measuring and not self.stack:
            self.owner.root_forward_begins(args, kwargs)
            self.stack.append(id(self.owner.model))
            self._note_inputs(args, kwargs)

    def leave_root(self, args: Any, output: Any) -> None:
        """End the root forward begun by ``enter_root`` when no hook of ours will.

        A model compiled in place is found inside its compiled call, which our
        wrapper (installed then) is not around: the runner ends that call here.
        """
        model = self.owner.model
        if self.owner.measuring and self.stack == [id(model)]:
            self._post(model, args, output)
