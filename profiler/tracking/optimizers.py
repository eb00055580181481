"""Which optimizer updates a model, when its ``step()`` runs, and what state it holds.

The tracker is never told the optimizer: it finds it from its parameters,
by the global step hooks or by one pass over live objects, and it must know
a step is running when measuring begins inside one (an LBFGS closure).
Nothing here keeps an optimizer or a frame alive.

The step hooks are torch's global ones (``register_optimizer_step_pre_hook``),
put first in torch's dict, not last: a hook of the script's that removes
itself mid-loop is safe only as the last one, as it was without us.
"""

from __future__ import annotations

import gc
import sys
import weakref
from collections import defaultdict
from typing import Any, Protocol

import torch
from torch.optim import optimizer as optimizer_hooks

from ..errors import guarded
from .module_calls import PROCESS
from .parallel import state_optimizer
from .saved_tensors import memory_of, tensors_in

__all__ = [
    "OptimizerWatch",
    "drop_retired_hooks",
    "find_optimizer",
    "frame_identity",
    "grad_scaler_alive",
    "optimizer_step_on_stack",
    "updates_any",
]


def _step_wrapper_code() -> Any:
    """The code of torch's ``Optimizer.step`` wrapper (the one that runs the step hooks), if found."""
    outer = getattr(torch.optim.Optimizer.profile_hook_step, "__code__", None)
    consts = outer.co_consts if outer is not None else ()
    return next((c for c in consts if getattr(c, "co_name", None) == "wrapper"), None)


_STEP_WRAPPER_CODE = _step_wrapper_code()


def optimizer_step_on_stack(param_ids: set[int]) -> tuple[torch.optim.Optimizer, Any] | None:
    """The optimizer of these parameters whose ``step()`` is running now, and that call's frame.

    Measuring can begin inside a step: the runner finds a model at its first
    call, which for LBFGS is in the closure that ``step()`` evaluates. Its
    pre-hook has run already; this is what it would have told us.
    """
    if _STEP_WRAPPER_CODE is None:
        return None
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _STEP_WRAPPER_CODE:
            opt = frame.f_locals.get("self")
            if isinstance(opt, torch.optim.Optimizer) and updates_any(opt, param_ids):
                return opt, frame
        frame = frame.f_back
    return None


def frame_identity(frame: Any) -> tuple[int, Any] | None:
    """What tells a frame apart while it runs, without keeping it (or its locals) alive."""
    return None if frame is None else (id(frame), frame.f_code)


def find_optimizer(param_ids: set[int]) -> torch.optim.Optimizer | None:
    """A live optimizer that updates any of these parameters, found before it steps.

    One pass over the objects the garbage collector tracks (about 0.1 s in a
    process that has imported transformers), done at most once per tracker.
    Objects are matched by ``type()``, never ``isinstance``, which would read
    ``__class__`` and wake lazy modules that warn or import when touched.
    """
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.optim.Optimizer) and updates_any(obj, param_ids):
            inner = getattr(obj, "optimizer", None)
            if isinstance(inner, torch.optim.Optimizer):
                continue  # a wrapper (accelerate's AcceleratedOptimizer): the hooks fire for the one inside
            return obj
    return None


def grad_scaler_alive() -> bool:
    """Whether an enabled GradScaler exists, the one thing that skips optimizer steps by itself."""
    classes = tuple(
        c for c in (getattr(torch.amp, "GradScaler", None), getattr(torch.cuda.amp, "GradScaler", None)) if c
    )
    return any(issubclass(type(obj), classes) and obj.is_enabled() for obj in gc.get_objects())


def updates_any(opt: torch.optim.Optimizer, param_ids: set[int]) -> bool:
    return any(id(p) in param_ids for g in opt.param_groups for p in g["params"])


