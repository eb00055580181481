"""Measured training-step memory on CPU, checked against independent counts."""

from __future__ import annotations

import pytest
import torch
from autograd_walk import graph_saved_bytes
from support import assert_no_hooks, batch, memory, profile_lbfgs, tiny_gpt, train, train_by_hand, unique_param_bytes
from torch import nn
from torch.utils.checkpoint import checkpoint

from profiler import profile


def test_adamw_categories_are_exact():
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with profile(model, sample_interval=None) as prof:
        train(model, opt, steps=3)
    mem = memory(prof)
    pbytes = unique_param_bytes(model)
    n_tensors = len({id(p) for p in model.parameters()})
    steps = mem["steps"]
    assert [s["index"] for s in steps] == [1, 2, 3]
    assert steps[0]["kind"] == "first" and steps[1]["kind"] == "steady"
    for s in steps:
        cat = s["categories"]
        assert cat["parameters"] == pbytes
        assert cat["gradients"] == pbytes  # the tied weight has one gradient
        state = s["optimizer_state"]["by_name"]
        assert state["exp_avg"] == state["exp_avg_sq"] == pbytes
        assert state["step"] == n_tensors * torch.tensor(0.0).element_size()
        assert cat["optimizer_state"] == 2 * pbytes + state["step"]
        assert cat["autocast_copies"] == 0
        assert cat["other"] is None  # not measurable on CPU: said, not guessed
        assert s["peak_allocated"] is None
        assert sum(s["activations_by_bucket"].values()) == cat["activations"]
    assert sum(m["bytes"] for m in mem["activations_by_module"]) == steps[-1]["categories"]["activations"]
    assert any("unavailable on CPU" in n for n in mem["notes"])
    assert_no_hooks(model)


def test_activations_match_an_independent_graph_walk():
    model = tiny_gpt()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch(b=3, t=12)
    with profile(model, sample_interval=None) as prof:
        _, loss = model(x, y)
        expected = graph_saved_bytes(loss, model)
        loss.backward()
        opt.step()
    measured = memory(prof)["steps"][0]["categories"]["activations"]
    assert expected > 0
    assert measured == expected


def test_activations_grow_linearly_with_batch():
    model = tiny_gpt(n_layer=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sizes = {}
    for b in (2, 4):
        with profile(model, sample_interval=None) as prof:
            train(model, opt, steps=1, b=b, t=8)
        sizes[b] = memory(prof)["steps"][0]["categories"]["activations"]
    assert sizes[4] == pytest.approx(2 * sizes[2], rel=0.02)


def test_untied_model_has_more_gradient_bytes():
    tied, untied = tiny_gpt(), tiny_gpt(tie_weights=False)
    out = {}
    for name, model in (("tied", tied), ("untied", untied)):
        opt = torch.optim.AdamW(model.parameters())
        with profile(model, sample_interval=None) as prof:
            train(model, opt, steps=1)
        out[name] = memory(prof)["steps"][0]["categories"]["gradients"]
    assert out["untied"] - out["tied"] == 64 * 32 * 4


def test_blocks_hold_most_activations_and_buckets_sum():
    model = tiny_gpt(n_layer=4)
    opt = torch.optim.AdamW(model.parameters())
    with profile(model, sample_interval=None) as prof:
        train(model, opt, steps=2)
    step = memory(prof)["steps"][-1]
    by_bucket = step["activations_by_bucket"]
    assert by_bucket["block"] > by_bucket["embedding"]
    assert by_bucket["head"] > 0  # final norm, logits and the loss
    paths = {m["path"] for m in memory(prof)["activations_by_module"]}
    assert any(p.startswith("transformer.h.3.") for p in paths)


def test_autocast_weight_copies_are_their_own_category():
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    x, y = batch()
    with profile(model, sample_interval=None) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        opt.step()
    cat = memory(prof)["steps"][0]["categories"]
    # Every Linear weight is cast to bf16 once and saved for the input gradient.
    linear_weights = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Linear)}
    expected = sum(w.numel() * 2 for w in linear_weights.values())
    assert cat["autocast_copies"] == expected
    assert cat["activations"] > 0


