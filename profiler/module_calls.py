"""What a global module hook can learn about the call it runs in.

The trackers and the model watcher use global module hooks
(``register_module_forward_pre_hook``), as ``torch.utils.module_tracker``
does: they live outside every module, so a model can be deep-copied,
pickled (``torch.save(model)``) or scripted while it is measured, which a
hook stored on its modules would break. A global pre-hook is given the
call's positional arguments only; the keyword ones are read here.
"""

from __future__ import annotations

import os
import sys
import warnings

from torch import nn

__all__ = ["PROCESS", "hide_global_hook_warning", "restore_warnings", "running_call_kwargs"]


class _Process:
    """How many times this process's lineage forked since we were imported.

    A global hook is called at every module call in the process, so its
    checks must be cheap: comparing this count with the one seen at start
    tells a forked child (a DataLoader worker, where the hooks must do
    nothing) for about a tenth of an ``os.getpid()`` system call.
    """

    forks = 0


PROCESS = _Process()


def _after_fork_in_child() -> None:
    PROCESS.forks += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


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
    """
    frame = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            break
        if frame.f_code in _MODULE_CALL_CODES and frame.f_locals.get("self") is module:
            kwargs = frame.f_locals.get("kwargs")
            return dict(kwargs) if isinstance(kwargs, dict) else {}
        frame = frame.f_back
    return {}


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