def optimizer_state(opt: torch.optim.Optimizer, param_ids: set[int]) -> tuple[int, dict[str, int], list[int]]:
    """Bytes of ``opt``'s state for these parameters: total, per state name, per parameter group.

    Unique storages only; a state value may be a tensor or a list of them
    (LBFGS keeps its history as lists). ZeRO's state is its local ``optim``'s
    (this rank's partition); a DTensor's is its local shard.
    """
    group_of = {id(p): i for i, g in enumerate(opt.param_groups) for p in g["params"]}
    seen: set[int] = set()
    by_name: dict[str, int] = defaultdict(int)
    by_group = [0] * len(opt.param_groups)
    for p, state in state_optimizer(opt).state.items():
        if id(p) not in param_ids:
            continue
        for name, value in state.items():
            for tensor in (value,) if type(value) is torch.Tensor else tensors_in(value):  # (the common case first)
                ident, nbytes = memory_of(tensor)
                if ident in seen:
                    continue
                seen.add(ident)
                by_name[name] += nbytes
                if id(p) in group_of:
                    by_group[group_of[id(p)]] += nbytes
    return sum(by_name.values()), dict(by_name), by_group


def state_fingerprint(opt: torch.optim.Optimizer) -> tuple:
    """Which tensors ``opt``'s state holds, by identity: equal fingerprints, equal ``optimizer_state``.

    Read at every step's start and end; an optimizer updates its state in
    place (Adam's moments), so after its first step the count is rarely
    needed again. Plain values (LBFGS's counters) hold no tensor memory.
    """
    out, tensor = [], torch.Tensor  # (every value of every parameter's state, twice a step: names looked up once)
    add = out.append
    for p, state in state_optimizer(opt).state.items():
        add(id(p))
        for value in state.values():
            if isinstance(value, tensor):
                add(id(value))
            elif isinstance(value, (list, tuple, dict)):
                add(tuple(map(id, value.values() if isinstance(value, dict) else value)))
    return tuple(out)


# Handles of optimizer post-hooks retired while torch was iterating their dict
# (a tracker that finished inside its own post-hook): a key deleted mid-loop
# raises in the script, so the entry's value became a no-op. The keys go where
# no optimizer step can be running, which only the owner knows: when a
# ``with profile(...)`` block ends, and when the runner's script has ended
# (``drop_retired_hooks``). A step nested in a script's own post-hook (one
# optimizer stepping another) rules out any moment inside the script.
_RETIRED_HOOKS: list[Any] = []


def _retired_hook(*args: Any) -> None:
    """What a retired optimizer hook's entry holds until its key can be removed."""
    return None


def drop_retired_hooks() -> None:
    """Remove the retired entries: call only where no optimizer step is running."""
    while _RETIRED_HOOKS:
        _RETIRED_HOOKS.pop().remove()


_OUR_MODULES = frozenset({__name__, guarded.__module__})