def test_hand_written_update_without_optimizer():
    model = tiny_gpt()
    with profile(model, sample_interval=None) as prof:
        train_by_hand(model, 3, clear=lambda: model.zero_grad(set_to_none=True))
    mem = memory(prof)
    assert len(mem["steps"]) == 3
    assert all(s["complete"] for s in mem["steps"])
    assert all(s["categories"]["optimizer_state"] == 0 for s in mem["steps"])
    assert mem["steps"][0]["categories"]["gradients"] == unique_param_bytes(model)
    assert any("no optimizer step" in n for n in mem["notes"])


def test_gradient_accumulation_is_one_step():
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    with profile(model, opt, sample_interval=None) as prof:
        for _ in range(2):
            for _ in range(3):
                x, y = batch()
                _, loss = model(x, y)
                loss.backward()
            opt.step()
            opt.zero_grad()
    steps = memory(prof)["steps"]
    assert [(s["forwards"], s["backwards"], s["optimizer_steps"]) for s in steps] == [(3, 3, 1), (3, 3, 1)]


@pytest.mark.parametrize("pass_optimizer", [True, False])
def test_accumulated_micro_batches_hold_one_forward_of_activations(pass_optimizer):
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    x, y = batch(b=2, t=12)
    with profile(model, sample_interval=None) as single:
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    one_forward = memory(single)["steps"][0]["categories"]["activations"]
    with profile(model, opt if pass_optimizer else None, sample_interval=None) as prof:
        for _ in range(2):
            for _ in range(4):
                _, loss = model(x, y)
                loss.backward()
            opt.step()
            opt.zero_grad()
    steps = memory(prof)["steps"]
    # Without being told, the optimizer is found at its first step() and the
    # four backward passes before it are recognised as micro-batches of step 1.
    assert [(s["index"], s["forwards"], s["optimizer_steps"]) for s in steps] == [(1, 4, 1), (2, 4, 1)]
    assert all(s["categories"]["activations"] == one_forward for s in steps)


def test_grad_scaler_skipped_steps_stay_separate_steps():
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # overflows: every step is skipped
    x, y = batch()
    with profile(model, opt, sample_interval=None) as prof:
        for _ in range(3):
            _, loss = model(x, y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
    steps = memory(prof)["steps"]
    # The last one too, though no forward follows it to tell: its gradients were cleared with no step.
    assert [(s["forwards"], s["optimizer_steps"], s["optimizer_skipped"]) for s in steps] == [(1, 0, True)] * 3


def _scaled_training(model, opt, scaler, iterations):
    """fp32 training through a GradScaler; returns which iterations it skipped."""
    skipped = []
    for _ in range(iterations):
        x, y = batch()
        _, loss = model(x, y)
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        skipped.append(scaler.get_scale() < scale)
    return skipped


def test_grad_scaler_skips_before_the_optimizer_is_known_do_not_use_up_the_steps():
    # The runner is never told the optimizer. A GradScaler starting far too
    # high skips optimizer.step() four times while its scale comes down; those
    # iterations must not pass for hand-written updates, nor count as the
    # measured steps.
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    with profile(model, steps=2, sample_interval=None) as prof:
        skipped = _scaled_training(model, opt, scaler, 8)
    assert skipped[:4] == [True] * 4 and not any(skipped[4:])
    mem = memory(prof)
    assert mem["optimizer"] == "AdamW"
    assert [(s["optimizer_skipped"], s["optimizer_steps"]) for s in mem["steps"]] == [(True, 0)] * 4 + [(False, 1)] * 2
    assert [s["kind"] for s in mem["steps"][4:]] == ["first", "steady"]
    assert any("optimizer_skipped" in n for n in mem["notes"])
    assert not any("no optimizer step" in n for n in mem["notes"])
    assert_no_hooks(model)
    # The tables, estimates and fit describe the steps that updated the weights.
    report = prof.report.render()
    assert "step 5 (first)" in report and "step 6 (steady)" in report and "step 1 " not in report
    est = prof.to_dict()["models"][0]["estimates"]
    assert est["step"] == 6


def test_an_optimizer_that_never_steps_does_not_make_skipped_steps():
    # No GradScaler: an iteration that clears gradients without the optimizer's
    # step updated the weights some other way; it is a step, not a skip.
    import gc

    gc.collect()  # no GradScaler of an earlier test still waiting for the collector
    model = tiny_gpt()
    unused = torch.optim.AdamW(model.parameters())
    with profile(model, steps=3, sample_interval=None) as prof:
        train_by_hand(model, 5, clear=unused.zero_grad)
    mem = memory(prof)
    assert len(mem["steps"]) == 3 and not any(s["optimizer_skipped"] for s in mem["steps"])
    assert any("no optimizer step was seen" in n for n in mem["notes"])


def test_a_scaler_that_never_settles_ends_measuring():
    from profiler.tracking.step_record import SKIPPED_STEPS_LIMIT

    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=0.99)  # skips every time
    with profile(model, steps=2, sample_interval=None) as prof:
        assert all(_scaled_training(model, opt, scaler, SKIPPED_STEPS_LIMIT + 3))
        assert not model._forward_hooks  # gave up waiting for a real step
    steps = memory(prof)["steps"]
    assert len(steps) == SKIPPED_STEPS_LIMIT and all(s["optimizer_skipped"] for s in steps)


