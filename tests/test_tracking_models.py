"""Measured training steps of random module stacks and of small hand-written models, each
checked against counts made without the profiler's hooks.

* a hypothesis property over random MLP / residual stacks (optionally with
  attention, by hand or SDPA) with optional ties of the first Embedding and the
  last Linear, a module called twice, LayerNorm / GELU / Tanh / Dropout(p=0),
  a frozen first layer, SGD or AdamW, the loss computed outside the model;
* a container that saves on both sides of its trunk; tensors a custom
  ``autograd.Function`` keeps on its ``ctx``.

(Real transformers architectures are in ``test_transformers_models.py``.)

The reference for activations is a walk of the autograd graph of the loss,
made right after the forward (before backward) of the same step: it reads the
nodes' ``_saved_*`` attributes (and a custom Function's ``saved_tensors``),
deduplicates storages and leaves the parameters' storage out. It leaves out
autograd's wrapped Python scalars too (``x * 0.5`` saves ``0.5`` as a 0-dim
CPU double): PyTorch never hands those to saved-tensor hooks and they are
host memory even on a GPU; ``test_python_scalars_saved_by_autograd_are_not_activations``
pins that down.
"""

from __future__ import annotations

import torch
from autograd_walk import graph_saved, graph_saved_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import assert_no_hooks, memory, nbytes, rows_by_bucket, timeline_sum, unique_param_bytes, unique_params
from torch import nn

from profiler import profile
from profiler.tracking import OUTSIDE


def test_python_scalars_saved_by_autograd_are_not_activations():
    """``x * 0.5`` saves 0.5 as a wrapped 0-dim double, which saved-tensor hooks never see.

    It is host memory (on CUDA too) of 8 bytes: leaving it out is right, and the
    walk above leaves it out the same way. Here it is counted separately to show
    that it is the only difference.
    """

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)

        def forward(self, x):
            return self.b(self.a(x) * 0.5) * 3.0

    model = Scaled()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with profile(model, sample_interval=None) as prof:
        loss = model(torch.randn(4, 8)).square().sum()
        saved, scalars = graph_saved(loss, model)
        loss.backward()
        opt.step()
    assert scalars == 2 * 8
    assert memory(prof)["steps"][0]["categories"]["activations"] == saved


def test_a_container_saving_on_both_sides_of_the_trunk_is_labelled_consistently():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.h = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            h = self.emb(x).tanh()  # the root itself saves tanh's output before the trunk ...
            for block in self.h:
                h = block(h)
            return self.head(h.tanh())  # ... and again after it

    model = Wrapper()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with profile(model, sample_interval=None) as prof:
        loss = model(torch.randint(0, 10, (4,))).sum()
        expected = graph_saved_bytes(loss, model)
        loss.backward()
        opt.step()
    mem = memory(prof)
    step = mem["steps"][0]
    assert step["categories"]["activations"] == expected  # the totals are right ...
    tanh_out = 4 * 8 * 4
    assert step["activations_by_bucket"]["head"] == tanh_out  # ... and so is the split by bucket,
    # and so are the rows: the root has one row per bucket it saved in (it once had a
    # single row labelled with the bucket of its first save: 256 bytes of "embedding").
    root = {r["bucket"]: r["bytes"] for r in mem["activations_by_module"] if r["path"] == ""}
    assert root == {"embedding": tanh_out, "head": tanh_out}
    assert rows_by_bucket(mem["activations_by_module"]) == step["activations_by_bucket"]


# ----------------------------------------------------------------------------- random stacks (hypothesis)


class Attention(nn.Module):
    """Single-head self-attention over the sequence: by hand (softmax of scaled scores) or SDPA."""

    def __init__(self, width: int, how: str):
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.how = how

    def forward(self, x):
        if x.dim() < 3:  # no sequence: nothing to attend over
            return x
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.how == "sdpa":
            y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / q.shape[-1] ** 0.5)  # a Python scalar: wrapped
            y = scores.softmax(dim=-1) @ v
        return x + self.out(y)


