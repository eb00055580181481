"""Compiled models: the profiler must not change the compiled code, and must still see the steps."""

from __future__ import annotations

import textwrap
import warnings

import torch
from support import assert_no_hooks, batch, memory, read_json, tiny_gpt, unique_param_bytes
from support import run_profiler_text as run_profiler
from torch import nn
from torch._dynamo.utils import counters

from profiler import profile
from profiler.script.watcher import ModelWatcher


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
    assert [(s["forwards"], s["backwards"], s["optimizer_steps"], s["complete"]) for s in steps] == [
        (1, 1, 1, True)
    ] * 2
    assert all(s["categories"]["gradients"] == unique_param_bytes(model) for s in steps)
    assert any("compile" in n for n in memory(prof)["notes"])
    assert model._compiled_call_impl is compiled_call  # our wrapper is gone
    assert_no_hooks(model)


def test_the_runner_measures_a_model_compiled_in_place(tmp_path):
    script = tmp_path / "compiled.py"
    script.write_text(
        textwrap.dedent(
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
        )
    )
    out = tmp_path / "r.json"
    proc = run_profiler(["--steps", "2", "--json", out, script], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Dynamo" not in proc.stderr and "Traceback" not in proc.stderr
    (model,) = read_json(out)["models"]
    steps = model["memory"]["steps"]
    assert [(s["forwards"], s["backwards"], s["optimizer_steps"], s["complete"]) for s in steps] == [
        (1, 1, 1, True)
    ] * 2
    trained = 8 * 64 + 64 + 64 + 1
    assert all(s["categories"]["gradients"] == trained * 4 for s in steps)


def test_a_model_compiled_in_place_and_dropped_is_freed_under_the_runner(tmp_path):
    # Its compiled call refers to it: neither the watcher's wrapper nor the
    # tracker's may keep that alive once the script drops the model.
    script = tmp_path / "compiled_folds.py"
    script.write_text(
        textwrap.dedent(
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
        )
    )
    out = tmp_path / "r.json"
    proc = run_profiler(["--steps", "3", "--no-sampler", "--json", out, script], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "compiled model alive: False"
    (model,) = read_json(out)["models"]
    assert len(model["memory"]["steps"]) == 2


def test_the_watcher_puts_nn_module_compile_back():
    original = nn.Module.compile
    with ModelWatcher():
        assert nn.Module.compile is not original
        model = nn.Linear(2, 2)
        model.compile(backend="eager")
        shim = model._compiled_call_impl  # ours while the watcher watches, around torch's compiled call
        compiled = shim.__wrapped__
        assert shim is not compiled and shim.__name__ == "call_compiled_with_hooks"
    assert nn.Module.compile is original
    assert model._compiled_call_impl is compiled  # torch's own again, our shim gone


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


def test_what_compiled_graphs_save_is_measured_and_planned_on():
    # Autograd runs the saved-tensor hooks for compiled graphs too: a compiled
    # model saves what the eager one does (aot_eager keeps the same operators).
    def run(compile_as: str | None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 1))
        if compile_as == "in place":
            model.compile(backend="aot_eager")
        run_model = torch.compile(model, backend="aot_eager") if compile_as == "wrapper" else model
        opt = torch.optim.AdamW(model.parameters())
        with profile(run_model, sample_interval=None) as prof:
            for _ in range(2):
                run_model(torch.randn(4, 8)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
        return prof.report.models[0]

    eager = run(None)
    for how in ("in place", "wrapper"):
        compiled = run(how)
        steps = compiled.memory["steps"]
        assert [s["categories"]["activations"] for s in steps] == [
            s["categories"]["activations"] for s in eager.memory["steps"]
        ]
        assert (
            steps[-1]["categories"]["activations"] == 4 * 8 * 4 + 4 * 64 * 4 + 4 * 4
        )  # input, ReLU output, pow's input
        assert compiled.fit["available"] is True and compiled.fit["bytes_per_sample"] > 0
        assert "n/a" not in next(line for line in compiled.render().splitlines() if line.startswith("activations"))


def _tiny_gpt_and_its_saves():
    """A tiny GPT, a batch, and what its eager forward and loss save (the independent walk)."""
    from autograd_walk import graph_saved_bytes

    torch.manual_seed(0)
    model = tiny_gpt(dropout=0.0)
    x, y = batch(4, 16)
    _, loss = model(x, y)
    return model, x, y, graph_saved_bytes(loss, model)


def test_a_transformer_compiled_whole_is_measured_in_total_and_blocks_compiled_per_block():
    def run(compile_as: str | None):
        model, x, y, truth = _tiny_gpt_and_its_saves()
        if compile_as == "blocks":
            for block in model.transformer.h:
                block.compile(backend="aot_eager")
        run_model = torch.compile(model, backend="aot_eager") if compile_as == "whole" else model
        opt = torch.optim.AdamW(model.parameters())
        with profile(run_model, sample_interval=None) as prof:
            for _ in range(2):
                _, loss = run_model(x, y)
                loss.backward()
                opt.step()
                opt.zero_grad()
        return truth, prof.report.models[0]

    truth, eager = run(None)
    _, whole = run("whole")
    _, blocks = run("blocks")
    last = {name: m.memory["steps"][-1] for name, m in (("eager", eager), ("whole", whole), ("blocks", blocks))}
    assert {name: s["categories"]["activations"] for name, s in last.items()} == dict.fromkeys(last, truth)
    assert last["blocks"]["activations_by_bucket"] == last["eager"]["activations_by_bucket"]
    assert last["blocks"]["activations_inside_compiled"] == 0
    # Compiled whole: no module hook runs inside, so no block is known for what it saved.
    assert last["whole"]["activations_inside_compiled"] == truth
    assert last["whole"]["activations_by_bucket"]["other"] == truth
    flash = next(f for f in whole.estimates["formulas"] if f["name"] == "korthikanti-flash")
    assert flash["measured"] is None and any("compiled whole" in m for m in flash["misses"])
    assert next(f for f in blocks.estimates["formulas"] if f["name"] == "korthikanti-flash")["measured"] > 0


def test_profile_of_a_model_trained_through_its_compile_wrapper_measures_the_steps(tmp_path):
    # with profile(model): ... torch.compile(model)(x): the model's own hooks run
    # only inside compiled code, where ours do nothing: no step was seen at all.
    for made in ("before the block", "inside the block"):
        model, x, y, truth = _tiny_gpt_and_its_saves()
        opt = torch.optim.AdamW(model.parameters())
        compiled = torch.compile(model, backend="aot_eager") if made == "before the block" else None
        with profile(model, sample_interval=None) as prof:
            if compiled is None:
                compiled = torch.compile(model, backend="aot_eager")
            for _ in range(2):
                compiled(x, y)[1].backward()
                opt.step()
                opt.zero_grad()
        mem = memory(prof)
        steps = mem["steps"]
        assert [(s["forwards"], s["backwards"], s["optimizer_steps"], s["input_shape"]) for s in steps] == [
            (1, 1, 1, [4, 16])
        ] * 2, made
        assert [s["categories"]["activations"] for s in steps] == [truth] * 2, made
        assert steps[-1]["activations_inside_compiled"] == truth  # compiled whole: no block known
        assert any("torch.compile'd module" in n for n in mem["notes"])
        assert_no_hooks(model)


def test_the_runner_compiles_a_model_no_more_often_than_a_plain_run(tmp_path):
    # Dynamo guards compiled code on the number of global module hooks: the
    # trackers observe through the watcher's pair, so measuring a model and
    # then letting it go adds or removes none.
    import subprocess
    import sys

    script = tmp_path / "compiled_loop.py"
    script.write_text(
        textwrap.dedent(
            """
        import torch
        from torch import nn
        from torch._dynamo.utils import counters
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
        compiled = torch.compile(model, backend="eager")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(6):
            compiled(torch.randn(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
        print("graphs", counters["stats"]["unique_graphs"], "breaks", sum(counters["graph_break"].values()))
        """
        )
    )
    plain = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    out = tmp_path / "r.json"
    proc = run_profiler(["--steps", "2", "--no-sampler", "--json", out, script], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == plain.stdout == "graphs 1 breaks 0\n"
    (model,) = read_json(out)["models"]
    assert [s["categories"]["activations"] for s in model["memory"]["steps"]] == [4 * 8 * 4 + 4 * 32 * 4] * 2