def test_pack_hook_keeps_no_saved_output_alive():
    # A tensor an op saves as its own output (exp), in a graph that backward
    # never reaches, must be freed when the script drops it.
    import gc
    import weakref

    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    refs = []
    with profile(model, sample_interval=None):
        for _ in range(2):
            x, y = batch()
            logits, loss = model(x, y)
            side = logits.exp()  # a metric computed with gradients on, never backpropagated
            refs.append(weakref.ref(side))
            del side, logits
            loss.backward()
            opt.step()
            opt.zero_grad()
    gc.collect()
    assert [r() for r in refs] == [None, None]


def test_saved_tensor_hooks_leave_when_measuring_ends_on_another_thread():
    # On CUDA, backward's callbacks (where a hand-written-update step can end)
    # run on autograd's device thread, which cannot pop the hooks pushed on
    # the training thread: the next saved tensor there pops them.
    import threading

    from profiler.tracking import StepTracker

    model = tiny_gpt()
    tracker = StepTracker(model, sample_interval=None).start()
    x, y = batch()
    _, loss = model(x, y)  # pushes the saved-tensor hooks on this thread
    worker = threading.Thread(target=tracker.stop)
    worker.start()
    worker.join()
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    a = torch.ones(3, requires_grad=True)
    (a * a).sum()  # saves a tensor: our pack hook runs and removes itself
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    loss.backward()
    assert_no_hooks(model)