class Residual(nn.Module):
    def __init__(self, width: int, hidden: int, norm: bool, act: str, dropout: bool, attn: str | None = None):
        super().__init__()
        self.attn = Attention(width, attn) if attn else nn.Identity()
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.up = nn.Linear(width, hidden)
        self.act = nn.GELU() if act == "gelu" else nn.Tanh()
        self.drop = nn.Dropout(0.0) if dropout else nn.Identity()
        self.down = nn.Linear(hidden, width)

    def forward(self, x):
        x = self.attn(x)
        return x + self.drop(self.down(self.act(self.up(self.norm(x)))))


class RandomStack(nn.Module):
    """Embedding or features -> MLP or residual trunk (attention optional) -> [shared layer, twice] -> head."""

    def __init__(self, spec: dict):
        super().__init__()
        widths = spec["widths"]
        self.tokens = spec["vocab"] is not None
        self.embed = nn.Embedding(spec["vocab"], widths[0]) if self.tokens else None
        if spec["kind"] == "mlp":
            layers: list[nn.Module] = []
            for a, b in zip(widths, widths[1:]):
                layers.append(nn.Linear(a, b, bias=spec["bias"]))
                if spec["norm"]:
                    layers.append(nn.LayerNorm(b))
                layers.append(nn.GELU() if spec["act"] == "gelu" else nn.Tanh())
                if spec["dropout"]:
                    layers.append(nn.Dropout(0.0))
            self.body = nn.Sequential(*layers)
        else:
            self.body = nn.ModuleList(
                Residual(widths[0], spec["hidden"], spec["norm"], spec["act"], spec["dropout"], spec["attn"])
                for _ in range(spec["depth"])
            )
        last = widths[-1]
        self.twice = nn.Linear(last, last) if spec["twice"] else None
        out = spec["vocab"] if self.tokens else spec["out"]
        self.head = nn.Linear(last, out, bias=spec["bias"] and not spec["tie"])
        if spec["tie"]:
            assert self.head.weight.shape == self.embed.weight.shape
            self.head.weight = self.embed.weight

    def forward(self, x):
        h = self.embed(x) if self.tokens else x
        if isinstance(self.body, nn.ModuleList):
            for block in self.body:
                h = block(h)
        else:
            h = self.body(h)
        if self.twice is not None:
            h = self.twice(torch.tanh(self.twice(h)))
        return self.head(h)


@st.composite
def stacks(draw):
    kind = draw(st.sampled_from(["mlp", "residual"]))
    tokens = draw(st.booleans())
    tie = tokens and draw(st.booleans())
    width0 = draw(st.integers(2, 12))
    if kind == "mlp":
        # Widths of at least 2: a LayerNorm over one feature outputs a constant,
        # which can leave the whole model without a gradient (nothing to train).
        middle = draw(st.lists(st.integers(2, 12), min_size=0, max_size=3))
        widths = [width0, *middle, width0] if tie else [width0, *middle, draw(st.integers(2, 12))]
    else:
        widths = [width0]
    spec = {
        "kind": kind,
        "vocab": draw(st.integers(2, 20)) if tokens else None,
        "widths": widths,
        "depth": draw(st.integers(1, 4)),
        "hidden": draw(st.integers(1, 16)),
        "norm": draw(st.booleans()),
        "act": draw(st.sampled_from(["gelu", "tanh"])),
        "dropout": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "tie": tie,
        "twice": draw(st.booleans()),
        "out": draw(st.integers(1, 6)),
        "freeze_first": draw(st.booleans()),
        "optimizer": draw(st.sampled_from(["sgd", "adamw"])),
        "batch": draw(st.integers(1, 5)),
        "seq": draw(st.one_of(st.none(), st.integers(1, 6))),
        "seed": draw(st.integers(0, 2**16)),
    }
    # Attention only where there is a sequence (an unused layer would have no gradient).
    spec["attn"] = draw(st.sampled_from([None, "manual", "sdpa"])) if spec["seq"] is not None else None
    return spec


