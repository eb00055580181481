"""Where a step begins and ends, and what its timeline holds, when the script does something unusual.

An optimizer step that raises and is caught, gradients cleared in mid-step,
saved tensors the script's own hooks move elsewhere, an optimizer that shows
up only after the micro-batches: each must leave the same figures a plain
loop would, or say what it could not measure.
"""

from __future__ import annotations

import torch
from autograd_walk import graph_saved_bytes
from support import assert_no_hooks, batch, memory, profile_lbfgs, tiny_gpt, unique_param_bytes
from torch import nn

from profiler import profile
from profiler.results.memory_section import categories_live_peak
from profiler.results.steps import described_steps
from profiler.tracking import OUTSIDE, StepTracker


def gradients_at_end_of_timeline(step: dict) -> int:
    """What the timeline says is alive in gradients once the step is over."""
    deltas = [d for c, d in zip(step["timeline"]["category"], step["timeline"]["delta"]) if c == "gradients"]
    return step["baseline"]["gradients"] + sum(deltas)


def test_a_caught_optimizer_error_ends_that_iteration():
    # An out-of-memory retry: step() raises once, the script catches it, clears
    # the gradients and goes on. The next iteration is its own step, not a
    # closure evaluation of the failed one.
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    calls = []

    def fail_once(optimizer, args, kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")

    opt.register_step_pre_hook(fail_once)
    with profile(model, steps=2, sample_interval=None) as prof:
        for _ in range(4):
            x, y = batch()
            _, loss = model(x, y)
            loss.backward()
            try:
                opt.step()
            except RuntimeError:
                pass
            opt.zero_grad(set_to_none=True)
    steps = memory(prof)["steps"]
    assert [s["optimizer_failed"] for s in steps] == [True, False, False]
    assert [s["forwards"] for s in steps] == [1, 1, 1]
    assert [s["optimizer_steps"] for s in steps] == [0, 1, 1]
    notes = memory(prof)["notes"]
    assert any("optimizer.step() raised in step(s) 1" in n for n in notes)
    # The tables, estimates and fit describe the steps that updated the weights.
    assert [s["index"] for s in described_steps(steps)] == [2, 3]
    assert "(step 3;" in prof.report.render()
    assert_no_hooks(model)


def test_a_retried_optimizer_step_stays_in_its_iteration():
    # step() raises, the script retries step() at once: one iteration, one step.
    model = tiny_gpt()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    failed = []

    def fail_first(optimizer, args, kwargs):
        if not failed:
            failed.append(1)
            raise RuntimeError("simulated")

    opt.register_step_pre_hook(fail_first)
    with profile(model, sample_interval=None) as prof:
        for _ in range(2):
            x, y = batch()
            model(x, y)[1].backward()
            try:
                opt.step()
            except RuntimeError:
                opt.step()
            opt.zero_grad()
    steps = memory(prof)["steps"]
    assert [(s["forwards"], s["optimizer_steps"], s["optimizer_failed"]) for s in steps] == [(1, 1, False)] * 2


def test_an_optimizer_error_that_ends_the_script_marks_the_step():
    model = tiny_gpt()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.register_step_pre_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("simulated")))
    prof = profile(model, sample_interval=None)
    try:
        with prof:
            model(*batch())[1].backward()
            opt.step()
    except RuntimeError:
        pass
    assert [s["optimizer_failed"] for s in memory(prof)["steps"]] == [True]
    assert_no_hooks(model)


def test_zero_grad_between_forward_and_backward_releases_the_old_gradients():
    # loss = model(x); opt.zero_grad(); loss.backward(): the previous step's
    # gradients are alive during the forward and freed before backward makes
    # new ones. The timeline must not hold both sets.
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    with profile(model, sample_interval=None) as prof:
        for _ in range(3):
            _, loss = model(*batch())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    grads = unique_param_bytes(model)
    for step in memory(prof)["steps"]:
        assert step["categories"]["gradients"] == grads
        assert gradients_at_end_of_timeline(step) == grads
    last = memory(prof)["steps"][-1]
    assert last["baseline"]["gradients"] == grads  # alive when the step began: zero_grad came later
    assert (
        last["categories_live_peak"]
        < last["categories"]["parameters"]
        + 2 * grads
        + last["categories"]["optimizer_state"]
        + last["categories"]["activations"]
    )


