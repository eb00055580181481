"""benchmarks/hook_floor.py: the benchmark's floor installs the hooks profile() uses, changes nothing, leaves none.

Checked against torch's own hook dicts and against a plain run of the same
steps (same losses and weights, bit for bit), and against ``profile()``
itself: the floor's hooks are called at the points where ``profile()``'s are
(one saved-tensor pack per save of the first forward, a gradient hook per
trainable parameter per backward).
"""

from __future__ import annotations

import copy

import pytest
import torch
from support import assert_no_hooks, hook_state, load_benchmark, mse_steps, small_mlp
from torch.nn.modules import module as module_hooks


@pytest.fixture(scope="module")
def hook_floor():
    return load_benchmark("hook_floor")


def test_floor_changes_nothing_and_leaves_no_hook(hook_floor) -> None:
    plain, floored = small_mlp(), small_mlp()
    floored.load_state_dict(plain.state_dict())
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    floor_opt = torch.optim.AdamW(floored.parameters(), lr=1e-2)
    globals_before = (len(module_hooks._global_forward_pre_hooks), len(module_hooks._global_forward_hooks))
    before = hook_state(floored)
    with hook_floor.HookFloor(floored, floor_opt):
        assert len(module_hooks._global_forward_pre_hooks) == globals_before[0] + 1
        floor_losses = mse_steps(floored, floor_opt, 3)
        # after the first forward the global pair is gone, as profile()'s is while repeats run
        assert len(module_hooks._global_forward_pre_hooks) == globals_before[0]
    assert floor_losses == mse_steps(plain, plain_opt, 3)
    for a, b in zip(plain.parameters(), floored.parameters()):
        assert torch.equal(a, b)
    assert_no_hooks(floored, before)
    assert not floor_opt._optimizer_step_pre_hooks and not floor_opt._optimizer_step_post_hooks


def test_floor_packs_what_profile_counts(hook_floor, monkeypatch) -> None:
    """The floor's pack hook runs once per tensor the first forward saves: profile()'s count of that step."""
    import profiler

    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    packs, grads = [], []
    monkeypatch.setattr(hook_floor, "_detached", lambda t: packs.append(1) or t.detach())
    floor = hook_floor.HookFloor(model, opt)
    with floor:
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda p: grads.append(1))
        mse_steps(model, opt, 1)
    twin = copy.deepcopy(model)
    with profiler.profile(twin, sample_interval=None) as prof:
        mse_steps(twin, torch.optim.SGD(twin.parameters(), lr=0.1), 1)
    step = prof.to_dict()["models"][0]["memory"]["steps"][0]
    assert len(packs) == step["saved_tensors"]
    assert len(grads) == len(list(model.parameters()))
