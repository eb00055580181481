"""Forwards taken as repeats of one measured in full give the figures a full measurement gives.

Every script is run twice on identically seeded models, once with
``reuse_repeats=False`` (every forward measured tensor by tensor) and once as
by default, and the steps must agree figure for figure; where an independent
count exists (autograd's own saved attributes), both must equal it. The
shapes are the ones where a repeat could go wrong: closures (LBFGS), gradient
accumulation, views alive together, a retained graph, two models, a loss
that saves the other model's output, hand updates on a sequence-first LSTM,
data-dependent shapes and data-dependent control flow.
"""

from __future__ import annotations

import gc

import torch
from autograd_walk import graph_saved_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import batch, tiny_gpt
from torch import nn

from profiler import profile
from profiler.tracking.repeats import MAX_ORIGINALS
from profiler.tracking.step_record import ForwardSaves

FIGURES = (
    "forwards",
    "backwards",
    "optimizer_steps",
    "saved_tensors",
    "categories",
    "activations_by_bucket",
    "categories_live_peak",
    "forwards_left_out",
    "activations_left_out",
    "input_shape",
    "trunk_input_shape",
)


def _steps(run, reuse: bool) -> tuple[list[dict], object]:
    torch.manual_seed(0)
    prof = run(reuse)
    steps = prof.to_dict()["models"][0]["memory"]["steps"]
    return steps, prof


def _same_figures(run) -> tuple[list[dict], list[dict]]:
    """The steps of ``run(reuse)`` with and without repeats: equal in every figure; returns both."""
    full, _ = _steps(run, False)
    fast, _ = _steps(run, True)
    assert len(full) == len(fast)
    for a, b in zip(full, fast):
        assert {k: a[k] for k in FIGURES} == {k: b[k] for k in FIGURES}
    assert all(s["forwards_repeated"] == 0 for s in full)
    return full, fast


def test_a_training_loop_repeats_its_first_forward_with_the_same_figures():
    def run(reuse):
        model = tiny_gpt()
        opt = torch.optim.AdamW(model.parameters())
        with profile(model, opt, sample_interval=None, reuse_repeats=reuse) as prof:
            for _ in range(4):
                x, y = batch()
                model(x, y)[1].backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        return prof

    _, fast = _same_figures(run)
    assert [s["forwards_repeated"] for s in fast] == [0, 1, 1, 1]
    assert all(s["repeats_unverified"] == 0 for s in fast)


def test_lbfgs_closures_repeat_within_one_step():
    x = torch.randn(64, 4, dtype=torch.float64)
    y = x.pow(2).sum(1, keepdim=True)
    truths = []

    def run(reuse):
        model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).double()
        opt = torch.optim.LBFGS(model.parameters(), max_iter=5, tolerance_grad=0, tolerance_change=0)

        def closure():
            opt.zero_grad()
            loss = (model(x) - y).pow(2).mean()
            truths.append(graph_saved_bytes(loss, model))
            loss.backward()
            return loss

        with profile(model, opt, sample_interval=None, reuse_repeats=reuse) as prof:
            for _ in range(2):
                opt.step(closure)
        return prof

    full, fast = _same_figures(run)
    assert [s["forwards_repeated"] for s in fast] == [4, 5]
    assert {s["categories"]["activations"] for s in fast} == {max(truths)}


def test_gradient_accumulation_and_views_alive_together():
    # Micro-batch 1: one view; micro-batch 2: two views of the same batch, alive at once.
    def run(reuse):
        model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with profile(model, opt, sample_interval=None, reuse_repeats=reuse) as prof:
            for _ in range(3):
                model(torch.randn(4, 6)).pow(2).mean().backward()
                first = torch.randn(4, 6)
                (model(first).pow(2).mean() + model(first).pow(2).mean()).backward()
                opt.step()
                opt.zero_grad()
        return prof

    _, fast = _same_figures(run)
    assert sum(s["forwards_repeated"] for s in fast) > 0


def test_a_graph_retained_then_a_second_forward():
    def run(reuse):
        model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with profile(model, opt, sample_interval=None, reuse_repeats=reuse) as prof:
            for _ in range(3):
                out = model(torch.randn(8, 16))
                out.sum().backward(retain_graph=True)
                out2 = model(torch.randn(8, 16))
                (out * out2).sum().backward()
                opt.step()
                opt.zero_grad()
        return prof

    _same_figures(run)


def test_two_models_a_teacher_and_a_loss_on_the_other_tower():
    def run(reuse):
        student = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
        teacher = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 10))
        tower = nn.Sequential(nn.Linear(8, 10), nn.Tanh())
        opt = torch.optim.AdamW([*student.parameters(), *tower.parameters()])
        with profile(student, sample_interval=None, reuse_repeats=reuse) as prof:
            for _ in range(3):
                x = torch.randn(16, 32)
                s, t = student(x), teacher(x).detach()
                loss = nn.functional.kl_div(s.log_softmax(-1), t.softmax(-1), reduction="batchmean")
                loss = loss + (s * tower(torch.randn(16, 8))).mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
        return prof

    _, fast = _same_figures(run)
    assert sum(s["forwards_repeated"] for s in fast) == 2


