"""While a forward taken as a repeat runs, no global module hook of ours is installed.

Global module hooks send every module call down ``_call_impl``'s slow path, so
a repeat runs with our global pair taken off and a pair on the root module
only. These tests look at torch's hook dictionaries from inside the model's
forward, and check that the pair comes back however the forward ends (an
exception, a nested call of the root), with the figures of a full measurement.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.nn.modules import module as module_hooks

from profiler import profile

FIGURES = ("forwards", "backwards", "saved_tensors", "categories", "activations_by_bucket", "forwards_left_out")


def _global_hooks() -> tuple[int, int]:
    return len(module_hooks._global_forward_pre_hooks), len(module_hooks._global_forward_hooks)


class Probe(nn.Module):
    """A layer that writes down, at each call, how many global module hooks are installed."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.seen: list[tuple[int, int]] = []
        self.fail_next = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(_global_hooks())
        if self.fail_next:
            self.fail_next = False
            raise ValueError("the script's own error")
        return torch.tanh(self.lin(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.probe = Probe()
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, again: bool = False) -> torch.Tensor:
        h = self.probe(x)
        if again:  # the root called inside its own forward
            h = h + self(x)
        return self.head(h)


def _no_hooks_of_ours_on(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _steps(prof: profile) -> list[dict]:
    return prof.to_dict()["models"][0]["memory"]["steps"]


def _train(model: nn.Module, reuse: bool, steps: int = 4, **call) -> profile:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    torch.manual_seed(1)
    with profile(model, opt, sample_interval=None, reuse_repeats=reuse) as prof:
        for _ in range(steps):
            model(torch.randn(16, 8), **call).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    return prof


@pytest.mark.parametrize("again", [False, True])
def test_a_repeat_runs_with_no_global_hook_and_gives_the_full_figures(again: bool) -> None:
    before = _global_hooks()
    torch.manual_seed(0)
    full = _train(Net(), reuse=False, again=again)
    torch.manual_seed(0)
    model = Net()
    fast = _train(model, reuse=True, again=again)

    a, b = _steps(full), _steps(fast)
    assert [s["forwards_repeated"] for s in b] == [0, 1, 1, 1]
    assert [{k: s[k] for k in FIGURES} for s in a] == [{k: s[k] for k in FIGURES} for s in b]
    seen = model.probe.seen
    per_step = 2 if again else 1
    measured, repeated = seen[:per_step], seen[per_step:]
    assert all(n == (before[0] + 1, before[1] + 1) for n in measured)  # our pair, in the forward measured
    assert repeated and all(n == before for n in repeated)  # none of ours in a repeat
    assert _global_hooks() == before and _no_hooks_of_ours_on(model)


def _train_through_an_error(model: nn.Module, reuse: bool) -> profile:
    before = _global_hooks()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    torch.manual_seed(1)
    with profile(model, opt, sample_interval=None, reuse_repeats=reuse) as prof:
        for i in range(5):
            model.probe.fail_next = i == 2
            try:
                loss = model(torch.randn(16, 8)).pow(2).mean()
            except ValueError as exc:
                assert str(exc) == "the script's own error"  # the script's error, as raised
                assert _global_hooks() == (before[0] + 1, before[1] + 1)  # our pair is back at once
                continue
            loss.backward()
            opt.step()
            opt.zero_grad()
            assert _no_hooks_of_ours_on(model)  # (a stale pair on the root goes at the next root call)
            copy.deepcopy(model)
            pickle.dumps(model)
    assert _global_hooks() == before and _no_hooks_of_ours_on(model)
    return prof


def test_an_exception_in_a_repeat_puts_the_hooks_back_and_leaves_the_model_clean() -> None:
    torch.manual_seed(0)
    full = _steps(_train_through_an_error(Net(), reuse=False))
    torch.manual_seed(0)
    fast = _steps(_train_through_an_error(Net(), reuse=True))
    assert [{k: s[k] for k in FIGURES} for s in full] == [{k: s[k] for k in FIGURES} for s in fast]
    assert len(fast) == 4 and sum(s["forwards_repeated"] for s in fast) >= 2
    assert [s["repeats_raised"] for s in fast] == [0, 0, 1, 0]


def test_an_exception_left_on_the_root_is_removed_when_the_block_ends() -> None:
    before = _global_hooks()
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with profile(model, opt, sample_interval=None):
        for i in range(3):
            model.probe.fail_next = i == 2
            try:
                model(torch.randn(16, 8)).pow(2).mean().backward()
            except ValueError:
                break
            opt.step()
            opt.zero_grad()
    assert _global_hooks() == before and _no_hooks_of_ours_on(model)
    pickle.dumps(model)


def test_a_copy_made_right_after_a_repeat_raised_carries_nothing_of_ours() -> None:
    before = _global_hooks()
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with profile(model, opt, sample_interval=None) as prof:
        for i in range(4):
            model.probe.fail_next = i == 2
            try:
                loss = model(torch.randn(16, 8)).pow(2).mean()
            except ValueError:
                # No module call since: the root still carries the stand-ins for our hooks.
                twin = copy.deepcopy(model)
                clone = pickle.loads(pickle.dumps(model))
                seen = len(model.probe.seen)
                for other in (twin, clone):
                    other.probe.fail_next = False
                    other(torch.randn(16, 8)).sum().backward()  # their hooks do nothing
                continue
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert _global_hooks() == before and _no_hooks_of_ours_on(model)
    assert len(model.probe.seen) == seen + 1  # (the copies' calls were not the model's)
    steps = _steps(prof)
    assert [s["forwards"] for s in steps] == [1, 1, 2]  # (the copies' forwards are no step of the model's)