def test_a_tracker_not_holding_its_model_lets_the_script_free_it():
    # The runner's trackers: a model the script drops is freed as without us,
    # and its tracker ignores later optimizer steps (its parameters' ids may
    # be those of new tensors by then).
    import gc
    import weakref

    from profiler.tracking import StepTracker

    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    tracker = StepTracker(model, sample_interval=None, hold_model=False).start()
    train(model, opt, steps=1)
    dropped = weakref.ref(model)
    del model, opt
    gc.collect()
    assert dropped() is None and tracker.model is None and tracker.parameters.model_dropped
    other = tiny_gpt()
    train(other, torch.optim.AdamW(other.parameters()), steps=2)
    tracker.stop()
    assert [s.optimizer_steps for s in tracker.steps] == [1]
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_a_model_measured_can_be_copied_saved_and_scripted_inside_the_block(tmp_path):
    # An EMA copy, a checkpoint of the whole module or a TorchScript export in
    # mid-training: our hooks live outside the model, so none of them sees them.
    import copy

    from torch.optim.swa_utils import AveragedModel

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with profile(model, sample_interval=None) as prof:
        for _ in range(2):
            model(torch.randn(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
            ema = AveragedModel(model)
            twin = copy.deepcopy(model)
            torch.save(model, tmp_path / "model.pt")
            scripted = torch.jit.script(model)
            assert not any(m._forward_hooks or m._forward_pre_hooks for m in twin.modules())
            twin(torch.randn(2, 8)).sum().backward()  # a copy's calls are not this model's
            ema.update_parameters(model)
    x = torch.randn(3, 8)
    assert torch.equal(scripted(x), model(x))
    assert torch.load(tmp_path / "model.pt", weights_only=False)(x).shape == (3, 1)
    assert [(s["forwards"], s["backwards"]) for s in memory(prof)["steps"]] == [(1, 1), (1, 1)]
    assert_no_hooks(model)


def test_a_tracker_ending_inside_the_optimizer_hook_loop_does_not_break_the_step():
    # torch iterates its global optimizer post-hooks while calling them: a
    # tracker that removed its hook there would make the next hook's turn
    # raise "OrderedDict mutated during iteration" in the script.
    from torch.optim.optimizer import register_optimizer_step_post_hook

    model, other = tiny_gpt(), tiny_gpt()
    opt, other_opt = torch.optim.AdamW(model.parameters()), torch.optim.AdamW(other.parameters())
    calls = []
    user_hook = register_optimizer_step_post_hook(lambda o, a, k: calls.append(o))
    try:
        with profile(model, steps=2, sample_interval=None) as first, profile(other, sample_interval=None) as second:
            for _ in range(4):
                train(model, opt, steps=1)
                train(other, other_opt, steps=1)
    finally:
        user_hook.remove()
    assert len(calls) == 8
    assert len(memory(first)["steps"]) == 2 and len(memory(second)["steps"]) == 4
    assert_no_hooks(model)


def test_a_script_hook_that_removes_itself_still_may():
    # Safe in plain torch when it is the last global hook; ours must not come after it.
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    fired = []

    def one_shot(register):
        def hook(o, args, kwargs):
            fired.append(register.__name__)
            handle.remove()

        handle = register(hook)

    one_shot(register_optimizer_step_pre_hook)
    one_shot(register_optimizer_step_post_hook)
    with profile(model, sample_interval=None) as prof:
        train(model, opt, steps=2)
    assert len(fired) == 2 and len(memory(prof)["steps"]) == 2
    assert_no_hooks(model)


def test_an_optimizer_of_another_model_is_said_and_the_right_one_found():
    model, other = tiny_gpt(), tiny_gpt()
    opt, wrong = torch.optim.AdamW(model.parameters()), torch.optim.SGD(other.parameters(), lr=0.1)
    with profile(model, wrong, sample_interval=None) as prof:
        train(model, opt, steps=2)
    mem = memory(prof)
    assert any("updates none of this model's parameters" in n for n in mem["notes"])
    assert mem["optimizer"] == "AdamW" and [s["optimizer_steps"] for s in mem["steps"]] == [1, 1]


def test_a_wrapped_optimizer_is_found_inside_its_wrapper():
    # accelerate's AcceleratedOptimizer is an Optimizer holding the real one in .optimizer;
    # step hooks fire for the inner one, so that is the one to find.
    class Wrapper(torch.optim.Optimizer):
        def __init__(self, optimizer):
            self.optimizer = optimizer

        @property
        def param_groups(self):
            return self.optimizer.param_groups

        def step(self, closure=None):
            return self.optimizer.step(closure)

        def zero_grad(self, set_to_none=True):
            self.optimizer.zero_grad(set_to_none)

    model = tiny_gpt()
    wrapped = Wrapper(torch.optim.AdamW(model.parameters()))
    with profile(model, sample_interval=None) as prof:
        for i in range(3):
            x, y = batch()
            _, loss = model(x, y)
            loss.backward()
            if i == 0:
                wrapped.zero_grad()  # the first iteration ends without a step: the optimizer is looked for
                continue
            wrapped.step()
            wrapped.zero_grad()
    mem = memory(prof)
    assert mem["optimizer"] == "AdamW"
    assert [s["optimizer_steps"] for s in mem["steps"]][-2:] == [1, 1]


def test_a_frozen_block_run_without_grad_is_not_checkpointing():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
            self.head = nn.Linear(8, 1)

        def forward(self, x):
            with torch.no_grad():
                for b in self.blocks:
                    x = b(x)
            return self.head(x)

    model = Net()
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    with profile(model, sample_interval=None) as prof:
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
    assert memory(prof)["steps"][0]["gradient_checkpointing"] is False


def test_lbfgs_closure_evaluations_are_one_step():
    _, prof = profile_lbfgs()
    steps = memory(prof)["steps"]
    assert [s["optimizer_steps"] for s in steps] == [1, 1]
    assert all(s["forwards"] == s["backwards"] > 1 and not s["optimizer_skipped"] for s in steps)


def test_an_inplace_change_to_a_saved_tensor_still_raises():
    # Autograd stops checking saved tensors' versions once saved-tensor hooks
    # are installed; ours check instead, so the script's error is not lost.
    model = tiny_gpt()
    with profile(model, sample_interval=None):
        x, y = batch()
        logits, _ = model(x, y)
        s = logits.exp()  # exp saves its output for backward...
        s.mul_(3)  # ...which is then changed in place
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            s.sum().backward()


def test_the_scripts_own_saved_tensor_hooks_still_run():
    # A lossy pack hook of the script's (here: bf16) must run inside profile()
    # exactly as without it: same loss, same gradients.
    packed = []

    def pack(t):
        packed.append(1)
        return t.to(torch.bfloat16), t.dtype

    def unpack(saved):
        value, dtype = saved
        return value.to(dtype)

    def run(profiled: bool):
        model = tiny_gpt()
        x, y = batch()
        packed.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            if profiled:
                with profile(model, sample_interval=None):
                    _, loss = model(x, y)
                    loss.backward()
            else:
                _, loss = model(x, y)
                loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        return loss.item(), grads, len(packed)

    torch.manual_seed(1)
    plain = run(False)
    torch.manual_seed(1)
    profiled = run(True)
    assert profiled[0] == plain[0] and profiled[2] == plain[2] > 0
    assert all(torch.equal(a, b) for a, b in zip(plain[1], profiled[1]))


def test_two_models_in_one_forward_each_count_their_own_saves():
    # head(enc(x)): enc's hooks are still pushed when head's forward begins;
    # head's must not hand head's saved tensors to enc's tracker.
    enc = nn.Sequential(nn.Linear(8, 32), nn.Tanh())
    head = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.SGD([*enc.parameters(), *head.parameters()], lr=0.1)
    with profile(enc, opt, sample_interval=None) as pe, profile(head, opt, sample_interval=None) as ph:
        for _ in range(2):
            head(enc(torch.randn(4, 8))).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    enc_rows = {r["path"]: r["bytes"] for r in memory(pe)["activations_by_module"]}
    head_rows = {r["path"]: r["bytes"] for r in memory(ph)["activations_by_module"]}
    # enc: Linear's input (4x8 fp32), Tanh's output (4x32). The loss after both
    # models saves the head's output: the head's, whose pair is innermost.
    assert enc_rows == {"0": 4 * 8 * 4, "1": 4 * 32 * 4}
    assert head_rows == {
        "0": 4 * 32 * 4,
        "1": 4 * 32 * 4,
        "(outside the model)": 4 * 1 * 4,
    }  # (the last Linear saves Tanh's output)


def test_phases_tile_the_step():
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    with profile(model, sample_interval=None) as prof:
        train(model, opt, steps=2)
    spans = memory(prof)["steps"][-1]["phase_spans"]
    (f0, f1), (b0, b1), (o0, o1) = spans["forward"][0], spans["backward"][0], spans["optimizer"][0]
    assert f0 <= f1 == b0 <= b1 == o0 <= o1


def test_frozen_parameters_have_no_gradients_or_state():
    model = tiny_gpt(tie_weights=False)
    for p in model.transformer.h[0].parameters():
        p.requires_grad_(False)
    frozen = sum(p.numel() * 4 for p in model.transformer.h[0].parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with profile(model, sample_interval=None) as prof:
        train(model, opt, steps=2)
    cat = memory(prof)["steps"][-1]["categories"]
    assert cat["gradients"] == unique_param_bytes(model) - frozen
    assert memory(prof)["steps"][-1]["optimizer_state"]["by_name"]["exp_avg"] == unique_param_bytes(model) - frozen


def test_shared_layer_called_twice_counts_both_calls():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(8, 8)

        def forward(self, x):
            return self.layer(torch.tanh(self.layer(x)))

    model = Twice()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 8)
    with profile(model, sample_interval=None) as prof:
        out = model(x)
        loss = out.square().sum()
        expected = graph_saved_bytes(loss, model)
        loss.backward()
        opt.step()
    mem = memory(prof)
    assert mem["steps"][0]["categories"]["activations"] == expected


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_reports_less(reentrant):
    class Ckpt(nn.Module):
        def __init__(self, use_ckpt):
            super().__init__()
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)) for _ in range(3)
            )
            self.use_ckpt = use_ckpt

        def forward(self, x):
            for b in self.blocks:
                x = checkpoint(b, x, use_reentrant=reentrant) if self.use_ckpt else b(x)
            return x

    results = {}
    for use in (False, True):
        torch.manual_seed(0)
        model = Ckpt(use)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(8, 16, requires_grad=True)
        with profile(model, sample_interval=None) as prof:
            model(x).sum().backward()
            opt.step()
        step = memory(prof)["steps"][0]
        assert step["complete"]
        assert step["categories"]["gradients"] == unique_param_bytes(model)
        assert step["gradient_checkpointing"] is use
        assert any("gradient checkpointing" in n for n in memory(prof)["notes"]) is use
        results[use] = step["categories"]["activations"]
    assert results[True] < results[False]
    assert_no_hooks(model)


