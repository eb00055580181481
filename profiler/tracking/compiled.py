"""How our hooks live beside ``torch.compile``.

Dynamo traces whatever runs inside a compiled region, module hooks included:
a hook of ours there would be compiled (or break the script's graph). So the
hooks stop at a compile wrapper (``torch.compile(module)``), and a module
compiled in place (``module.compile()``), which runs no Python hook at all
when called, gets a wrapper around its compiled call that calls ours in
eager Python. The wrapper lives on the module; callers keep a weak reference
to it, since the compiled call refers to the module, which a weakly held
model must not be kept alive by.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["compiled_parts", "is_compiled", "hookable_modules", "wrap_compiled_call", "unwrap_compiled_call"]


def is_compiled(module: nn.Module) -> bool:
    """A ``torch.compile`` wrapper, or a module compiled in place with ``.compile()``."""
    return hasattr(module, "_orig_mod") or getattr(module, "_compiled_call_impl", None) is not None


def hookable_modules(model: nn.Module) -> list[nn.Module]:
    """Modules whose hooks run in eager Python.

    The walk stops at a compile wrapper: the wrapper itself is hooked, what it
    compiles is not, and a module compiled in place is not hooked at all.
    """
    out, stack, seen = [], [model], set()
    while stack:
        mod = stack.pop()
        if id(mod) in seen or getattr(mod, "_compiled_call_impl", None) is not None:
            continue
        seen.add(id(mod))
        out.append(mod)
        if hasattr(mod, "_orig_mod"):
            continue
        stack.extend(reversed(list(mod.children())))
    return out


def compiled_parts(model: nn.Module) -> list[nn.Module]:
    """The parts compiled in place (``block.compile()``) that the hookable walk stops at."""
    out, seen = [], set()
    for mod in hookable_modules(model):
        if hasattr(mod, "_orig_mod"):
            continue
        for child in mod.children():
            if getattr(child, "_compiled_call_impl", None) is not None and id(child) not in seen:
                seen.add(id(child))
                out.append(child)
    return out


def wrap_compiled_call(
    module: nn.Module,
    before: Callable[[tuple, dict], Any],
    after: Callable[[tuple, Any, Any], None],
) -> weakref.ref | None:
    """Call ``before(args, kwargs)`` and ``after(args, output, token)`` around a module's compiled call.

    ``before`` returns a token for ``after``, or None to let this call run
    without ``after``. ``after`` runs when the call raises too (output None).
    Returns a weak reference to the wrapper for ``unwrap_compiled_call``, or
    None when the module is not compiled in place.
    """
    compiled = getattr(module, "_compiled_call_impl", None)
    if compiled is None:
        return None

    def call_compiled_with_hooks(*args: Any, **kwargs: Any) -> Any:
        token = before(args, kwargs)
        if token is None:
            return compiled(*args, **kwargs)
        output = None
        try:
            output = compiled(*args, **kwargs)
            return output
        finally:
            after(args, output, token)

    call_compiled_with_hooks.__wrapped__ = compiled
    module._compiled_call_impl = call_compiled_with_hooks
    return weakref.ref(call_compiled_with_hooks)


def unwrap_compiled_call(module: nn.Module | None, wrapper: weakref.ref | None) -> None:
    """Put the module's compiled call back, if our wrapper is still the one installed."""
    fn = wrapper() if wrapper is not None else None
    if module is not None and fn is not None and getattr(module, "_compiled_call_impl", None) is fn:
        module._compiled_call_impl = fn.__wrapped__