def test_lbfgs_closures_that_clear_gradients_hold_one_set():
    model, prof = profile_lbfgs()
    grads = unique_param_bytes(model)
    for step in memory(prof)["steps"]:
        assert step["forwards"] > 1
        assert gradients_at_end_of_timeline(step) == grads


def test_saved_tensors_moved_off_the_device_by_the_script_are_not_activations():
    # The script's pack hook moves every saved tensor elsewhere (save_on_cpu
    # does this from a GPU; here the "elsewhere" is the meta device): nothing
    # stays in this device's memory for backward.
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 16)
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: (t.to("meta"), t.device), lambda s: torch.zeros(s[0].shape, device=s[1])
    ):
        with profile(model, sample_interval=None) as prof:
            model(x).sum().backward()
            opt.step()
    step = memory(prof)["steps"][0]
    assert step["categories"]["activations"] == 0
    # Linear 0 saves its input (8x16), ReLU its output (8x64), Linear 2 its input (the same 8x64):
    # each save is its own copy elsewhere, as save_on_cpu makes one per save.
    assert step["activations_offloaded"] == 8 * 16 * 4 + 2 * 8 * 64 * 4
    assert any("activations_offloaded" in n for n in memory(prof)["notes"])


def test_save_on_cpu_on_the_cpu_changes_nothing():
    # On the CPU, save_on_cpu keeps each saved tensor itself (``tensor.cpu()``
    # is the same tensor): the figures are those of a run without it.
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 16)
    with torch.autograd.graph.save_on_cpu():
        with profile(model, sample_interval=None) as prof:
            model(x).sum().backward()
            opt.step()
    step = memory(prof)["steps"][0]
    # The input, and the ReLU output (saved again by Linear 2, counted once).
    assert step["categories"]["activations"] == 8 * 16 * 4 + 8 * 64 * 4
    assert step["activations_offloaded"] == 0
    assert step["saved_tensors"] == 4  # and Linear 2's weight, which is not an activation


def test_a_copy_the_scripts_pack_hook_keeps_on_the_device_is_what_is_counted():
    # A compressor keeping a bf16 copy on the device: backward holds the copies,
    # half the bytes of what was saved.
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 16)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (t.to(torch.bfloat16), t.dtype), lambda s: s[0].to(s[1])):
        with profile(model, sample_interval=None) as prof:
            model(x).sum().backward()
            opt.step()
    step = memory(prof)["steps"][0]
    # bf16 copies of the input, of the ReLU output twice (for ReLU and for
    # Linear 2), and of Linear 2's weight: a copy, not the parameter, so held for backward.
    assert step["categories"]["activations"] == (8 * 16 + 2 * 8 * 64 + 64 * 4) * 2
    assert step["activations_offloaded"] == 0


def test_an_optimizer_found_after_the_micro_batches_closes_every_backward():
    # No optimizer exists while the micro-batches run (it is created just
    # before its first step): they are merged into one step at that step, and
    # the last backward, still open then, is closed with its time.
    model = tiny_gpt()
    with profile(model, sample_interval=None) as prof:
        for _ in range(3):
            model(*batch())[1].backward()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        opt.step()
    step = memory(prof)["steps"][0]
    assert (step["forwards"], step["backwards"], step["optimizer_steps"]) == (3, 3, 1)
    spans = step["phase_spans"]["backward"]
    assert len(spans) == 3 and all(end > start for start, end in spans)
    assert abs(step["phases"]["backward"]["seconds"] - sum(end - start for start, end in spans)) < 1e-3


def test_an_error_in_an_optimizer_hook_finishes_the_tracker(monkeypatch):
    # Our own bug inside an optimizer hook: measuring stops at the next
    # forward, and the owner (the runner) is told, so it can let the model go.
    model = tiny_gpt()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    finished = []
    tracker = StepTracker(model, opt, sample_interval=None, on_finished=finished.append)

    phase_begin = tracker.phases.begin

    def broken(step, name):
        if name == "optimizer":
            raise RuntimeError("simulated bug")
        phase_begin(step, name)

    monkeypatch.setattr(tracker.phases, "begin", broken)
    tracker.start()
    try:
        for _ in range(2):
            model(*batch())[1].backward()
            opt.step()
            opt.zero_grad()
    finally:
        tracker.stop()
    assert finished == [tracker]
    assert any("simulated bug" in n for n in tracker.notes)
    assert_no_hooks(model)


