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

from profiler import profile

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


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


def assert_no_hooks(model: nn.Module) -> None:
    from torch.nn.modules import module as m
    from torch.optim import optimizer as o

    for mod in model.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks
    assert not m._global_forward_hooks and not m._global_forward_pre_hooks
    assert not o._global_optimizer_pre_hooks and not o._global_optimizer_post_hooks
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


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
