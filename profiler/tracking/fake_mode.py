"""Plan a step without memory: run it on fake tensors, with the reads a script makes of values answered.

Under ``torch._subclasses.FakeTensorMode`` every tensor has a shape, a dtype,
a device and a storage, but no data: a 7B model's step runs in seconds with
no memory behind it, and the tracker counts it by the same rules as a real
one (``saved_tensors.storage_key`` gives a fake storage an identity), so
every category is exact.

What fake tensors cannot do is give a value they were not made from
(a scalar made by ``torch.tensor(0.0)``, an optimizer's step count, keeps
its value). Scripts read a few: a logged loss (``loss.item()``), a
GradScaler's inf check, ``if torch.isnan(loss)``. Those reads would end the
plan (``DataDependentOutputException``); here they are answered with zeros
(a finite loss, no inf found, no NaN), so the step runs its ordinary path,
and each kind is counted and said in the report.
A script whose control flow depends on the values beyond that (data-dependent
shapes, ``nonzero()``) cannot be planned: the error names the operation.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

__all__ = ["FakePlan"]

_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def _zero_like(t: torch.Tensor, how: str) -> Any:
    if how == "tolist":
        if t.dim() == 0:
            return _zero_like(t, "item")
        return [_zero_like(t[0], "tolist")] * t.shape[0] if t.shape[0] else []
    if how == "__bool__":
        return False
    if t.is_floating_point() or t.is_complex():
        return 0.0 if how in ("item", "__float__") else 0
    return False if t.dtype == torch.bool and how == "item" else 0


class FakePlan:
    """``FakeTensorMode`` for a whole script or block, with value reads of fake tensors answered by zeros.

    Tensors the script makes from data it loads (real tensors) may mix with
    fake ones (``allow_non_fake_inputs``). ``reads`` counts the answered reads by kind.
    """

    def __init__(self) -> None:
        from torch._subclasses import fake_tensor  # (imported when a plan is asked for)

        self.mode = fake_tensor.FakeTensorMode(allow_non_fake_inputs=True)
        self._fake = fake_tensor.FakeTensor
        # What fake mode raises for a value it does not have
        self._unknown = (fake_tensor.DataDependentOutputException, fake_tensor.DynamicOutputShapeException)
        self.reads: Counter[str] = Counter()
        self._saved: dict[str, tuple[Any, bool]] = {}

    def __enter__(self) -> FakePlan:
        self._patch_module_apply()
        for name in _READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = (original, name in vars(torch.Tensor))
            setattr(torch.Tensor, name, self._answer(name, original))
        try:
            self.mode.__enter__()
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.mode.__exit__(*exc)
        finally:
            self._restore()

    def _patch_module_apply(self) -> None:
        """``model.to(device)`` that changes nothing is left a no-op, as it is for real tensors.

        ``nn.Module._apply`` swaps every fake parameter for a new one
        (``torch.utils.swap_tensors``), even when ``fn`` returns it unchanged
        (``.to("cpu")`` of a model on the CPU, the common ``model.to(device)``),
        and fake mode's own weak references make the swap fail. A real change
        (another dtype) still goes to torch, which cannot make it on fake
        tensors: build the model in its dtype instead (``torch_dtype=``).
        """
        original = torch.nn.Module._apply
        self._module_saved = original

        def _apply(module: torch.nn.Module, fn: Any, recurse: bool = True) -> Any:
            with torch.no_grad():
                tensors = [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]
                if tensors and all(fn(t) is t for t in tensors):
                    return module
            return original(module, fn, recurse)

        torch.nn.Module._apply = _apply  # type: ignore[method-assign]

    def _restore(self) -> None:
        saved = getattr(self, "_module_saved", None)
        if saved is not None:
            torch.nn.Module._apply = saved  # type: ignore[method-assign]
            self._module_saved = None
        for name, (original, own) in self._saved.items():
            if own:
                setattr(torch.Tensor, name, original)
            else:
                delattr(torch.Tensor, name)  # it was inherited from torch's C base class
        self._saved = {}

    def _answer(self, name: str, original: Any) -> Any:
        reads, fake = self.reads, self._fake

        unknown = self._unknown

        def read(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not isinstance(t, fake):
                return original(t, *args, **kwargs)
            try:
                return original(t, *args, **kwargs)  # a value fake mode knows (an optimizer's step count)
            except unknown:
                reads[name.strip("_")] += 1
                return _zero_like(t, name)

        read.__name__ = name
        return read

    def notes(self) -> list[str]:
        """What the report says about the plan."""
        out = [
            "planned on fake tensors (FakeTensorMode): no memory was allocated; every category is counted as in "
            "a real step, while host RSS and timings are not the model's"
        ]
        if self.reads:
            kinds = ", ".join(
                f"{n} x .{k}()" if not k.startswith(("bool", "float", "int", "index")) else f"{n} x {k}()"
                for k, n in sorted(self.reads.items())
            )
            out.append(
                f"values read from fake tensors were answered with 0 ({kinds}): a logged loss prints 0, a "
                "GradScaler finds no inf, a NaN check passes"
            )
        return out