def test_live_peak_with_gradients_cleared_mid_step_is_what_was_alive():
    # The replayed timeline of a step whose old gradients are freed before
    # backward: never more than parameters, state, one set of gradients and
    # the activations at once.
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    x, y = batch()
    with profile(model, sample_interval=None) as prof:
        for _ in range(2):
            _, loss = model(x, y)
            saved = graph_saved_bytes(loss, model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    step = memory(prof)["steps"][-1]
    c = step["categories"]
    assert c["activations"] == saved
    bound = c["parameters"] + c["gradients"] + c["optimizer_state"] + c["activations"]
    assert categories_live_peak(prof.tracker.steps[-1]) == step["categories_live_peak"] <= bound


def test_a_tracker_that_finishes_at_the_optimizer_step_lets_the_scripts_hooks_run():
    # steps=1: measuring ends inside torch's loop over the post-hooks, at the
    # first step(). A script's hook after ours, removing itself there, still may;
    # the model's hooks are gone before the next forward.
    from torch.optim.optimizer import _global_optimizer_post_hooks, register_optimizer_step_post_hook

    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    fired = []

    def hook(o, args, kwargs):
        fired.append(1)
        handle.remove()

    handle = register_optimizer_step_post_hook(hook)
    with profile(model, steps=1, sample_interval=None) as prof:
        model(*batch())[1].backward()
        opt.step()
        assert not model._forward_hooks and not model._forward_pre_hooks
        opt.zero_grad()
        model(*batch())[1].backward()
        opt.step()
    assert fired == [1] and not _global_optimizer_post_hooks
    assert [s["optimizer_steps"] for s in memory(prof)["steps"]] == [1]
    assert_no_hooks(model)


def test_checkpointing_the_whole_model_is_one_forward_that_keeps_nothing():
    # checkpoint(model, x): what the model saves is dropped (checkpoint's pack
    # hook keeps a placeholder) and backward runs the model again. That rerun
    # is part of backward, not a second forward.
    from torch.utils.checkpoint import checkpoint

    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    with profile(model, sample_interval=None) as prof:
        for _ in range(2):
            x, y = batch()
            loss = checkpoint(model, x, y, use_reentrant=False)[1]
            loss.backward()
            opt.step()
            opt.zero_grad()
    for step in memory(prof)["steps"]:
        assert (step["forwards"], step["backwards"], step["optimizer_steps"]) == (1, 1, 1)
        assert len(step["phase_spans"]["forward"]) == 1
        assert step["gradient_checkpointing"] is True
        assert step["categories"]["activations"] == 0
        assert step["categories"]["gradients"] == unique_param_bytes(model)


def test_nested_blocks_on_one_model_both_see_the_saved_tensors():
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    x, y = batch()
    with profile(model, sample_interval=None) as outer:
        with profile(model, sample_interval=None) as inner:
            for _ in range(2):
                _, loss = model(x, y)
                saved = graph_saved_bytes(loss, model)
                loss.backward()
                opt.step()
                opt.zero_grad()
    for prof in (outer, inner):
        steps = memory(prof)["steps"]
        assert [s["categories"]["activations"] for s in steps] == [saved, saved]
    assert [s["categories_live_peak"] for s in memory(outer)["steps"]] == [
        s["categories_live_peak"] for s in memory(inner)["steps"]
    ]
    assert_no_hooks(model)


def test_a_failed_step_does_not_keep_the_failed_attempts_tensors_alive():
    # The OOM-retry shape: the error leaves train_step(); the caller halves the
    # batch. Nothing of the failed attempt may outlive the exception.
    import gc
    import weakref

    model = nn.Linear(16, 256)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probes, failures = [], []

    def fail_once(o, args, kwargs):
        if not failures:
            failures.append(1)
            raise torch.OutOfMemoryError("simulated")

    opt.register_step_pre_hook(fail_once)

    def train_step(batch_size):
        out = model(torch.randn(batch_size, 16))
        probes.append(weakref.ref(out))
        out.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    with profile(model, sample_interval=None) as prof:
        try:
            train_step(64)
        except torch.OutOfMemoryError:
            opt.zero_grad()
        gc.collect()
        assert probes[0]() is None  # freed before the retry begins
        train_step(32)
    assert [s["optimizer_failed"] for s in memory(prof)["steps"]] == [True, False]


def test_a_step_that_fails_before_any_forward_leaves_no_stale_state():
    # A resumed loop steps first, and that step() raises while no step is open.
    model = nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fail = [True]

    def pre(o, args, kwargs):
        if fail[0]:
            fail[0] = False
            raise RuntimeError("simulated")

    opt.register_step_pre_hook(pre)
    with profile(model, sample_interval=None) as prof:
        try:
            opt.step()
        except RuntimeError:
            pass
        for _ in range(2):  # two micro-batches, then the step
            model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
    steps = memory(prof)["steps"]
    assert [(s["forwards"], s["backwards"], s["optimizer_steps"], s["optimizer_failed"]) for s in steps] == [
        (2, 2, 1, False)
    ]


def test_reentrant_checkpointing_of_the_whole_model_is_measured():
    # use_reentrant=True runs the first forward under no_grad (unseen); the
    # recomputation in backward is the step's forward, and is said to be one.
    from torch.utils.checkpoint import checkpoint

    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.AdamW(model.parameters())
    with profile(model, sample_interval=None) as prof:
        for _ in range(2):
            x = torch.randn(8, 16, requires_grad=True)
            checkpoint(model, x, use_reentrant=True).sum().backward()
            opt.step()
            opt.zero_grad()
    steps = memory(prof)["steps"]
    assert [(s["forwards"], s["optimizer_steps"], s["gradient_checkpointing"]) for s in steps] == [(1, 1, True)] * 2
    # Both recomputations are seen whole: Linear 0's input, the ReLU output (for ReLU and Linear 2).
    assert [s["categories"]["activations"] for s in steps] == [8 * 16 * 4 + 8 * 64 * 4] * 2


def test_a_step_inside_a_scripts_post_hook_after_a_tracker_finished_there():
    # A script's own global post-hook steps a second optimizer: that step runs
    # inside torch's loop over the post-hooks, where a tracker just finished.
    from torch.optim.optimizer import register_optimizer_step_post_hook

    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    handles = [
        register_optimizer_step_post_hook(lambda o, args, kwargs: opt_b.step() if o is opt_a else None),
        register_optimizer_step_post_hook(lambda *args: None),  # any later hook: a logger
    ]
    try:
        x = torch.randn(4, 8)
        with profile(b, sample_interval=None) as pb:
            with profile(a, steps=1, sample_interval=None) as pa:
                a(x).sum().backward()
                b(x).sum().backward()
                opt_a.step()  # raised "OrderedDict mutated during iteration"
    finally:
        for h in handles:
            h.remove()
    assert [s["optimizer_steps"] for s in memory(pa)["steps"]] == [1]
    assert [s["optimizer_steps"] for s in memory(pb)["steps"]] == [1]
    assert_no_hooks(a)


def test_a_compressor_with_its_own_holder_class_is_counted_as_held():
    class Packed:  # a compressor's own container, not a tuple/list/dict
        __slots__ = ("data", "dtype")

        def __init__(self, t):
            self.data, self.dtype = t.to(torch.bfloat16), t.dtype

    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.autograd.graph.saved_tensors_hooks(Packed, lambda p: p.data.to(p.dtype)):
        with profile(model, sample_interval=None) as prof:
            model(torch.randn(8, 16)).sum().backward()
            opt.step()
    step = memory(prof)["steps"][0]
    assert step["activations_offloaded"] == 0
    assert step["categories"]["activations"] == (8 * 16 + 2 * 8 * 64 + 64 * 4) * 2  # the bf16 copies


def test_lazy_parameters_that_get_shapes_in_the_block_are_counted():
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.LazyLinear(32))
    opt = torch.optim.Adam(model.parameters())
    with profile(model, opt, sample_interval=None) as prof:
        for _ in range(2):
            model(torch.randn(4, 16)).sum().backward()
            opt.step()
            opt.zero_grad()
    trained = unique_param_bytes(model)
    report = prof.to_dict()["models"][0]
    assert report["parameters"]["uninitialized"] == [] and report["parameters"]["bytes"] == trained
    last = report["memory"]["steps"][-1]["categories"]
    assert last["parameters"] == last["gradients"] == trained
    assert last["optimizer_state"] == 2 * trained + 4 * 4  # exp_avg, exp_avg_sq, four step counters


