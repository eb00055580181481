"""``python -m profiler SCRIPT`` measures training steps of unmodified scripts."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from support import EXAMPLES, read_json, run_in_process
from support import run_profiler_text as run_profiler


@pytest.fixture
def run(capfd):
    """``python -m profiler ARGS`` in this interpreter (``support.run_in_process``): what is measured."""
    return lambda args, cwd, timeout=None: run_in_process(args, cwd, capfd)


TINY = [
    "--n_layer",
    "2",
    "--n_embd",
    "32",
    "--n_head",
    "2",
    "--vocab_size",
    "64",
    "--block_size",
    "16",
    "--seq-len",
    "8",
]


def test_nanogpt_steps_are_measured_then_hooks_removed(tmp_path, run):
    out = tmp_path / "r.json"
    proc = run(["--steps", "2", "--json", out, EXAMPLES / "nanogpt.py", *TINY, "--steps", "5"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("step ") == 5  # the script ran all its steps after the measured two
    model = read_json(out)["models"][0]
    mem = model["memory"]
    assert [s["index"] for s in mem["steps"]] == [1, 2]
    assert [s["kind"] for s in mem["steps"]] == ["first", "steady"]
    assert mem["optimizer"] == "AdamW"
    cat = mem["steps"][1]["categories"]
    assert cat["gradients"] == model["parameters"]["bytes"]
    assert cat["optimizer_state"] >= 2 * model["parameters"]["bytes"]
    assert cat["activations"] > 0 and cat["other"] is None
    assert mem["steps"][1]["input_shape"] == [2, 8]
    assert model["estimates"]["formulas"] and model["fit"]["cards"]
    assert "Memory of a training step" in proc.stderr


def test_stop_after_steps_ends_the_script_with_exit_0(tmp_path, run):
    out = tmp_path / "r.json"
    proc = run(
        ["--steps", "1", "--stop-after-steps", "--json", out, EXAMPLES / "nanogpt.py", *TINY, "--steps", "50"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("step ") < 50
    assert len(read_json(out)["models"][0]["memory"]["steps"]) == 1


def test_script_without_optimizer_and_hooks_gone_afterwards(tmp_path, run):
    script = tmp_path / "by_hand.py"
    script.write_text(
        textwrap.dedent(
            """
        import torch
        from torch.nn.modules import module as m
        net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        for i in range(6):
            loss = net(torch.randn(8, 4)).pow(2).mean()
            net.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in net.parameters():
                    p -= 0.1 * p.grad
        print("module hooks left:", sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in net.modules()))
        """
        )
    )
    out = tmp_path / "r.json"
    proc = run(["--steps", "3", "--json", out, script], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "module hooks left: 0" in proc.stdout
    mem = read_json(out)["models"][0]["memory"]
    assert len(mem["steps"]) == 3 and all(s["complete"] for s in mem["steps"])
    assert mem["optimizer"] is None
    assert all(s["categories"]["optimizer_state"] == 0 for s in mem["steps"])
    assert any("no optimizer step" in n for n in mem["notes"])


def test_failing_script_still_gets_a_memory_report(tmp_path, run):
    script = tmp_path / "fails.py"
    script.write_text(
        textwrap.dedent(
            """
        import torch
        net = torch.nn.Linear(4, 4)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for i in range(3):
            net(torch.randn(2, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
        raise RuntimeError("diverged")
        """
        )
    )
    out = tmp_path / "r.json"
    proc = run(["--json", out, script], tmp_path)
    assert proc.returncode == 1
    assert "RuntimeError: diverged" in proc.stderr
    report = read_json(out)
    assert len(report["models"][0]["memory"]["steps"]) == 3
    assert any("raised RuntimeError" in n for n in report["notes"])


def test_fit_batches_reruns_the_script_and_fits_a_line(tmp_path, run):
    out = tmp_path / "r.json"
    proc = run(
        [
            "--steps",
            "2",
            "--stop-after-steps",
            "--fit",
            "T4",
            "--fit-batches",
            "4",
            "--json",
            out,
            EXAMPLES / "nanogpt.py",
            *TINY,
            "--batch-size",
            "2",
        ],
        tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    fit = read_json(out)["models"][0]["fit"]
    assert fit["measured_batches"] == [2, 4]
    assert "linear fit" in fit["method"]
    assert [c["card"] for c in fit["cards"]] == ["T4"]


def test_plot_option_writes_a_png(tmp_path, run):
    png = tmp_path / "step.png"
    proc = run(["--steps", "2", "--stop-after-steps", "--plot", png, EXAMPLES / "nanogpt.py", *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


REAL_WORLD_MIX = """
import os, sys
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.checkpoint import checkpoint
from helpers import WIDTH  # a sibling module, found through the script's real folder

torch.manual_seed(0)
steps_seen = []
register_optimizer_step_post_hook(lambda opt, args, kwargs: steps_seen.append(1))  # the script's own hook


class Net(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(3))
        self.reentrant = reentrant

    def forward(self, x):
        for block in self.blocks:  # recomputed during backward
            x = checkpoint(block, x, use_reentrant=self.reentrant).tanh()
        return x


enc, head = Net(reentrant=False), Net(reentrant=True)
teacher = nn.Linear(WIDTH, WIDTH)  # inference only
scripted = torch.jit.script(nn.Linear(WIDTH, 1))  # TorchScript: no Python hooks run on it
opt_enc = torch.optim.SGD(enc.parameters(), lr=0.1)
opt_head = torch.optim.AdamW(list(head.parameters()) + list(scripted.parameters()))
for i in range(5):
    x = torch.randn(4, WIDTH)
    with torch.no_grad():
        target = teacher(x).sum(1, keepdim=True)
    loss = (scripted(head(enc(x))) - target).pow(2).mean()
    loss.backward()
    opt_enc.step()
    opt_head.step()
    opt_enc.zero_grad()
    opt_head.zero_grad()
    print(f"{i} {loss.item():.8f}")
print("post hooks called", len(steps_seen))
sys.stdout.flush()
sys.stdout = open(os.devnull, "w")  # a script that swaps its stdout and closes it at the end
sys.stdout.close()
"""


def test_a_real_world_mix_trains_identically_and_is_reported(tmp_path):
    # Two models with their own optimizers, the script's own global optimizer
    # hook, checkpointed blocks (both kinds), a teacher under no_grad, a
    # TorchScript layer, a symlinked script importing a sibling, a closed stdout.
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "helpers.py").write_text("WIDTH = 8\n")
    (pkg / "train.py").write_text(REAL_WORLD_MIX)
    (tmp_path / "link").mkdir()
    script = tmp_path / "link" / "train.py"
    script.symlink_to(pkg / "train.py")
    from support import run_both

    out = tmp_path / "r.json"
    got, plain = run_both(["--json", out, script], [script], tmp_path)
    assert plain.returncode == 0, plain.stderr.decode()
    assert got.returncode == 0, got.stderr.decode()
    assert got.stdout == plain.stdout  # same losses, same hook calls
    assert b"Traceback" not in got.stderr
    report = read_json(out)
    models = {m["name"]: m for m in report["models"]}
    assert {"enc", "head", "teacher", "scripted"} <= set(models)
    for name in ("enc", "head"):
        steps = models[name]["memory"]["steps"]
        assert len(steps) == 3 and all(s["complete"] and s["optimizer_steps"] == 1 for s in steps)
    assert not models["teacher"]["memory"]["steps"]
    assert any("TorchScript" in n for n in models["scripted"]["memory"]["notes"])

    stopped = run_profiler(["--steps", "2", "--stop-after-steps", script], tmp_path)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.count("\n") < plain.stdout.decode().count("\n")  # the teacher did not keep it running


@pytest.mark.parametrize("steps_per_fold", [4, 2])
def test_a_model_per_fold_is_let_go_once_measured(tmp_path, steps_per_fold, run):
    # K-fold or a sweep: each fold's model must be freed when the script drops
    # it, or a GPU run ends out of memory a few folds in. With exactly --steps
    # steps per fold no forward follows the last measured one: measuring ends
    # at that step's optimizer.step().
    script = tmp_path / "kfold.py"
    script.write_text(
        textwrap.dedent(
            f"""
        import gc, weakref
        import torch
        from torch import nn
        refs = []
        for fold in range(3):
            model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 1))
            opt = torch.optim.AdamW(model.parameters())
            for step in range({steps_per_fold}):
                model(torch.randn(4, 8)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
            refs.append(weakref.ref(model))
            del model, opt
            gc.collect()
            print("folds alive:", sum(r() is not None for r in refs))
        """
        )
    )
    out = tmp_path / "r.json"
    proc = run(["--steps", "2", "--json", out, script], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["folds alive: 0"] * 3
    models = read_json(out)["models"]
    # Each found as the script's `model` (its name when it was found: the name is rebound per fold).
    assert [m["name"] for m in models] == ["model", "model#2", "model#3"]
    assert all(len(m["memory"]["steps"]) == 2 and m["memory"]["optimizer"] == "AdamW" for m in models)


def test_a_lazy_model_is_measured_once_it_has_shapes(tmp_path, run):
    script = tmp_path / "lazy.py"
    script.write_text(
        textwrap.dedent(
            """
        import torch
        from torch import nn
        model = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.LazyLinear(1))
        model(torch.randn(1, 8))  # the first call gives the layers their shapes
        opt = torch.optim.AdamW(model.parameters())
        for step in range(4):
            model(torch.randn(4, 8)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        print(type(__builtins__).__name__)  # as under plain python: the builtins module
        """
        )
    )
    out = tmp_path / "r.json"
    proc = run(["--steps", "2", "--json", out, script], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "module"
    (model,) = read_json(out)["models"]
    assert model["parameters"]["total"] == 8 * 16 + 16 + 16 + 1
    assert len(model["memory"]["steps"]) == 2


def test_a_model_with_a_lazy_part_that_never_runs_is_found_and_measured(tmp_path, run):
    # The unused lazy layer never gets a shape: the model is found at its
    # second call all the same, and the layer is named, not counted.
    script = tmp_path / "lazy_unused.py"
    script.write_text(
        textwrap.dedent(
            """
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.unused, self.b = nn.Linear(8, 16), nn.LazyLinear(4), nn.Linear(16, 1)

            def forward(self, x):
                return self.b(torch.relu(self.a(x)))

        model = Net()
        opt = torch.optim.AdamW([p for n, p in model.named_parameters() if not n.startswith("unused")])
        for step in range(4):
            model(torch.randn(4, 8)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        """
        )
    )
    out = tmp_path / "r.json"
    proc = run(["--steps", "2", "--json", out, script], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "2 lazy parameter(s) not initialised yet" in proc.stderr
    (model,) = read_json(out)["models"]
    trained = 8 * 16 + 16 + 16 + 1
    assert model["parameters"]["total"] == trained
    assert model["parameters"]["uninitialized"] == ["unused.weight", "unused.bias"]
    steps = model["memory"]["steps"]
    assert len(steps) == 2
    assert all(
        s["categories"]["gradients"] == trained * 4 and s["categories"]["optimizer_state"] == 2 * trained * 4 + 4 * 4
        for s in steps
    )


def test_lbfgs_first_step_under_the_runner_is_one_step(tmp_path, run):
    # The model is first called inside LBFGS's step(closure): measuring begins
    # in that step, and its closure evaluations still make one step.
    script = tmp_path / "lbfgs.py"
    script.write_text(
        textwrap.dedent(
            """
        import torch
        from torch import nn
        model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        opt = torch.optim.LBFGS(model.parameters(), max_iter=4)
        x, y = torch.randn(16, 8), torch.randn(16, 1)

        def closure():
            opt.zero_grad()
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            return loss

        for _ in range(3):
            opt.step(closure)
        """
        )
    )
    out = tmp_path / "r.json"
    proc = run(["--steps", "2", "--json", out, script], tmp_path)
    assert proc.returncode == 0, proc.stderr
    (model,) = read_json(out)["models"]
    steps = model["memory"]["steps"]
    assert model["memory"]["optimizer"] == "LBFGS"
    assert [s["optimizer_steps"] for s in steps] == [1, 1]
    assert all(s["forwards"] == s["backwards"] > 1 and not s["optimizer_skipped"] for s in steps)


def test_a_script_that_profiles_itself_gets_the_same_activations_from_both(tmp_path, run):
    # Two trackers on one model: the script's `with profile(model)` and the runner's.
    script = tmp_path / "self_profiled.py"
    script.write_text(
        textwrap.dedent(
            """
        import torch
        from torch import nn
        from profiler import profile
        model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 1))
        opt = torch.optim.AdamW(model.parameters())
        with profile(model, sample_interval=None) as prof:
            for step in range(3):
                model(torch.randn(4, 8)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
        print([s["categories"]["activations"] for s in prof.to_dict()["models"][0]["memory"]["steps"]])
        """
        )
    )
    out = tmp_path / "r.json"
    proc = run(["--steps", "3", "--no-sampler", "--json", out, script], tmp_path)
    assert proc.returncode == 0, proc.stderr
    (model,) = read_json(out)["models"]
    ours = [s["categories"]["activations"] for s in model["memory"]["steps"]]
    assert proc.stdout.strip() == str(ours)
    assert ours[0] > 0


def test_a_model_trained_fewer_steps_than_asked_is_said_so_and_freed(tmp_path, run):
    script = tmp_path / "short_folds.py"
    script.write_text(
        textwrap.dedent(
            """
        import gc, weakref
        import torch
        from torch import nn
        refs = []
        for fold in range(2):
            model = nn.Linear(8, 1)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            for step in range(2):
                model(torch.randn(4, 8)).sum().backward()
                opt.step()
                opt.zero_grad()
            refs.append(weakref.ref(model))
            del model, opt
            gc.collect()
            print("folds alive:", sum(r() is not None for r in refs))
        """
        )
    )
    out = tmp_path / "r.json"
    proc = run(["--steps", "3", "--no-sampler", "--json", out, script], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["folds alive: 0"] * 2  # as in a plain run
    assert "model, model#2 completed fewer than 3 training step(s)" in proc.stderr
    models = read_json(out)["models"]
    assert [len(m["memory"]["steps"]) for m in models] == [2, 2]
    assert all(m["memory"]["steps"][-1]["categories"]["gradients"] == 36 for m in models)


def test_a_model_can_be_copied_saved_and_scripted_while_it_is_measured(tmp_path, run):
    script = tmp_path / "snapshots.py"
    script.write_text(
        textwrap.dedent(
            """
        import copy, io
        import torch
        from torch import nn
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        teacher = nn.Linear(4, 2)  # evaluated only: measured for the whole run
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(2):
            with torch.no_grad():
                teacher(torch.randn(3, 4))
            model(torch.randn(3, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
            best = copy.deepcopy(model)
            buffer = io.BytesIO()
            torch.save(teacher, buffer)
            torch.jit.script(model)
            print("copied", torch.equal(best[0].weight, model[0].weight), buffer.tell() > 0)
        """
        )
    )
    out = tmp_path / "r.json"
    proc = run(["--steps", "3", "--no-sampler", "--json", out, script], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["copied True True"] * 2
    models = {m["name"]: m for m in read_json(out)["models"]}
    assert len(models["model"]["memory"]["steps"]) == 2 and models["teacher"]["memory"]["steps"] == []


def test_models_evaluated_and_dropped_are_freed_and_reported(tmp_path, run):
    # An evaluation loop over checkpoints: a model never trained used to be kept
    # by its tracker until the script ended (on a GPU, an out-of-memory error
    # a few checkpoints in). The estimates of a dropped transformer still read
    # its head count, taken when it was found.
    script = tmp_path / "evaluate.py"
    script.write_text(
        textwrap.dedent(
            f"""
        import gc, sys, weakref
        import torch
        sys.path.insert(0, {str(EXAMPLES)!r})
        from nanogpt import GPT, GPTConfig
        refs = []
        for seed in range(3):
            torch.manual_seed(seed)
            model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0))
            with torch.no_grad():
                model(torch.randint(0, 64, (2, 8)))
            refs.append(weakref.ref(model))
            del model
            gc.collect()
            print("alive:", sum(r() is not None for r in refs))

        def train_briefly():
            model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0))
            opt = torch.optim.AdamW(model.parameters())
            x = torch.randint(0, 64, (2, 8))
            for _ in range(2):
                logits, loss = model(x, x)
                loss.backward()
                opt.step()
                opt.zero_grad()
            return weakref.ref(model)

        trained = train_briefly()
        gc.collect()
        print("trained alive:", trained() is not None)
        """
        )
    )
    out = tmp_path / "r.json"
    proc = run(["--steps", "3", "--no-sampler", "--json", out, script], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["alive: 0"] * 3 + ["trained alive: False"]
    models = read_json(out)["models"]
    assert len(models) == 4
    assert all(m["memory"]["steps"] == [] for m in models[:3])
    trained = models[3]
    assert len(trained["memory"]["steps"]) == 2
    assert trained["estimates"]["shape"]["heads"] == 4 and trained["estimates"]["shape"]["seq"] == 8


def test_a_part_run_alone_first_does_not_take_the_models_activations(tmp_path, run):
    # The flattened size found by running self.features on a dummy input in
    # __init__: features looked like a model of its own at that call.
    script = tmp_path / "probe.py"
    script.write_text(
        textwrap.dedent(
            """
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
                with torch.no_grad():
                    n_flat = self.features(torch.zeros(1, 3, 8, 8)).numel()
                self.classifier = nn.Linear(n_flat, 10)

            def forward(self, x):
                return self.classifier(self.features(x).flatten(1))

        model = Net()
        opt = torch.optim.AdamW(model.parameters())
        for step in range(3):
            nn.functional.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.randint(0, 10, (4,))).backward()
            opt.step()
            opt.zero_grad()
        """
        )
    )
    out = tmp_path / "r.json"
    proc = run(["--steps", "2", "--no-sampler", "--json", out, script], tmp_path)
    assert proc.returncode == 0, proc.stderr
    (model,) = read_json(out)["models"]
    rows = {r["path"] for r in model["memory"]["activations_by_module"]}
    assert {"features.0", "features.1", "features.2", "classifier"} <= rows  # the features' saves are the model's
    # conv input 4x3x8x8, ReLU output 4x8x8x8 (saved by ReLU and the pool), pool indices (int64), classifier input.
    acts = model["memory"]["steps"][-1]["categories"]["activations"]
    assert acts >= 4 * 3 * 8 * 8 * 4 + 4 * 8 * 8 * 8 * 4 + 4 * 128 * 4


def test_a_replaced_optimizer_is_freed_and_the_new_one_measured(tmp_path, run):
    script = tmp_path / "switch.py"
    script.write_text(
        textwrap.dedent(
            """
        import gc, weakref
        import torch
        from torch import nn
        model = nn.Linear(32, 32)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(4):
            if step == 2:
                old = weakref.ref(opt)
                opt = torch.optim.AdamW(model.parameters())
                gc.collect()
                print("old optimizer alive:", old() is not None)
            model(torch.randn(4, 32)).sum().backward()
            opt.step()
            opt.zero_grad()
        """
        )
    )
    out = tmp_path / "r.json"
    proc = run(["--steps", "4", "--no-sampler", "--json", out, script], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "old optimizer alive: False"
    (model,) = read_json(out)["models"]
    trained = (32 * 32 + 32) * 4
    assert [s["categories"]["optimizer_state"] for s in model["memory"]["steps"]] == [
        0,
        0,
        2 * trained + 2 * 4,
        2 * trained + 2 * 4,
    ]
    assert any("SGD, then AdamW" in n for n in model["memory"]["notes"])


def test_a_frozen_teacher_run_with_gradients_on_is_not_training(tmp_path, run):
    script = tmp_path / "distill.py"
    script.write_text(
        textwrap.dedent(
            """
        import torch
        from torch import nn
        teacher = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)).requires_grad_(False)
        student = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
        opt = torch.optim.AdamW(student.parameters())
        for step in range(3):
            x = torch.randn(8, 16)
            target = teacher(x)  # no torch.no_grad(): a common slip, harmless here
            nn.functional.mse_loss(student(x), target).backward()
            opt.step()
            opt.zero_grad()
        """
        )
    )
    out = tmp_path / "r.json"
    proc = run(["--steps", "2", "--no-sampler", "--json", out, script], tmp_path)
    assert proc.returncode == 0, proc.stderr
    models = {m["name"]: m for m in read_json(out)["models"]}
    assert models["teacher"]["memory"]["steps"] == []
    steps = models["student"]["memory"]["steps"]
    # Linear input 8x16, ReLU output 8x8 (ReLU and Linear 2), and the loss's two 8x4 inputs.
    assert [s["categories"]["activations"] for s in steps] == [(8 * 16 + 8 * 8 + 2 * 8 * 4) * 4] * 2
    assert "held until the script ended" not in proc.stderr


def test_a_model_traced_while_it_is_measured_leaves_the_report_whole(tmp_path, run):
    # torch.jit.trace runs the model with gradients on: not a training step,
    # and its symbolic sizes must not reach the JSON.
    script = tmp_path / "trace.py"
    script.write_text(
        textwrap.dedent(
            """
        import torch
        from torch import nn
        model = nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(3, 4)
        model(x).sum().backward()
        opt.step()
        traced = torch.jit.trace(model, x)
        print("traced", type(traced).__name__)
        """
        )
    )
    out = tmp_path / "r.json"
    proc = run(["--steps", "3", "--no-sampler", "--json", out, script], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "traced TopLevelTracedModule\n"
    (model,) = read_json(out)["models"]
    assert [(s["forwards"], s["input_shape"]) for s in model["memory"]["steps"]] == [(1, [3, 4])]


EVALUATED_WITH_GRADIENTS_ON = """
import copy
import torch
from torch import nn
from torch.nn import functional as F
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 500))
other = copy.deepcopy(model)  # an EMA copy, a teacher only put in .eval(): parameters that require grad
opt = torch.optim.AdamW(model.parameters())
print(tuple(other(torch.randn(2, 16)).shape))  # a shape check on the other model, gradients on
for step in range(4):
    x, y = torch.randn(8, 16), torch.randint(0, 500, (8,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    target = other(x).detach()  # a teacher's output, detached: its graph is freed at once
    kept = F.cross_entropy(other(x), y)  # an evaluation loss kept in a variable: its graph lives on
    print(step, round(kept.item(), 4))
"""


def test_models_run_with_gradients_on_but_never_trained_take_nothing_from_the_trained_one(tmp_path, run):
    # The other model's open "step" kept its saved-tensor hooks on the stack: the
    # trained model's loss went to it (2 KiB measured where 16 KiB were saved),
    # and with --stop-after-steps the script never stopped.
    script = tmp_path / "ema_eval.py"
    script.write_text(EVALUATED_WITH_GRADIENTS_ON)
    out = tmp_path / "r.json"
    proc = run(["--steps", "2", "--no-sampler", "--json", out, script], tmp_path)
    assert proc.returncode == 0, proc.stderr
    models = {m["name"]: m for m in read_json(out)["models"]}
    # Linear input 8x16, ReLU output 8x64 (ReLU and Linear 2), the loss's log-softmax 8x500, its targets
    # (8 int64) and nll_loss's total weight (one fp32).
    expected = (8 * 16 + 8 * 64 + 8 * 500 + 1) * 4 + 8 * 8
    assert [s["categories"]["activations"] for s in models["model"]["memory"]["steps"]] == [expected] * 2
    other = models["other"]["memory"]
    assert other["steps"] == []
    assert any("forward(s) with gradients on but no backward" in n for n in other["notes"])
    assert any("no backward went through any of its forwards" in n for n in other["notes"])
    assert "other completed fewer than" not in proc.stderr

    stopped = run(["--steps", "1", "--stop-after-steps", "--no-sampler", "-q", script], tmp_path, timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.splitlines() == ["(2, 500)"]  # stopped at the first module call after the step


GAN_ONE_STEP = """
import torch
from torch import nn
torch.manual_seed(0)
G = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16))
D = nn.Sequential(nn.Linear(16, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
opt_g, opt_d = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
bce = nn.BCEWithLogitsLoss()
for step in range(20):
    real, z = torch.randn(4, 16), torch.randn(4, 8)
    fake = G(z)
    loss_d = bce(D(real), torch.ones(4, 1)) + bce(D(fake.detach()), torch.zeros(4, 1))
    opt_d.zero_grad(); loss_d.backward(); opt_d.step()
    loss_g = bce(D(fake), torch.ones(4, 1))
    opt_g.zero_grad(); loss_g.backward(); opt_g.step()
    print(step)
"""


def test_stop_after_one_step_waits_for_the_other_model_of_a_gan(tmp_path, run):
    # D's one step ends while G's forward has run and its backward has not: G
    # is not "never trained", and is measured before the script is stopped.
    script = tmp_path / "gan.py"
    script.write_text(GAN_ONE_STEP)
    out = tmp_path / "r.json"
    proc = run(["--steps", "1", "--stop-after-steps", "--no-sampler", "--json", out, script], tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0"]
    models = {m["name"]: m for m in read_json(out)["models"]}
    for name in ("G", "D"):
        (step,) = models[name]["memory"]["steps"]
        assert step["complete"] and step["optimizer_steps"] == 1, name


N_CRITIC = """
import torch
from torch import nn
torch.manual_seed(0)
G = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16))
D = nn.Sequential(nn.Linear(16, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
opt_g, opt_d = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
for step in range(20):
    for _ in range(2):  # two critic steps per generator step
        with torch.no_grad():
            fake = G(torch.randn(4, 8))
        loss_d = D(fake).mean() - D(torch.randn(4, 16)).mean()
        opt_d.zero_grad(); loss_d.backward(); opt_d.step()
    loss_g = -D(G(torch.randn(4, 8))).mean()
    opt_g.zero_grad(); loss_g.backward(); opt_g.step()
    print(step)
"""


def test_a_model_that_trains_only_after_the_stop_is_named(tmp_path, run):
    # The critic's one step is done before the generator has trained at all: the
    # stop does not wait for it (it cannot know it will), and the report says so.
    script = tmp_path / "n_critic.py"
    script.write_text(N_CRITIC)
    out = tmp_path / "r.json"
    proc = run(["--steps", "1", "--stop-after-steps", "--no-sampler", "--json", out, script], tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert any("G had no training step before the stop" in n for n in read_json(out)["notes"])


GAN_SAMPLING = """
# A DCGAN-shaped loop that renders samples from fixed noise every other iteration, with gradients
# on and never backpropagated (the output kept until the next render); the truth of each model's
# steps from an independent walk of the autograd graph.
import json, sys
sys.path.insert(0, {tests!r})
import torch
from torch import nn
from autograd_walk import graph_saved_bytes

torch.manual_seed(0)
netG = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 128), nn.Tanh())
netD = nn.Sequential(nn.Linear(128, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1))
crit = nn.BCEWithLogitsLoss()
optD = torch.optim.Adam(netD.parameters(), lr=2e-4)
optG = torch.optim.Adam(netG.parameters(), lr=2e-4)
fixed_noise = torch.randn(8, 16)
truth = {{"netD": [], "netG": [], "sample": None}}
for i in range(6):
    real = torch.randn(32, 128)
    netD.zero_grad()
    err_real = crit(netD(real), torch.ones(32, 1))
    d_real = graph_saved_bytes(err_real, netD)
    err_real.backward()
    fake = netG(torch.randn(32, 16))
    truth["netG"].append(graph_saved_bytes(fake, netG))
    err_fake = crit(netD(fake.detach()), torch.zeros(32, 1))
    truth["netD"].append(max(d_real, graph_saved_bytes(err_fake, netD)))  # one pass after the other
    err_fake.backward()
    optD.step()
    netG.zero_grad()
    crit(netD(fake), torch.ones(32, 1)).backward()  # through D too; D's gradients are cleared unused
    optG.step()
    if i % 2 == 0:
        sample = netG(fixed_noise)
        truth["sample"] = graph_saved_bytes(sample, netG)
