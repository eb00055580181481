"""benchmarks/overhead.py: each block says what collections its steps paid for, and leaves nothing patched.

A tool that keeps Python objects per step makes the collector run more often,
and a full collection walks every object of the process, so the overhead
benchmark reports, per block, the collections during its steps and the seconds
they took. Checked against collections asked for by hand (``gc.collect(g)``
runs exactly one of generation ``g``), and that a block leaves
``gc.callbacks`` as it found it, and a counterfactual block (``profile()`` with
reads left out, ``counterfactuals.py``) the profiler's functions.
"""

from __future__ import annotations

import gc

import pytest
import torch
from support import load_benchmark


@pytest.fixture(scope="module")
def overhead():
    return load_benchmark("overhead")


def test_the_collector_clock_counts_collections_while_on_only(overhead):
    clock = overhead.CollectorClock()
    gc.callbacks.append(clock)
    try:
        gc.collect(0)  # off: not counted
        clock.on = True
        for generation in (0, 0, 1, 2):
            gc.collect(generation)
        clock.on = False
        gc.collect(0)
    finally:
        gc.callbacks.remove(clock)
    assert clock.collections == [2, 1, 1]
    assert clock.seconds > 0


def test_a_block_reports_its_collections_and_leaves_the_callbacks_as_they_were(overhead):
    class Step:
        device = torch.device("cpu")

        def __call__(self) -> None:
            for _ in range(3000):  # cycles the collector must find: generation 0 runs at least once
                a: list = []
                a.append(a)

    callbacks = list(gc.callbacks)
    res = overhead.run_block("plain", Step(), 4)
    assert gc.callbacks == callbacks
    assert len(res["gc_collections"]) == 3 and res["gc_collections"][0] >= 1
    assert res["gc_s_per_step"] > 0


class _KeepingStep:
    """A training step that keeps five lists per call: what the training itself keeps, known."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.x = torch.randn(16, 4)
        self.kept: list = []

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.model(self.x).pow(2).mean().backward()
        self.optimizer.step()
        self.kept.extend([i] for i in range(5))


def test_objects_kept_per_step_take_off_what_the_training_keeps(overhead):
    kept = overhead.kept_objects_per_step(_KeepingStep(), 20, None)
    assert kept["steps"] == 20
    # The step's own five lists (give or take what torch makes or frees once, after hooks come or go).
    assert abs(kept["plain"] - 5) <= 1
    # (each step's record, at least; the difference of the counts per step, to a float's rounding)
    assert kept["kept_by_profile"] == pytest.approx(kept["ours"] - kept["plain"])
    assert kept["kept_by_profile"] > 0
    assert kept["python_bytes_kept_by_profile"] > 0


def test_a_counterfactual_block_runs_profile_without_its_reads_and_puts_them_back(overhead):
    from profiler.tracking import ledger, optimizers, repeats

    before = (ledger.Ledger.count_gradients, optimizers.state_fingerprint, repeats.mode_signature)
    res = overhead.run_block("ours_no_reads", _KeepingStep(), 3, sample_interval=None)
    assert res["steps_s"] > 0 and "prof" not in res  # (its figures are wrong by design: not kept)
    assert (ledger.Ledger.count_gradients, optimizers.state_fingerprint, repeats.mode_signature) == before


def test_a_block_without_the_sampler_keeps_what_profile_measured_with_no_host_memory(overhead):
    res = overhead.run_block("ours_no_sampler", _KeepingStep(), 3)
    prof = res["prof"]  # (a real configuration: its figures are kept)
    assert prof.tracker.phases.sampler is None
    assert len(prof.tracker.steps) == 3
    assert "ours_no_sampler" in overhead.MODES and "ours_no_sampler" in overhead._ON_REQUEST
