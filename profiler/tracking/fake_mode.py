"""Plan a step without memory: run it on fake tensors, with the reads a script makes of values answered.

Under ``torch._subclasses.FakeTensorMode`` every tensor has a shape, a dtype,
a device and a storage, but no data: a 7B model's step runs in seconds with
no memory behind it, and the tracker counts it by the same rules as a real
one (``saved_tensors.storage_key`` gives a fake storage an identity), so
every category is exact.

Side effects of the script still run (its prints, files it writes), except
``torch.save`` of fake tensors, which is skipped: a half-written checkpoint
must not replace a real one.

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

import warnings
from collections import Counter
from typing import Any

import torch

__all__ = ["FakePlan"]

_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def _holds_fake(obj: Any, fake: type, depth: int = 0) -> bool:
    """``obj`` (a state dict, a checkpoint dict, a module) holds a fake tensor."""
    if isinstance(obj, fake):
        return True
    if isinstance(obj, torch.nn.Module):
        return any(isinstance(t, fake) for t in obj.state_dict().values())
    if depth > 4:
        return False
    if isinstance(obj, dict):
        return any(_holds_fake(v, fake, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_holds_fake(v, fake, depth + 1) for v in obj)
    return False


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
        self.skipped: Counter[str] = Counter()  # side effects left out (torch.save of fake tensors)
        self._saved: dict[str, tuple[Any, bool]] = {}

    # The plans in force, innermost last (``profile()`` notes the one it runs under).
    _active: list[FakePlan] = []

    @classmethod
    def current(cls) -> FakePlan | None:
        """The plan in force now, if any."""
        return cls._active[-1] if cls._active else None

    def __enter__(self) -> FakePlan:
        self._patch_module_apply()
        self._patch_save()
        for name in _READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = (original, name in vars(torch.Tensor))
            setattr(torch.Tensor, name, self._answer(name, original))
        try:
            self.mode.__enter__()
        except BaseException:
            self._restore()
            raise
        FakePlan._active.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self in FakePlan._active:
            FakePlan._active.remove(self)
        try:
            self.mode.__exit__(*exc)
        finally:
            self._restore()

    def _patch_module_apply(self) -> None:
        """``model.to(device or dtype)``, ``.half()``: done on fake parameters as torch does on real ones.

        ``nn.Module._apply`` swaps every fake parameter for a new one
        (``torch.utils.swap_tensors``), which fake mode's own weak references
        refuse. Here a conversion that changes nothing (``model.to(device)``
        on the device it is on) stays a no-op, and one that changes a dtype
        or device puts new parameters (and buffers) in place, one per tensor,
        so a tied weight stays tied.
        """
        original = torch.nn.Module._apply
        self._module_saved = original
        fake = self._fake

        def _apply(module: torch.nn.Module, fn: Any, recurse: bool = True) -> Any:
            with torch.no_grad():
                tensors = [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]
                if tensors and all(fn(t) is t for t in tensors):
                    return module
                if not any(isinstance(t, fake) for t in tensors):
                    return original(module, fn, recurse)
                converted: dict[int, torch.Tensor] = {}
                for m in module.modules() if recurse else [module]:
                    for key, p in m._parameters.items():
                        if p is not None:
                            if id(p) not in converted:
                                new = torch.nn.Parameter(fn(p), requires_grad=p.requires_grad)
                                if p.grad is not None:
                                    new.grad = fn(p.grad)
                                converted[id(p)] = new
                            m._parameters[key] = converted[id(p)]
                    for key, b in m._buffers.items():
                        if b is not None:
                            m._buffers[key] = converted.setdefault(id(b), fn(b))
            return module

        torch.nn.Module._apply = _apply  # type: ignore[method-assign]

    def _patch_save(self) -> None:
        """``torch.save`` of fake tensors is skipped (counted): there is nothing to save, and a
        half-written file must not replace a checkpoint the user has."""
        original = torch.save
        self._save_saved = original
        fake, skipped = self._fake, self.skipped

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            if _holds_fake(obj, fake):
                skipped["torch.save"] += 1
                return None
            return original(obj, f, *args, **kwargs)

        torch.save = save  # type: ignore[assignment]

    def _restore(self) -> None:
        saved = getattr(self, "_module_saved", None)
        if saved is not None:
            torch.nn.Module._apply = saved  # type: ignore[method-assign]
            self._module_saved = None
        save = getattr(self, "_save_saved", None)
        if save is not None:
            torch.save = save
            self._save_saved = None
        for name, (original, own) in self._saved.items():
            if own:
                setattr(torch.Tensor, name, original)
            else:
                delattr(torch.Tensor, name)  # it was inherited from torch's C base class
        self._saved = {}

    def _answer(self, name: str, original: Any) -> Any:
        reads, fake, unknown = self.reads, self._fake, self._unknown

        def read(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not isinstance(t, fake):
                return original(t, *args, **kwargs)
            try:
                with warnings.catch_warnings(record=True) as said:  # torch's own, said at the script's line
                    warnings.simplefilter("always")
                    return original(t, *args, **kwargs)  # a value fake mode knows (an optimizer's step count)
            except unknown:
                reads[name.strip("_")] += 1
                return _zero_like(t, name)
            finally:
                for w in said:
                    warnings.warn(w.message, w.category, stacklevel=2)

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
                f"values read from fake tensors were answered with 0 or False ({kinds}): a logged loss prints 0, "
                "a GradScaler finds no inf, `if torch.isnan(loss)` passes, while a check written the other way "
                "(`assert torch.isfinite(loss)`) fails"
            )
        if self.skipped:
            out.append(
                f"skipped on fake tensors: {', '.join(f'{n} x {k}' for k, n in sorted(self.skipped.items()))} "
                "(nothing to save; no file was written)"
            )
        return out
