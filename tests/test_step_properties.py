"""Activations of a step against an independent count, for random mixes of views and micro-batches.

A step may run several forwards whose graphs are alive together (views of a
contrastive loss, the same batch twice) and several micro-batches one after
the other (gradient accumulation), each backpropagated as one loss or one loss
per view, and a probe whose output the script keeps. What the step holds at
once is the largest micro-batch's graphs, read independently of the
profiler's hooks from autograd's own saved attributes.
"""

from __future__ import annotations

import torch
from autograd_walk import graph_saved_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from profiler import profile

views = st.lists(st.integers(1, 8), min_size=1, max_size=3)  # batch size of each view
micro_batch = st.tuples(views, st.booleans(), st.booleans())  # (views, same input for every view, one loss per view)
schedules = st.lists(micro_batch, min_size=1, max_size=3)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=schedules, probe=st.booleans())
def test_a_step_holds_its_largest_micro_batch_of_alive_views(schedule, probe):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    truths = []
    with profile(model, sample_interval=None) as prof:
        kept = model(torch.randn(5, 6)) if probe else None
        for sizes, same_input, loss_per_view in schedule:
            first = torch.randn(sizes[0], 6)
            outs = [model(first if same_input or i == 0 else torch.randn(n, 6)) for i, n in enumerate(sizes)]
            losses = [o.pow(2).mean() for o in outs]
            total = sum(losses[1:], losses[0])
            truths.append(graph_saved_bytes(total, model))
            if loss_per_view:
                for loss in losses:
                    loss.backward()
            else:
                total.backward()
        opt.step()
    (step,) = prof.to_dict()["models"][0]["memory"]["steps"]
    assert step["categories"]["activations"] == max(truths)
    assert step["forwards"] == sum(len(sizes) for sizes, _, _ in schedule)
    assert step["forwards_left_out"] == int(probe)
    assert step["input_shape"] == [schedule[0][0][0], 6]
    assert kept is None or kept.grad_fn is not None