def test_lbfgs_history_lists_are_optimizer_state():
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.LBFGS(model.parameters(), history_size=5, max_iter=6)
    x, y = torch.randn(16, 8), torch.randn(16, 1)

    def closure():
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss

    with profile(model, sample_interval=None) as prof:
        for _ in range(2):
            opt.step(closure)
    # Independently: every tensor in LBFGS's state, its history lists included, once.
    tensors = {}
    for state in opt.state.values():
        for value in state.values():
            for t in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(t, torch.Tensor):
                    tensors[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    step = memory(prof)["steps"][-1]
    assert step["categories"]["optimizer_state"] == sum(tensors.values())
    assert {"old_dirs", "old_stps", "ro"} <= set(step["optimizer_state"]["by_name"])


def test_a_loss_saved_through_the_scripts_own_hooks_is_said_to_be_unseen():
    # The script's save_on_cpu covers the model and the loss after it: our pair
    # must be off the stack when the script's `with` ends, so the loss's saves
    # are not seen. The step says so rather than showing a smaller figure as whole.
    import torch.nn.functional as F

    model = nn.Sequential(nn.Embedding(100, 16), nn.Linear(16, 100))
    opt = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, 100, (4, 9))
    with profile(model, sample_interval=None) as prof:
        with torch.autograd.graph.save_on_cpu():
            logits = model(ids[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, 100), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
    step = memory(prof)["steps"][0]
    assert step["saves_after_forward_unseen"] is True
    assert any("saves_after_forward_unseen" in n for n in memory(prof)["notes"])
    with profile(model, sample_interval=None) as plain:  # no hooks of the script's: the loss is seen
        logits = model(ids[:, :-1])
        F.cross_entropy(logits.reshape(-1, 100), ids[:, 1:].reshape(-1)).backward()
        opt.step()
    seen = memory(plain)["steps"][0]
    assert seen["saves_after_forward_unseen"] is False
    assert seen["categories"]["activations"] > step["categories"]["activations"]


def test_a_forward_whose_graph_is_freed_unused_is_no_part_of_a_step():
    # print(model(x).shape) before training, with gradients on: its graph is
    # gone before the first training forward, and it is not a micro-batch.
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with profile(model, sample_interval=None) as prof:
        print(tuple(model(torch.randn(2, 32)).shape))
        for _ in range(2):
            nn.functional.cross_entropy(model(torch.randn(16, 32)), torch.randint(0, 10, (16,))).backward()
            opt.step()
            opt.zero_grad()
        model(torch.randn(512, 32)).sum().item()  # a check between steps, also unused
        nn.functional.cross_entropy(model(torch.randn(16, 32)), torch.randint(0, 10, (16,))).backward()
        opt.step()
    mem = memory(prof)
    assert [(s["forwards"], s["input_shape"]) for s in mem["steps"]] == [(1, [16, 32])] * 3
    assert len({s["categories"]["activations"] for s in mem["steps"]}) == 1
    assert any("2 forward(s) with gradients on but no backward" in n for n in mem["notes"])


def test_two_forwards_into_one_loss_stay_one_step():
    # A contrastive or multi-view step: the first forward's graph is alive in the loss.
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with profile(model, sample_interval=None) as prof:
        for _ in range(2):
            a = model(torch.randn(4, 8))
            b = model(torch.randn(4, 8))
            (a - b).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    mem = memory(prof)
    assert [(s["forwards"], s["backwards"]) for s in mem["steps"]] == [(2, 1), (2, 1)]
    assert not any("no backward" in n for n in mem["notes"])


def _views_step(model, opt, first, second, *, one_loss=True):
    """One contrastive-style step: two forwards alive at once; the independent count of what their graphs saved."""
    a, b = model(first), model(second)
    if one_loss:
        loss = (a - b).pow(2).mean()
        truth = graph_saved_bytes(loss, model)
        loss.backward()
    else:  # one loss per view, backpropagated one after the other
        la, lb = a.pow(2).mean(), b.pow(2).mean()
        truth = graph_saved_bytes(la + lb, model)  # (an addition saves no tensor)
        la.backward()
        lb.backward()
    opt.step()
    opt.zero_grad()
    return truth


def test_two_views_alive_at_once_are_both_counted():
    # Contrastive, siamese and DPO-style steps hold both forwards' saved tensors
    # until backward: the step's activations are their sum, not the larger one.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.AdamW(model.parameters())
    x1, x2 = torch.randn(16, 32), torch.randn(16, 32)
    with profile(model, sample_interval=None) as prof:
        truths = [_views_step(model, opt, x1, x2) for _ in range(2)]
    with profile(model, sample_interval=None) as single:
        loss = model(x1).pow(2).mean()
        one = graph_saved_bytes(loss, model)
        loss.backward()
        opt.step()
    steps = memory(prof)["steps"]
    assert [s["categories"]["activations"] for s in steps] == truths
    assert truths[0] > 1.5 * one == 1.5 * memory(single)["steps"][0]["categories"]["activations"]
    assert sum(r["bytes"] for r in memory(prof)["activations_by_module"]) == truths[-1]
    assert max(categories_live_peak(s) for s in prof.tracker.steps) >= steps[0]["baseline"]["parameters"] + truths[0]


def test_the_same_batch_twice_counts_its_storage_once():
    # R-Drop: one batch through the model twice (two dropout masks); the input
    # each first layer saves is one storage, alive once.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 32)
    with profile(model, sample_interval=None) as prof:
        truth = _views_step(model, opt, x, x)
    assert memory(prof)["steps"][0]["categories"]["activations"] == truth


def test_one_loss_per_view_backpropagated_in_turn_holds_both_until_the_first_backward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with profile(model, sample_interval=None) as prof:
        truths = [_views_step(model, opt, torch.randn(16, 32), torch.randn(16, 32), one_loss=False) for _ in range(2)]
    steps = memory(prof)["steps"]
    assert [(s["forwards"], s["backwards"], s["optimizer_steps"]) for s in steps] == [(2, 2, 1)] * 2
    assert [s["categories"]["activations"] for s in steps] == truths
    assert all(len(s["phase_spans"]["backward"]) == 2 for s in steps)


def test_a_probe_whose_output_is_kept_is_no_part_of_the_step():
    # out = model(x[:2]); print(out.shape) with gradients on: its graph lives
    # on in `out`, but no backward reaches it. It was merged into step 1, whose
    # batch then read 2, and the fit found 0 bytes per sample.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.AdamW(model.parameters())
    x, y = torch.randn(16, 32), torch.randint(0, 10, (16,))
    with profile(model, sample_interval=None) as prof:
        out = model(x[:2])
        truths = []
        for _ in range(2):
            loss = nn.functional.cross_entropy(model(x), y)
            truths.append(graph_saved_bytes(loss, model))
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert out.grad_fn is not None  # (kept to the end)
    entry = prof.report.models[0]
    steps = entry.memory["steps"]
    assert [(s["forwards"], s["forwards_left_out"], s["input_shape"]) for s in steps] == [
        (1, 1, [16, 32]),
        (1, 0, [16, 32]),
    ]
    assert [s["categories"]["activations"] for s in steps] == truths
    assert steps[0]["activations_left_out"] > 0
    assert steps[0]["categories_live_peak"] == categories_live_peak(prof.tracker.steps[0])
    assert any(
        "1 forward(s) with gradients on whose output no backward reached (step(s) 1" in n for n in entry.memory["notes"]
    )
    assert entry.fit["bytes_per_sample"] > 0


def test_a_model_gone_before_its_backward_still_has_its_gradients_counted():
    # loss = Net()(x).sum(); loss.backward(): the module object is freed at once,
    # its parameters live on in the graph and get gradients.
    import gc

    from profiler.results.assemble import analyze_model, attach_measurements

    model = nn.Linear(16, 4)
    tracker = StepTracker(model, sample_interval=None, hold_model=False).start()
    entry = analyze_model(model, "Linear")
    loss = model(torch.randn(8, 16)).sum()
    del model
    gc.collect()
    loss.backward()
    tracker.stop()
    attach_measurements(entry, tracker)
    (step,) = entry.memory["steps"]
    assert step["complete"] and step["categories"]["gradients"] == (16 * 4 + 4) * 4


def test_a_backward_that_raised_leaves_its_step_incomplete():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))

    def fail(grad):
        raise RuntimeError("backward failed")

    with profile(model, sample_interval=None) as prof:
        out = model(torch.randn(2, 4))
        out.register_hook(fail)
        try:
            out.sum().backward()
        except RuntimeError:
            pass
    mem = memory(prof)
    assert [s["complete"] for s in mem["steps"]] == [False]
    assert not any("by hand" in n for n in mem["notes"])
    assert any("did the script's forward or backward raise" in n for n in mem["notes"])