def _caller_outside_us() -> Any:
    """The innermost frame on the stack that is not this module's or the guard's (torch's step wrapper)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") in _OUR_MODULES:
        frame = frame.f_back
    return frame


class OptimizerOwner(Protocol):
    """What the optimizer watch tells the tracker that owns it."""

    @property
    def model(self) -> Any: ...

    def fail(self, where: str, exc: Exception) -> None: ...

    def optimizer_step_begins(self, opt: torch.optim.Optimizer, adopted: bool) -> None:
        """A step of an optimizer that updates the model begins (``adopted``: it is now the model's)."""

    def optimizer_step_ended(self, opt: torch.optim.Optimizer) -> None:
        """The model's optimizer's ``step()`` returned."""


class OptimizerWatch:
    """The model's optimizer, held weakly, and torch's global step hooks that watch it.

    A pre-hook that fails must not remove itself while torch iterates the
    pre-hooks (``in_pre_hooks`` tells the owner to stop later); a post-hook
    removed while torch iterates the post-hooks is retired instead (see
    ``drop_retired_hooks``).
    """

    def __init__(
        self, owner: OptimizerOwner, param_ids: set[int], optimizer: torch.optim.Optimizer | None, notes: list[str]
    ) -> None:
        self.owner = owner
        self.fail = owner.fail  # for @guarded
        self._param_ids = param_ids
        self._ref: weakref.ref | None = None
        self.history: list[str] = []  # every optimizer adopted, in order (a replaced one too)
        self.optimizer = optimizer
        self.looked_for = optimizer is not None  # find_optimizer was run, or need not be
        self.in_step = False  # between this model's optimizer's pre- and post-step hooks
        # Which frame runs that step() call: (id, code), never the frame itself,
        # which would keep the caller's locals (a failed attempt's tensors) alive.
        self.frame: tuple[int, Any] | None = None
        self._depth = 0  # how far up the stack ``step_running`` last found that frame
        self.in_pre_hooks = False  # torch is iterating its optimizer pre-hooks (ours is running)
        self.in_post_hooks = False
        self._scaler: bool | None = None  # whether a GradScaler exists, looked up once
        self._counted: tuple[weakref.ref, tuple, tuple] | None = None  # (optimizer, fingerprint, its state's figures)
        self._handles: list[Any] = []
        self._forks = PROCESS.forks
        if optimizer is not None and not updates_any(optimizer, param_ids):
            notes.append(
                f"the optimizer given ({type(optimizer).__name__}) updates none of this model's parameters: "
                "its steps are not this model's, and its state is not counted"
            )
            self.optimizer, self.history = None, []
            self.looked_for = False  # the right one is found as if none had been given

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """This model's optimizer, held weakly: one the script replaces must be freed as without us."""
        return self._ref() if self._ref is not None else None

    @optimizer.setter
    def optimizer(self, opt: torch.optim.Optimizer | None) -> None:
        previous = self.optimizer
        self._ref = weakref.ref(opt) if opt is not None else None
        if opt is not None and opt is not previous:
            self.history.append(type(opt).__name__)

    @property
    def name(self) -> str | None:
        """The class of the last optimizer this model's steps used (kept when it is freed)."""
        return self.history[-1] if self.history else None

    # ------------------------------------------------------------ lifecycle
    def adopt_running_step(self) -> None:
        """Measuring begins inside a ``step()`` of the model's optimizer (an LBFGS closure): one step, its forwards."""
        running = optimizer_step_on_stack(self._param_ids)
        if running is not None and self.optimizer in (None, running[0]):
            self.optimizer, self.frame = running[0], frame_identity(running[1])
            self.in_step = self.looked_for = True

    def install(self) -> None:
        for register, hook, hooks in (
            (optimizer_hooks.register_optimizer_step_pre_hook, self._pre, optimizer_hooks._global_optimizer_pre_hooks),
            (
                optimizer_hooks.register_optimizer_step_post_hook,
                self._post,
                optimizer_hooks._global_optimizer_post_hooks,
            ),
        ):
            handle = register(hook)
            hooks.move_to_end(handle.id, last=False)
            self._handles.append(handle)

    def remove(self) -> None:
        """Remove both hooks; inside torch's loop over the post-hooks ours is retired, not deleted."""
        post_hooks = optimizer_hooks._global_optimizer_post_hooks
        for handle in self._handles:
            if self.in_post_hooks and handle.hooks_dict_ref() is post_hooks and handle.id in post_hooks:
                post_hooks[handle.id] = _retired_hook  # not `del`: torch is iterating this dict
                _RETIRED_HOOKS.append(handle)
            else:
                handle.remove()
        self._handles = []
        self.frame = None

    # ---------------------------------------------------------------- hooks
    def _pre(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.in_pre_hooks = True
        try:
            self._step_begins(opt)
        finally:
            self.in_pre_hooks = False

    @guarded
    def _step_begins(self, opt: torch.optim.Optimizer) -> None:
        if PROCESS.forks != self._forks or self.owner.model is None or not updates_any(opt, self._param_ids):
            return  # (a dropped model's parameter ids may belong to new tensors now)
        adopted = self.optimizer is None
        if adopted:
            self.optimizer = opt
        if opt is self.optimizer:
            self.in_step = True  # until its post-hook: a forward now is a closure's
            self.frame = frame_identity(_caller_outside_us())
        self.owner.optimizer_step_begins(opt, adopted)

    def _post(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.in_post_hooks = True
        try:
            self._step_ended(opt)
        finally:
            self.in_post_hooks = False

    @guarded
    def _step_ended(self, opt: torch.optim.Optimizer) -> None:
        if PROCESS.forks != self._forks or opt is not self.optimizer or self.owner.model is None:
            return
        self.end_step()
        self.owner.optimizer_step_ended(opt)

    # --------------------------------------------------------------- queries
    def end_step(self) -> None:
        """The model's optimizer step is over (returned, or raised)."""
        self.in_step, self.frame = False, None

    def step_running(self) -> bool:
        """Whether the ``step()`` whose pre-hook ran is still on the call stack.

        Its post-hook never runs when it raises; a script that catches the
        error (an out-of-memory retry) goes on to the next forward, which is
        then not a closure's.
        """
        target = self.frame
        if target is None:
            return True  # not known: keep the old view
        depth = self._depth  # (where it was found last: each closure evaluation asks from the same depth)
        if depth:
            try:
                frame = sys._getframe(depth)
            except ValueError:
                frame = None
            if frame is not None and id(frame) == target[0] and frame.f_code is target[1]:
                return True
        frame, depth = sys._getframe(1), 1
        while frame is not None:
            if id(frame) == target[0] and frame.f_code is target[1]:
                self._depth = depth
                return True
            frame, depth = frame.f_back, depth + 1
        return False

    def find_once(self) -> None:
        """Look for a live optimizer of the model, once (a step ended without an optimizer step)."""
        if self.optimizer is None and not self.looked_for:
            self.looked_for = True
            self.optimizer = find_optimizer(self._param_ids)

    def scaler_skips_steps(self) -> bool:
        """Whether a GradScaler exists, the one thing that skips optimizer steps by itself (looked up once)."""
        if self._scaler is None:
            self._scaler = grad_scaler_alive()
        return self._scaler

    def skipped(self, step: Any, parameters: Any) -> bool:
        """The model's optimizer is known and did not step in ``step``, and ``zero_grad()`` ran: the iteration is over.

        Marks the step ``optimizer_skipped`` when a GradScaler exists (it skips
        the step when fp16 gradients overflow); without one, the weights were
        updated some other way, or not at all. Otherwise (gradients still held)
        they are being accumulated, and the step goes on.
        """
        if step.optimizer_steps or self.optimizer is None or parameters.model is None:
            return False
        if not parameters.gradients_cleared():
            return False
        step.optimizer_skipped = self.scaler_skips_steps()
        return True

    def take_state(self, step: Any, opt: torch.optim.Optimizer | None = None) -> None:
        """Record the optimizer's state (of ``opt``, default the model's) in ``step``."""
        step.optimizer_state, step.optimizer_state_by_name, step.optimizer_state_by_group = self.state(opt)

    def state(self, opt: torch.optim.Optimizer | None = None) -> tuple[int, dict[str, int], list[int]]:
        """``optimizer_state`` of ``opt`` (default: the model's optimizer) for the model's parameters."""
        opt = self.optimizer if opt is None else opt
        if opt is None:
            return 0, {}, []
        fingerprint, counted = state_fingerprint(opt), self._counted
        if counted is None or counted[0]() is not opt or counted[1] != fingerprint:
            self._counted = counted = (weakref.ref(opt), fingerprint, optimizer_state(opt, self._param_ids))
        total, by_name, by_group = counted[2]
        return total, dict(by_name), list(by_group)
