"""Compiled models: the profiler must not change the compiled code, and must still see the steps."""

from __future__ import annotations

import textwrap
import warnings

import torch
from torch import nn
from torch._dynamo.utils import counters

from profiler.discovery import ModelWatcher
from profiler.profiling import profile
from test_runner_memory import _report, run_profiler
from test_tracking import assert_no_hooks, batch, memory, tiny_gpt, unique_param_bytes


def _graphs_of_three_steps(watch: bool) -> tuple[dict, int]:
    torch._dynamo.reset()
    counters.clear()
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 1))
    compiled = torch.compile(model, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # dynamo warns when it cannot trace a hook of ours
        if watch:
            with ModelWatcher() as watcher:
                for _ in range(3):
                    compiled(torch.randn(4, 8)).sum().backward()
            assert watcher.models == [compiled]
        else:
            for _ in range(3):
                compiled(torch.randn(4, 8)).sum().backward()
    return dict(counters["graph_break"]), counters["stats"]["unique_graphs"]


def test_the_watchers_hooks_put_no_graph_break_into_compiled_code():
    # The runner's two global hooks stay for the whole run: traced by dynamo
    # they would split every compiled model into pieces.
    assert _graphs_of_three_steps(watch=True) == _graphs_of_three_steps(watch=False) == ({}, 1)


def test_a_tracker_on_a_model_compiled_afterwards_puts_no_graph_break():
    torch._dynamo.reset()
    counters.clear()
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    with profile(model, sample_interval=None):
        compiled = torch.compile(model, backend="eager")  # our hooks are on its modules already
        for _ in range(2):
            compiled(*batch())[1].backward()
            opt.step()
            opt.zero_grad()
    assert not counters["graph_break"]


def test_a_model_compiled_in_place_is_measured_by_profile():
    model = tiny_gpt()
    model.compile(backend="eager")
    compiled_call = model._compiled_call_impl
    opt = torch.optim.AdamW(model.parameters())
    with profile(model, sample_interval=None) as prof:
        for _ in range(2):
            model(*batch())[1].backward()
            opt.step()
            opt.zero_grad()
    steps = memory(prof)["steps"]
    assert [(s["forwards"], s["backwards"], s["optimizer_steps"], s["complete"]) for s in steps] == [(1, 1, 1, True)] * 2
    assert all(s["categories"]["gradients"] == unique_param_bytes(model) for s in steps)
    assert any("compile" in n for n in memory(prof)["notes"])
    assert model._compiled_call_impl is compiled_call  # our wrapper is gone
    assert_no_hooks(model)


def test_the_runner_measures_a_model_compiled_in_place(tmp_path):
    script = tmp_path / "compiled.py"
    script.write_text(textwrap.dedent(
        """
        import torch
        from torch import nn
        model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 1))
        model.compile(backend="eager")
        opt = torch.optim.AdamW(model.parameters())
        for step in range(4):
            loss = model(torch.randn(4, 8)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        print("compile is torch's again:", nn.Module.compile.__module__ == "torch.nn.modules.module")
        """
    ))
    out = tmp_path / "r.json"
    proc = run_profiler(["--steps", "2", "--json", out, script], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Dynamo" not in proc.stderr and "Traceback" not in proc.stderr
    (model,) = _report(out)["models"]
    steps = model["memory"]["steps"]
    assert [(s["forwards"], s["backwards"], s["optimizer_steps"], s["complete"]) for s in steps] == [(1, 1, 1, True)] * 2
    trained = 8 * 64 + 64 + 64 + 1
    assert all(s["categories"]["gradients"] == trained * 4 for s in steps)


def test_a_model_compiled_in_place_and_dropped_is_freed_under_the_runner(tmp_path):
    # Its compiled call refers to it: neither the watcher's wrapper nor the
    # tracker's may keep that alive once the script drops the model.
    script = tmp_path / "compiled_folds.py"
    script.write_text(textwrap.dedent(
        """
        import gc, weakref
        import torch
        from torch import nn

        def train_fold():
            model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
            model.compile(backend="eager")
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            for step in range(2):
                model(torch.randn(4, 8)).sum().backward()
                opt.step()
                opt.zero_grad()
            return weakref.ref(model)

        fold = train_fold()
        gc.collect()
        print("compiled model alive:", fold() is not None)
        """
    ))
    out = tmp_path / "r.json"
    proc = run_profiler(["--steps", "3", "--no-sampler", "--json", out, script], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "compiled model alive: False"
    (model,) = _report(out)["models"]
    assert len(model["memory"]["steps"]) == 2


def test_the_watcher_puts_nn_module_compile_back():
    original = nn.Module.compile
    with ModelWatcher():
        assert nn.Module.compile is not original
        model = nn.Linear(2, 2)
        model.compile(backend="eager")
    assert nn.Module.compile is original
    assert model._compiled_call_impl.__name__ != "call_compiled_with_watcher"


def test_the_watcher_hides_torchs_warning_about_its_own_hooks_only_while_it_watches():
    model = torch.compile(nn.Linear(2, 2), backend="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = list(warnings.filters)
        with ModelWatcher():
            model(torch.randn(1, 2))
        assert not caught
        assert warnings.filters == before  # our filter is gone with the watcher
        model(torch.randn(1, 2))
    assert not caught  # no global hook left: torch has nothing to warn about


def test_the_fit_does_not_plan_on_activations_it_could_not_see():
    def run(live_peak: bool):
        model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 1))
        model.compile(backend="eager")
        opt = torch.optim.AdamW(model.parameters())
        with profile(model, sample_interval=None, live_peak=live_peak) as prof:
            for _ in range(2):
                model(torch.randn(4, 8)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
        return prof.report.models[0]

    blind = run(live_peak=False)
    assert all(s["activations_measured"] is False for s in blind.memory["steps"])
    table = next(line for line in blind.render().splitlines() if line.startswith("activations"))
    assert "n/a (compiled)" in table and " 0 B" not in table
    assert blind.fit["available"] is False and "--live-peak" in blind.fit["reason"]
    counted = run(live_peak=True)  # the live-tensor counter sees every tensor, compiled or not
    assert counted.fit["available"] is True and counted.fit["bytes_per_sample"] > 0