def test_trained_weights_outside_the_model_are_not_activations():
    # A loss's own trained weights (proxies, ArcFace) or another model's (the
    # other tower) are saved for backward: weights, not this model's activations.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64))
    text_tower = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64))
    proxies = nn.Parameter(torch.randn(500, 64) * 0.01)
    opt = torch.optim.AdamW([*model.parameters(), *text_tower.parameters(), proxies])
    every_weight = [*model.parameters(), *text_tower.parameters(), proxies]
    truths = []
    with profile(model, sample_interval=None) as prof:
        for _ in range(2):
            x, t, y = torch.randn(16, 32), torch.randn(16, 16), torch.randint(0, 500, (16,))
            image, text = model(x), text_tower(t)
            loss = nn.functional.cross_entropy(image @ proxies.t(), y) + (image * text).sum(-1).mean()
            truths.append(graph_saved_bytes(loss, nn.ParameterList(every_weight)))
            own_weights_out = graph_saved_bytes(loss, model)  # (what leaving out only the model's weights gives)
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert [s["categories"]["activations"] for s in memory(prof)["steps"]] == truths
    assert own_weights_out == truths[-1] + 500 * 64 * 4 + 64 * 64 * 4  # + the proxies, + the tower's last weight


def test_a_check_with_gradients_on_after_the_last_step_is_no_step():
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 10))
    opt = torch.optim.AdamW(model.parameters())
    with profile(model, sample_interval=None) as prof:
        for _ in range(2):
            nn.functional.cross_entropy(model(torch.randn(16, 32)), torch.randint(0, 10, (16,))).backward()
            opt.step()
            opt.zero_grad()
        print(round(model(torch.randn(64, 32)).mean().item(), 4))  # a quick look, no torch.no_grad()
    mem = memory(prof)
    assert [(s["index"], s["complete"], s["input_shape"]) for s in mem["steps"]] == [
        (1, True, [16, 32]),
        (2, True, [16, 32]),
    ]
    assert any("1 forward(s) with gradients on but no backward" in n for n in mem["notes"])