def test_a_sequence_first_lstm_with_hand_updates():
    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Embedding(50, 16)
            self.rnn = nn.LSTM(16, 24)
            self.decoder = nn.Linear(24, 50)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.decoder(self.rnn(self.encoder(ids))[0])

    def run(reuse):
        model = LM()
        with profile(model, sample_interval=None, reuse_repeats=reuse) as prof:
            for _ in range(4):
                ids = torch.randint(0, 50, (7, 3))  # (sequence, batch)
                out = model(ids)
                nn.functional.cross_entropy(out.view(-1, 50), ids.view(-1)).backward()
                with torch.no_grad():
                    for p in model.parameters():
                        p -= 0.1 * p.grad
                model.zero_grad()
        return prof

    _, fast = _same_figures(run)
    assert [s["forwards_repeated"] for s in fast] == [0, 1, 1, 1]
    assert fast[0]["batch_dim"] == 1


def test_data_dependent_shapes_are_measured_every_time():
    # A boolean mask keeps a different number of rows each step: what is saved follows the data.
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return self.b(h[h[:, 0] > 0].tanh())

    truths = []
    model = Masked()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with profile(model, opt, sample_interval=None) as prof:
        for _ in range(5):
            loss = model(torch.randn(64, 8)).sum()
            truths.append(graph_saved_bytes(loss, model))
            loss.backward()
            opt.step()
            opt.zero_grad()
    steps = prof.to_dict()["models"][0]["memory"]["steps"]
    assert [s["forwards_repeated"] for s in steps] == [0] * 5
    assert [s["categories"]["activations"] for s in steps] == truths
    assert len(set(truths)) > 1


def test_a_forward_whose_graph_changes_is_found_out_and_measured_again():
    # Control flow on the data: the same call makes a longer graph on some steps.
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x).tanh()
            return self.b(h).tanh() if x[0, 0] > 100 else h

    truths = []
    model = Branchy()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with profile(model, opt, sample_interval=None) as prof:
        for big in (False, False, True, False):
            x = torch.randn(4, 8)
            x[0, 0] = 1000.0 if big else 0.0
            loss = model(x).sum()
            truths.append(graph_saved_bytes(loss, model))
            loss.backward()
            opt.step()
            opt.zero_grad()
    memory = prof.to_dict()["models"][0]["memory"]
    steps = memory["steps"]
    assert [s["forwards_repeated"] for s in steps] == [0, 1, 1, 0]
    assert [s["repeats_unverified"] for s in steps] == [0, 0, 1, 0]
    assert any("another autograd graph" in n for n in memory["notes"])
    # (the step found out is the measured one's figures, said unverified; the others are exact)
    assert [s["categories"]["activations"] for i, s in enumerate(steps) if i != 2] == truths[:2] + truths[3:]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.sampled_from([2, 3, 5]), min_size=1, max_size=6),
    train=st.lists(st.booleans(), min_size=6, max_size=6),
)
def test_any_sequence_of_batches_gives_the_full_measurement(sizes, train):
    # Batch sizes come back (repeats) or change (measured); eval-mode forwards with gradients on change the mode.
    def run(reuse):
        model = nn.Sequential(nn.Linear(5, 7), nn.Dropout(0.1), nn.GELU(), nn.Linear(7, 2))
        opt = torch.optim.Adam(model.parameters())
        with profile(model, opt, sample_interval=None, reuse_repeats=reuse) as prof:
            for n, training in zip(sizes, train):
                model.train(training)
                model(torch.randn(n, 5)).pow(2).sum().backward()
                opt.step()
                opt.zero_grad()
        return prof

    _same_figures(run)


def test_dynamic_lengths_keep_a_bounded_number_of_originals():
    # Dynamic padding: a new sequence length every step, then the first ones again.
    lengths = list(range(1, MAX_ORIGINALS + 9)) + [1, 2, MAX_ORIGINALS + 8]

    def run(reuse):
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with profile(model, opt, sample_interval=None, reuse_repeats=reuse) as prof:
            for n in lengths:
                model(torch.randn(n, 4)).sum().backward()
                opt.step()
                opt.zero_grad()
        return prof

    _, fast = _same_figures(run)
    _, prof = _steps(run, True)
    assert len(prof.tracker.repeats.originals) == MAX_ORIGINALS
    # (lengths 1 and 2 were let go of and measured again; the last length is still kept)
    assert [s["forwards_repeated"] for s in fast[-3:]] == [0, 0, 1]


def test_a_closures_repeats_are_let_go_of_when_their_step_ends():
    """A long run keeps no forward per closure evaluation (only what places it on the timeline).

    Each forward holds lists, sets and its signature: kept for the whole run,
    twenty a step, they would be objects the garbage collector walks again and
    again, in the script's process, for as long as it is measured.
    """
    torch.manual_seed(0)
    x = torch.randn(32, 4, dtype=torch.float64)
    y = x.pow(2).sum(1, keepdim=True)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=5, tolerance_grad=0, tolerance_change=0)

    def closure():
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss

    with profile(model, opt, sample_interval=None) as prof:
        for _ in range(8):
            opt.step(closure)
        gc.collect()
        forwards_alive = sum(1 for o in gc.get_objects() if type(o) is ForwardSaves)
    steps = prof.to_dict()["models"][0]["memory"]["steps"]
    assert sum(s["forwards_repeated"] for s in steps) == 8 * 5 - 1
    assert forwards_alive <= len(steps) + 3  # (each step's empty current one, the original, the last forward)
