"""An independent count of what autograd saved for backward, for the tracking tests.

It walks the graph of a loss after the forward and reads each node's
``_saved_*`` attributes, so it shares no code and no mechanism with the
profiler's saved-tensor hooks.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

# The dtypes autograd wraps a Python number in (c10's wrapped numbers).
_WRAPPED_DTYPES = (torch.float64, torch.int64, torch.complex128, torch.bool)


def _is_python_scalar(v: torch.Tensor) -> bool:
    return v.dim() == 0 and v.device.type == "cpu" and v.dtype in _WRAPPED_DTYPES


def graph_saved(loss: torch.Tensor, model: nn.Module) -> tuple[int, int]:
    """(bytes saved for backward, bytes of wrapped Python scalars) in the graph of ``loss``.

    Independent of hooks: reads each node's ``_saved_*`` attributes (and a
    custom Function's ``saved_tensors``), deduplicates storages, leaves
    parameter storage out.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}
    scalars: dict[int, int] = {}
    seen, stack = set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        values: list = []
        for attr in dir(fn):
            if attr.startswith("_saved_") or attr == "saved_tensors":
                try:
                    value = getattr(fn, attr)
                except RuntimeError:
                    continue
                values.extend(value if isinstance(value, (tuple, list)) else [value])
        # (torch's reentrant checkpoint keeps only RNG states on its ctx, not activations)
        custom = isinstance(fn, torch.autograd.function.BackwardCFunction)
        if custom and getattr(fn, "_forward_cls", None) is not torch.utils.checkpoint.CheckpointFunction:
            # A custom Function's ctx attributes (``ctx.mask = mask``) hold tensors for backward too.
            values.extend(t for v in vars(fn).values() for t in (v if isinstance(v, (tuple, list)) else [v]))
        for v in values:
            if isinstance(v, torch.Tensor) and v.numel() > 0:
                s = v.untyped_storage()
                if s.data_ptr() and s.data_ptr() not in params:
                    (scalars if _is_python_scalar(v) else storages)[s.data_ptr()] = s.nbytes()
        stack.extend(n for n, _ in fn.next_functions)
    return sum(storages.values()), sum(scalars.values())


def graph_saved_bytes(loss: torch.Tensor, model: nn.Module) -> int:
    return graph_saved(loss, model)[0]