def test_a_graph_retained_for_a_second_loss_is_two_backward_passes():
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 20))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with profile(model, sample_interval=None) as prof:
        for _ in range(2):
            out = model(torch.randn(16, 32))
            l1 = nn.functional.cross_entropy(out[:, :10], torch.randint(0, 10, (16,)))
            l2 = nn.functional.cross_entropy(out[:, 10:], torch.randint(0, 10, (16,)))
            truth = graph_saved_bytes(l1 + l2, model)
            l1.backward(retain_graph=True)
            l2.backward()
            opt.step()
            opt.zero_grad()
    steps = memory(prof)["steps"]
    assert [(s["forwards"], s["backwards"], len(s["phase_spans"]["backward"])) for s in steps] == [(1, 2, 2)] * 2
    assert steps[-1]["categories"]["activations"] == truth


def test_a_model_only_evaluated_with_its_loss_kept_holds_a_bounded_record():
    # An EMA copy evaluated with gradients on, its loss kept in a variable: each
    # forward's graph is alive when the next begins, as two views' would be.
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with profile(model, sample_interval=None) as prof:
        held = []
        for _ in range(100):
            kept = model(torch.randn(4, 8)).pow(2).mean()
            held.append(prof.tracker.step.forwards)
    assert max(held) <= 32
    mem = memory(prof)
    assert mem["steps"] == [] and kept.grad_fn is not None
    assert any("100 forward(s) with gradients on but no backward" in n for n in mem["notes"])


