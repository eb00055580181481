"""profile() with one kind of its per-step reads left out: what each kind of read costs.

Counterfactuals for the benchmarks (``instructions.py --counterfactuals``,
``overhead.py --modes plain ours ours_no_reads``), never for a report: a run
with a read left out gives figures that are wrong wherever that kind changes,
and nothing reads them. Each says how much of ``profile()``'s work one kind of
read costs, with what is done with it: the most that taking it as unchanged
between steps, instead of reading it, could save.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

# mode -> what it leaves out of profile()
MODES = {
    "ours_no_gradient_reads": "each gradient's storage as it arrives, and the walks over the parameters' gradients "
    "(at each backward's end, at the optimizer's step, when a forward follows a backward)",
    "ours_no_state_reads": "the identities of the optimizer state's tensors, before and after each step",
    "ours_no_mode_reads": "each forward's training flags, autocast state and parameters' shapes, dtypes and "
    "requires_grad (its mode signature)",
    "ours_no_reads": "all three of the above",
}


def _arrived(self: Any, param: Any) -> None:
    self.accumulated = True  # (what the step's state machine needs of a gradient's arrival)


def _replacements(mode: str, model: nn.Module) -> list[tuple[Any, str, Any]]:
    """(owner, name, stand-in) for each function ``mode`` replaces.

    (profiler is imported here, not with this module: a plain run of
    instructions.py, which imports this one, keeps the memory layout it had
    without it.)
    """
    from profiler.tracking import ledger, optimizers, repeats  # noqa: PLC0415

    out: list[tuple[Any, str, Any]] = []
    if mode in ("ours_no_gradient_reads", "ours_no_reads"):
        out += [
            (ledger.Ledger, "_gradient_accumulated", _arrived),
            (ledger.Ledger, "release_cleared_gradients", lambda self, step: None),
            (ledger.Ledger, "count_gradients", lambda self, step: None),
        ]
    if mode in ("ours_no_state_reads", "ours_no_reads"):
        out.append((optimizers, "state_fingerprint", lambda opt: ()))
    if mode in ("ours_no_mode_reads", "ours_no_reads"):
        signature = repeats.mode_signature(list(model.modules()), list(model.parameters()))  # (read once, before)
        out.append((repeats, "mode_signature", lambda modules, parameters: signature))
    return out


@contextlib.contextmanager
def left_out(mode: str, model: nn.Module) -> Iterator[None]:
    """Inside: ``mode``'s reads are left out of profile() objects made here (each is put back on leaving)."""
    if mode not in MODES:
        raise ValueError(f"unknown counterfactual {mode!r}")
    replacements = _replacements(mode, model)
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in replacements]
    try:
        for owner, name, stand_in in replacements:
            setattr(owner, name, stand_in)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
