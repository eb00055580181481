"""Which optimizer updates a model, and whether its ``step()`` is running.

The tracker is never told the optimizer: it finds it from its parameters,
by the global step hooks or by one pass over live objects, and it must know
a step is running when measuring begins inside one (an LBFGS closure).
Nothing here keeps an optimizer or a frame alive.
"""

from __future__ import annotations

import gc
import sys
from typing import Any

import torch

__all__ = ["find_optimizer", "frame_identity", "grad_scaler_alive", "optimizer_step_on_stack", "updates_any"]


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
    classes = tuple(c for c in (getattr(torch.amp, "GradScaler", None), getattr(torch.cuda.amp, "GradScaler", None)) if c)
    return any(issubclass(type(obj), classes) and obj.is_enabled() for obj in gc.get_objects())


def updates_any(opt: torch.optim.Optimizer, param_ids: set[int]) -> bool:
    return any(id(p) in param_ids for g in opt.param_groups for p in g["params"])