def test_saves_freed_before_the_backward_are_not_what_it_held():
    # A teacher put in .eval() but run with gradients on: its output is
    # detached, its graph (saved under the student's hooks) freed at once.
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    teacher = nn.Sequential(nn.Linear(32, 512), nn.ReLU(), nn.Linear(512, 10)).eval()
    opt = torch.optim.AdamW(student.parameters())
    truths = []
    with profile(student, sample_interval=None) as prof:
        for _ in range(2):
            x = torch.randn(16, 32)
            s = student(x)
            t = teacher(x).detach()
            loss = nn.functional.kl_div(
                nn.functional.log_softmax(s, -1), nn.functional.softmax(t, -1), reduction="batchmean"
            )
            truths.append(graph_saved_bytes(loss, student))
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert [s["categories"]["activations"] for s in memory(prof)["steps"]] == truths


def test_a_graph_retained_then_a_second_forward_holds_both():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with profile(model, sample_interval=None) as prof:
        for _ in range(2):
            out = model(torch.randn(16, 64))
            out.sum().backward(retain_graph=True)
            out2 = model(torch.randn(16, 64))
            loss = (out * out2).sum()
            truth = graph_saved_bytes(loss, model)  # both graphs: the first was retained
            loss.backward()
            opt.step()
            opt.zero_grad()
    steps = memory(prof)["steps"]
    assert [(s["forwards"], s["backwards"]) for s in steps] == [(2, 2)] * 2
    assert steps[-1]["categories"]["activations"] == truth