def test_hooks_removed_on_exception_and_keyboard_interrupt():
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    for exc in (ValueError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with profile(model, sample_interval=None) as prof:
                x, y = batch()
                _, loss = model(x, y)
                raise exc
        assert_no_hooks(model)
        assert prof.report is not None  # the report is still there
    # Training goes on unhurt after the failed blocks.
    train(model, opt, steps=1)


def test_exception_inside_forward_removes_hooks():
    model = tiny_gpt()
    x = torch.randint(0, 64, (2, 40))  # longer than block_size: the model refuses
    with pytest.raises(AssertionError):
        with profile(model, sample_interval=None):
            model(x)
    assert_no_hooks(model)


def test_nested_and_repeated_profiles():
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    with profile(model, sample_interval=None) as outer:
        with profile(model, sample_interval=None) as inner:
            train(model, opt, steps=1)
        train(model, opt, steps=1)
    assert_no_hooks(model)
    assert len(memory(inner)["steps"]) == 1
    assert len(memory(outer)["steps"]) == 2
    with profile(model, sample_interval=None) as again:
        train(model, opt, steps=2)
    assert [s["kind"] for s in memory(again)["steps"]] == ["steady", "steady"]
    assert_no_hooks(model)


def test_steps_limit_removes_hooks_and_training_continues():
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    with profile(model, steps=2, sample_interval=None) as prof:
        train(model, opt, steps=2)
        with torch.no_grad():
            model(batch()[0])
        assert not model._forward_hooks  # removed at the first forward after two measured steps
        train(model, opt, steps=2)
    assert len(memory(prof)["steps"]) == 2


def test_an_internal_error_never_stops_training(monkeypatch):
    import profiler.tracking.ledger as ledger

    def broken(t):
        raise RuntimeError("simulated bug")

    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    monkeypatch.setattr(ledger, "storage_key", broken)
    with profile(model, sample_interval=None) as prof:
        losses = train(model, opt, steps=3)  # must not raise
    assert len(losses) == 3
    assert any("internal error" in n and "simulated bug" in n for n in memory(prof)["notes"])
    assert_no_hooks(model)


def test_eval_forward_is_not_a_step():
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    with profile(model, sample_interval=None) as prof:
        train(model, opt, steps=1)
        with torch.no_grad():
            model(batch()[0])
        train(model, opt, steps=1)
    assert len(memory(prof)["steps"]) == 2


def test_compiled_module_gives_a_statement_not_a_crash():
    model = tiny_gpt()
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.AdamW(model.parameters())
    with profile(compiled, sample_interval=None) as prof:
        for _ in range(2):
            x, y = batch()
            _, loss = compiled(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
    mem = memory(prof)
    assert any("compile" in n for n in mem["notes"])
    assert mem["steps"][-1]["categories"]["gradients"] == unique_param_bytes(model)
    assert_no_hooks(model)


def test_live_peak_mode_bounds_and_cleanup():
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    with profile(model, sample_interval=None, live_peak=True) as prof:
        train(model, opt, steps=3)
    assert _get_current_dispatch_mode() is None
    assert_no_hooks(model)
    step = memory(prof)["steps"][-1]
    cat = step["categories"]
    held = cat["parameters"] + cat["optimizer_state"]
    # At the end of forward the weights, the optimizer state and everything saved for backward are alive at once.
    assert step["phases"]["forward"]["live_tensor_peak"] >= held + cat["activations"]
    # During the optimizer step the weights, gradients and optimizer state are.
    assert step["phases"]["optimizer"]["live_tensor_peak"] >= held + cat["gradients"]
    assert step["live_tensor_peak"] == max(p["live_tensor_peak"] for p in step["phases"].values())
    for s in memory(prof)["steps"]:
        c = s["categories"]
        # The categories never hold more at once than every live tensor together.
        most = s["categories_live_peak"]
        assert (
            max(
                c["parameters"] + c["optimizer_state"] + c["gradients"],
                c["parameters"] + s["baseline"]["optimizer_state"] + c["activations"],
            )
            <= most
            <= s["live_tensor_peak"]
        )
        assert most < sum(v for k, v in c.items() if k != "other")  # not everything is alive at once
        assert c["other"] is None  # only against an allocator's peak
    assert "live-tensor peak" in prof.render()
    assert prof.report.models[0].fit["source"].startswith("live-tensor peak")


def test_default_mode_has_no_live_peak():
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    with profile(model, sample_interval=None) as prof:
        train(model, opt, steps=1)
    assert memory(prof)["steps"][0]["live_tensor_peak"] is None


def test_sampler_records_host_rss():
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    with profile(model, sample_interval=0.005) as prof:
        train(model, opt, steps=2)
    mem = memory(prof)
    step = mem["steps"][-1]
    assert step["host_rss_peak"] > 0
    assert step["nvml_process_used_peak"] is None  # no GPU here: not guessed
    assert "sampler" in mem and mem["sampler"]["sources"]["host"]


def test_report_json_round_trips(tmp_path):
    import json

    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    with profile(model, sample_interval=None) as prof:
        train(model, opt, steps=2)
    path = tmp_path / "r.json"
    prof.to_json(path)
    data = json.loads(path.read_text())
    assert data["schema"] == "profiler.report/1"
    mem = data["models"][0]["memory"]
    assert set(mem["steps"][0]["categories"]) == {
        "parameters",
        "gradients",
        "optimizer_state",
        "activations",
        "autocast_copies",
        "other",
    }
    assert set(mem["steps"][0]["phases"]) == {"forward", "backward", "optimizer"}
    assert "Memory of a training step" in prof.render()