def _first_layer(model: RandomStack) -> nn.Module:
    if model.embed is not None:
        return model.embed
    return model.body[0] if len(model.body) else model.head


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stacks())
def test_random_stacks_one_step(spec):
    torch.manual_seed(spec["seed"])
    model = RandomStack(spec)
    if spec["freeze_first"]:
        for p in _first_layer(model).parameters():
            p.requires_grad_(False)  # with a tie this freezes the head as well
    trainable = unique_params(p for p in model.parameters() if p.requires_grad)
    assert trainable  # the head, or with a frozen tied head the body, still trains
    before = {id(p): p.detach().clone() for p in model.parameters()}
    if spec["optimizer"] == "sgd":
        opt = torch.optim.SGD(trainable, lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.AdamW(trainable, lr=1e-2)

    shape = (spec["batch"],) if spec["seq"] is None else (spec["batch"], spec["seq"])
    if model.tokens:
        x = torch.randint(0, spec["vocab"], shape)
    else:
        x = torch.randn(*shape, spec["widths"][0])
    with profile(model, sample_interval=None) as prof:
        out = model(x)
        if model.tokens:
            target = torch.randint(0, spec["vocab"], shape)
            loss = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))
        else:
            loss = nn.functional.mse_loss(out, torch.randn_like(out))
        expected = graph_saved_bytes(loss, model)
        loss.backward()
        grads = {id(p): p.grad.detach().clone() for p in trainable if p.grad is not None}
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert_no_hooks(model)

    mem = memory(prof)
    (step,) = mem["steps"]
    cat = step["categories"]
    assert step["complete"] and step["kind"] == "first"
    assert cat["activations"] == expected
    assert sum(step["activations_by_bucket"].values()) == cat["activations"]
    rows = mem["activations_by_module"]  # a path may have one row per bucket
    assert sum(r["bytes"] for r in rows) == cat["activations"]
    assert {r["path"] for r in rows} <= set(dict(model.named_modules())) | {OUTSIDE}
    assert sum(r["bytes"] for r in rows if r["path"] == OUTSIDE) > 0  # the loss is computed in the script
    assert rows_by_bucket(mem["activations_by_module"]) == step["activations_by_bucket"]
    assert timeline_sum(step, "activations") == cat["activations"]
    assert cat["parameters"] == unique_param_bytes(model)
    assert cat["gradients"] == nbytes(trainable)
    assert timeline_sum(step, "gradients") == cat["gradients"]
    if spec["optimizer"] == "adamw":
        state = step["optimizer_state"]["by_name"]
        assert state["exp_avg"] == state["exp_avg_sq"] == nbytes(trainable)
    else:
        assert step["optimizer_state"]["by_name"]["momentum_buffer"] == nbytes(trainable)
    # The model trained: each weight took the optimizer's step from its gradient; frozen ones did not move.
    assert grads and set(grads) <= {id(p) for p in trainable}
    for p in model.parameters():
        old, new = before[id(p)], p.detach()
        if not p.requires_grad:
            assert torch.equal(old, new)
        elif spec["optimizer"] == "sgd":  # first step with momentum: the buffer is the gradient
            torch.testing.assert_close(new, old - 0.1 * grads[id(p)], rtol=0, atol=1e-6)
        elif bool((grads[id(p)].abs() > 1e-6).any()):  # Adam's first step moves by about lr where |grad| >> eps
            assert not torch.equal(old, new)
    assert (
        any(not torch.equal(before[id(p)], p.detach()) for p in trainable)
        or max(float(g.abs().max()) for g in grads.values()) < 1e-6
    )


class _MaskedScale(torch.autograd.Function):
    """Keeps its mask on ctx itself, as older custom ops do, and one tensor the usual way."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.mask = x > 0
        ctx.save_for_backward(scale)
        return x * ctx.mask * scale

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        return grad * ctx.mask * scale, None


class _MaskedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 1)
        self.scale = nn.Parameter(torch.ones(32), requires_grad=False)

    def forward(self, x):
        return self.fc2(_MaskedScale.apply(self.fc1(x), self.scale))


def test_tensors_a_custom_function_keeps_on_ctx_are_activations():
    from autograd_walk import graph_saved_bytes

    from profiler.tracking.ledger import CTX_PATH

    model = _MaskedNet()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(8, 16)
    truth = graph_saved_bytes(model(x).pow(2).mean(), model)
    with profile(model, sample_interval=None) as prof:
        for _ in range(2):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    step = prof.report.models[0].memory["steps"][-1]
    assert step["categories"]["activations"] == truth
    rows = {r["path"]: r["bytes"] for r in prof.report.models[0].memory["activations_by_module"]}
    assert rows[CTX_PATH] == 8 * 32  # the bool mask