def test_a_gans_generator_keeps_its_activations_in_every_step():
    # Both models measured: the discriminator's pair, pushed after the
    # generator's, stayed on top between its steps and took the generator's saves.
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 16))
    D = nn.Sequential(nn.Linear(16, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1))
    opt_g, opt_d = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
    bce = nn.BCEWithLogitsLoss()
    with profile(G, sample_interval=None) as pg, profile(D, sample_interval=None):
        for _ in range(3):
            fake = G(torch.randn(4, 8))
            loss_d = bce(D(torch.randn(4, 16)), torch.ones(4, 1)) + bce(D(fake.detach()), torch.zeros(4, 1))
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
            loss_g = bce(D(fake), torch.ones(4, 1))
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
    own = [sum(r for (path, _), r in s.activations_by_module.items() if path != OUTSIDE) for s in pg.tracker.steps]
    assert own == [4 * 8 * 4 + 4 * 64 * 4] * 3  # Linear's input, ReLU's output (also the next Linear's input)


def test_a_gradient_penalty_is_part_of_the_critics_step():
    # WGAN-GP: torch.autograd.grad(..., create_graph=True) reaches the critic's
    # output but accumulates no .grad: the step goes on to the loss's backward.
    torch.manual_seed(0)
    D = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    opt = torch.optim.Adam(D.parameters())
    with profile(D, sample_interval=None) as prof:
        for _ in range(3):
            real, fake = torch.randn(8, 16), torch.randn(8, 16)
            x = ((real + fake) / 2).requires_grad_()
            (g,) = torch.autograd.grad(D(x).sum(), x, create_graph=True)
            loss = D(fake).mean() - D(real).mean() + 10 * ((g.norm(dim=1) - 1) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    steps = memory(prof)["steps"]
    assert [(s["kind"], s["forwards"], s["backwards"], s["optimizer_steps"]) for s in steps] == [
        ("first", 3, 2, 1),
        ("steady", 3, 2, 1),
        ("steady", 3, 2, 1),
    ]
    # The penalty's forward is retained (create_graph) and alive with the other two at the loss's backward.
    assert steps[-1]["categories"]["activations"] >= 3 * (8 * 16 + 8 * 64) * 4


def test_a_storage_saved_again_after_autograd_let_go_of_it_is_alive_again():
    # profile(G) alone: the discriminator saves fake.detach() (the storage of G's
    # output), its backward lets go of it, then D(fake) saves the same storage
    # for G's backward. It was left out as freed (a third of the truth).
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 256))
    D = nn.Linear(256, 1)
    opt_g, opt_d = torch.optim.SGD(G.parameters(), lr=0.01), torch.optim.SGD(D.parameters(), lr=0.01)
    every_weight = nn.ParameterList([*G.parameters(), *D.parameters()])
    truths = []
    with profile(G, sample_interval=None) as prof:
        for _ in range(3):
            fake = G(torch.randn(8, 16))
            loss_d = D(fake.detach()).mean()
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
            loss_g = -D(fake).mean()
            truths.append(graph_saved_bytes(loss_g, every_weight))
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
    assert [s["categories"]["activations"] for s in memory(prof)["steps"]] == truths


def test_a_backward_with_no_optimizer_step_after_it_is_not_the_steady_step():
    # The discriminator measured alone: the generator's last backward goes
    # through it as the block ends, with no step of its optimizer after it.
    torch.manual_seed(0)
    G, D = nn.Linear(8, 16), nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    opt_g, opt_d = torch.optim.SGD(G.parameters(), lr=0.01), torch.optim.SGD(D.parameters(), lr=0.01)
    with profile(D, sample_interval=None) as prof:
        for _ in range(2):
            fake = G(torch.randn(4, 8))
            loss_d = D(fake.detach()).mean() - D(torch.randn(4, 16)).mean()
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
            opt_g.zero_grad()
            (-D(fake).mean()).backward()
            opt_g.step()
    entry = prof.report.models[0]
    steps = entry.memory["steps"]
    assert steps[-1]["optimizer_steps"] == 0 and steps[-1]["complete"]
    assert entry.estimates["step"] == max(s["index"] for s in steps if s["optimizer_steps"])