json.dump(truth, open("truth.json", "w"))
"""


def test_a_gan_rendering_samples_gets_each_models_steps_exact(tmp_path, run):
    # The sampling forward's pair once sat above D's, so D's later steps read 0 B and its saves went
    # to G's left-out forward; D's forward in G's step was a step of D's of its own.
    script = tmp_path / "gan.py"
    script.write_text(GAN_SAMPLING.format(tests=str(Path(__file__).parent)))
    out = tmp_path / "r.json"
    proc = run(["--steps", "5", "--no-sampler", "--json", out, script], tmp_path)
    assert proc.returncode == 0, proc.stderr
    truth = read_json(tmp_path / "truth.json")
    models = {m["name"]: m["memory"] for m in read_json(out)["models"]}
    for name in ("netD", "netG"):
        steps = models[name]["steps"]
        assert [s["categories"]["activations"] for s in steps] == truth[name][:5], name
        assert all(s["optimizer_steps"] == 1 and s["complete"] for s in steps), name
    # G's sampling forwards are left out of the steps they came in, with exactly what they saved.
    assert [s["activations_left_out"] for s in models["netG"]["steps"]] == [0, truth["sample"], 0, truth["sample"], 0]
    # D's passes in G's steps train nothing: left out, and said.
    assert models["netD"]["backward_passes_discarded"] == 4
    assert any("cleared without an optimizer step" in n for n in models["netD"]["notes"])
