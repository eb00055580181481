"""Helpers shared by the test modules: tiny models and batches, independent checks, and running the command.

One module, imported by the tests that need it (``from support import ...``);
test modules never import each other.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from profiler import analyze, profile
from profiler.model import BUCKETS

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BENCHMARKS = ROOT / "benchmarks"


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (its own imports, such as ``common``, found beside it)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- models and steps
def _load_nanogpt():
    spec = importlib.util.spec_from_file_location("nanogpt_for_tracking", EXAMPLES / "nanogpt.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


NANOGPT = _load_nanogpt()


def tiny_gpt(**overrides) -> nn.Module:
    cfg = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True, tie_weights=True)
    cfg.update(overrides)
    torch.manual_seed(0)
    return NANOGPT.GPT(NANOGPT.GPTConfig(**cfg))


def batch(b: int = 2, t: int = 8, vocab: int = 64):
    x = torch.randint(0, vocab, (b, t))
    return x, torch.roll(x, -1, 1)


def unique_param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def train(model, opt, steps=3, **kw):
    losses = []
    for _ in range(steps):
        x, y = batch(**kw)
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return losses


def train_by_hand(model, steps, clear):
    """SGD written out in the loop, no optimizer step; ``clear`` drops the gradients."""
    for _ in range(steps):
        x, y = batch()
        _, loss = model(x, y)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.01 * p.grad
        clear()


def memory(prof) -> dict:
    return prof.to_dict()["models"][0]["memory"]


def unique_params(params) -> list[torch.Tensor]:
    return list({id(p): p for p in params}.values())


def nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in unique_params(params))


def trainable_bytes(model: nn.Module) -> int:
    return nbytes(p for p in model.parameters() if p.requires_grad)


def small_mlp() -> nn.Module:
    """A seeded two-layer MLP (8 -> 16 -> 4): the same weights at every call, for runs compared bit for bit."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))


def mse_steps(model: nn.Module, opt: torch.optim.Optimizer, n: int) -> list[float]:
    """``n`` steps of ``small_mlp`` on one fixed batch (zero_grad, MSE loss, backward, step): the losses."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 8, generator=gen), torch.randn(5, 4, generator=gen)
    losses = []
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def hook_state(model: nn.Module) -> tuple:
    """Every hook that could be ours: per module, per parameter, global, saved-tensor hooks."""
    from torch.nn.modules import module as m
    from torch.optim import optimizer as o

    return (
        tuple((id(mod), tuple(mod._forward_hooks), tuple(mod._forward_pre_hooks)) for mod in model.modules()),
        tuple((id(p), tuple(p._post_accumulate_grad_hooks or ())) for p in model.parameters()),
        tuple(m._global_forward_hooks),
        tuple(m._global_forward_pre_hooks),
        tuple(o._global_optimizer_pre_hooks),
        tuple(o._global_optimizer_post_hooks),
        torch._C._autograd._top_saved_tensors_default_hooks(False) is None,
    )


def assert_no_hooks(model: nn.Module, before: tuple | None = None) -> None:
    """No hook of the profiler is left: none at all, or exactly those that were there ``before``
    (transformers' gradient checkpointing puts a forward hook of its own on the input embedding)."""
    now = hook_state(model)
    if before is not None:
        assert now == before
        return
    mods, params, *globals_, saved_none = now
    assert all(not fh and not fph for _, fh, fph in mods)
    assert all(not hooks for _, hooks in params)
    assert not any(globals_)
    assert saved_none


def timeline_sum(step: dict, category: str) -> int:
    """What a step's timeline added to ``category`` (its growth events)."""
    tl = step["timeline"]
    return sum(d for c, d in zip(tl["category"], tl["delta"]) if c == category and d > 0)


def rows_by_bucket(rows: list[dict]) -> dict[str, int]:
    """The per-module activation rows added up under the bucket each row is labelled with."""
    out = dict.fromkeys(BUCKETS, 0)
    for r in rows:
        out[r["bucket"]] += r["bytes"]
    return out


def profile_lbfgs(steps: int = 2):
    """A tiny GPT trained ``steps`` LBFGS steps under profile(); the closure clears gradients first."""
    model = tiny_gpt()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=4)
    x, y = batch()

    def closure():
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        return loss

    with profile(model, sample_interval=None) as prof:
        for _ in range(steps):
            opt.step(closure)
    return model, prof


# --------------------------------------------------------------------------- the static count
def inventory_and_buckets(model):
    """``analyze(model)``'s inventory and buckets."""
    entry = analyze(model).models[0]
    return entry.inventory, entry.buckets


def unique_numel(model: nn.Module) -> int:
    """The independent count: one per Parameter object, whatever its names."""
    return sum(p.numel() for p in {id(p): p for _, p in model.named_parameters(remove_duplicate=False)}.values())


def alias_groups(model: nn.Module) -> list[set[str]]:
    """Every Parameter object reached by more than one name, with all its names."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return sorted((set(v) for v in names.values() if len(v) > 1), key=sorted)


def check_buckets(model, inv, b, expected_total: int) -> None:
    """What holds for every model: exact unique total, buckets sum to it, ties complete."""
    assert inv.total == expected_total
    assert inv.total == unique_numel(model)
    assert inv.total_with_duplicates == sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert set(b.totals) == set(BUCKETS)
    assert sum(b.totals.values()) == inv.total
    assert sorted((set(g.aliases) for g in inv.tie_groups), key=sorted) == alias_groups(model)
    for g in inv.tie_groups:
        assert set(g.aliases) <= set(b.alias_bucket)
        assert b.param_bucket[g.name] in BUCKETS


# --------------------------------------------------------------------------- python -m profiler in a subprocess
def env() -> dict[str, str]:
    """The environment of a child run: this checkout first on the path, offline, no start-up script."""
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [out.get("PYTHONPATH")])])
    out["HF_HUB_OFFLINE"] = "1"
    out["TRANSFORMERS_OFFLINE"] = "1"
    out.pop("PYTHONSAFEPATH", None)
    out.pop("PYTHONSTARTUP", None)
    return out


def start(cmd, cwd) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *map(str, cmd)], cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def finish(proc: subprocess.Popen, timeout: float = 180) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_profiler(args, cwd, timeout: float = 180) -> subprocess.CompletedProcess:
    return finish(start(["-m", "profiler", *args], cwd), timeout)


def run_both(profiler_args, python_args, cwd, timeout: float = 180):
    """``python -m profiler ...`` and plain ``python ...`` side by side (two cores, half the wait)."""
    procs = [start(["-m", "profiler", *profiler_args], cwd), start(python_args, cwd)]
    got, expected = (finish(p, timeout) for p in procs)
    return got, expected


def run_profiler_text(args, cwd, timeout: float = 180) -> subprocess.CompletedProcess:
    """``run_profiler``, with stdout and stderr as text."""
    proc = run_profiler(args, cwd, timeout)
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
    return proc


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


# --------------------------------------------------------------------------- python -m profiler in this interpreter
def run_in_process(args, cwd, capfd) -> subprocess.CompletedProcess:
    """``python -m profiler ARGS`` from ``cwd``, run by ``cli.main`` in this interpreter; output as text.

    A fraction of a second where a fresh interpreter spends two importing
    torch: for tests of what is measured. What only a real process shows
    (exit by a signal, stdout byte for byte beside plain Python, tracebacks,
    multiprocessing) is tested with ``run_profiler``. What a script leaves
    behind in the interpreter is undone: global module and optimizer hooks
    it registered, the modules it imported from its own folder, warning
    filters, grad mode and the default dtype.
    """
    import warnings

    from torch.nn.modules import module as module_hooks
    from torch.optim import optimizer as optimizer_hooks

    from profiler import cli

    hook_dicts = [
        module_hooks._global_forward_pre_hooks,
        module_hooks._global_forward_hooks,
        module_hooks._global_backward_pre_hooks,
        module_hooks._global_backward_hooks,
        optimizer_hooks._global_optimizer_pre_hooks,
        optimizer_hooks._global_optimizer_post_hooks,
    ]
    hooks_before = [set(d) for d in hook_dicts]
    modules_before, filters = set(sys.modules), warnings.filters[:]
    grad, dtype, cwd_before = torch.is_grad_enabled(), torch.get_default_dtype(), os.getcwd()
    capfd.readouterr()  # what came before is not this run's
    os.chdir(cwd)
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    finally:
        os.chdir(cwd_before)
        for hooks, before in zip(hook_dicts, hooks_before):
            for key in [k for k in hooks if k not in before]:
                del hooks[key]
        for name in set(sys.modules) - modules_before:
            if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(cwd)):
                del sys.modules[name]
        warnings.filters[:] = filters
        torch.set_grad_enabled(grad)
        torch.set_default_dtype(dtype)
    out = capfd.readouterr()
    return subprocess.CompletedProcess(["python", "-m", "profiler", *map(str, args)], code, out.out, out.err)
