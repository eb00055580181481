"""Measured training steps of real third-party architectures and of random module
stacks, each checked against counts made without the profiler's hooks.

* transformers models (GPT-2, BERT, T5, Llama, Mistral, OPT) built from tiny
  configs, no download, trained for two AdamW steps under ``profile()``, with
  both the eager and the SDPA attention (both match the independent count);
* GPT-2 with gradient checkpointing (HF's default, reentrant and non-reentrant)
  and with a frozen (possibly tied) embedding;
* a hypothesis property over random MLP / residual stacks (optionally with
  attention, by hand or SDPA) with optional ties of the first Embedding and the
  last Linear, a module called twice, LayerNorm / GELU / Tanh / Dropout(p=0),
  a frozen first layer, SGD or AdamW, the loss computed outside the model.

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

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from autograd_walk import graph_saved, graph_saved_bytes  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from profiler import profile  # noqa: E402
from profiler.tracking import OUTSIDE  # noqa: E402

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

BUCKETS = ("embedding", "block", "head", "other")

# ----------------------------------------------------------------------------- independent counts


def unique_params(params) -> list[torch.Tensor]:
    return list({id(p): p for p in params}.values())


def nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in unique_params(params))


def unique_param_bytes(model: nn.Module) -> int:
    return nbytes(model.parameters())


def trainable_bytes(model: nn.Module) -> int:
    return nbytes(p for p in model.parameters() if p.requires_grad)


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


def memory(prof) -> dict:
    return prof.to_dict()["models"][0]["memory"]


def timeline_sum(step: dict, category: str) -> int:
    tl = step["timeline"]
    return sum(d for c, d in zip(tl["category"], tl["delta"]) if c == category and d > 0)


# ----------------------------------------------------------------------------- transformers models

V, B, T, T_DEC = 99, 3, 10, 7


def _gpt2(attn: str, **kw) -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=2, attn_implementation=attn, **kw
    )
    return transformers.GPT2LMHeadModel(config)


def _bert(attn: str) -> nn.Module:
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=V,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    return transformers.BertForMaskedLM(config)


def _t5(attn: str) -> nn.Module:
    config = transformers.T5Config(
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        vocab_size=V,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        attn_implementation=attn,
    )
    return transformers.T5ForConditionalGeneration(config)


def _llama(attn: str) -> nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=V,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    return transformers.LlamaForCausalLM(config)


def _mistral(attn: str) -> nn.Module:
    config = transformers.MistralConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=V,
        max_position_embeddings=64,
        sliding_window=4,
        attn_implementation=attn,
    )
    return transformers.MistralForCausalLM(config)


def _opt(attn: str) -> nn.Module:
    config = transformers.OPTConfig(
        hidden_size=32,
        ffn_dim=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=V,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
        attn_implementation=attn,
    )
    return transformers.OPTForCausalLM(config)


def lm_batch() -> dict:
    ids = torch.randint(1, V, (B, T))
    return {"input_ids": ids, "labels": ids}


def seq2seq_batch() -> dict:
    return {"input_ids": torch.randint(1, V, (B, T)), "labels": torch.randint(1, V, (B, T_DEC))}


ARCHS = {
    "gpt2": (_gpt2, lm_batch),
    "bert": (_bert, lm_batch),
    "t5": (_t5, seq2seq_batch),
    "llama": (_llama, lm_batch),
    "mistral": (_mistral, lm_batch),
    "opt": (_opt, lm_batch),
}


def build(arch: str, attn: str = "sdpa", seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    model = ARCHS[arch][0](attn, **kw)
    model.train()  # dropout on, as in training (GPT-2, BERT, T5 and OPT have some by default)
    return model


def train_steps(model: nn.Module, make_batch, steps: int = 2, *, walk: bool = True, seed: int = 1):
    """``steps`` AdamW steps of ``model`` under ``profile()``; the graph walk of each step's loss."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    walks, losses = [], []
    torch.manual_seed(seed)
    hooks_before = hook_state(model)
    with profile(model, sample_interval=None) as prof:
        for _ in range(steps):
            out = model(**make_batch())
            if walk:
                walks.append(graph_saved_bytes(out.loss, model))
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(out.loss.detach())
    assert_no_hooks(model, hooks_before)
    return prof, opt, walks, losses


def train_plain(model: nn.Module, make_batch, steps: int = 2, seed: int = 1) -> list[torch.Tensor]:
    """The same loop without the profiler: the reference for 'training is unchanged'."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(seed)
    losses = []
    for _ in range(steps):
        out = model(**make_batch())
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.detach())
    return losses


def check_step(step: dict, model: nn.Module, expected_activations: int) -> None:
    """What every measured step of a transformers model must satisfy."""
    cat = step["categories"]
    train_bytes = trainable_bytes(model)
    n_trainable = len(unique_params(p for p in model.parameters() if p.requires_grad))
    assert step["complete"]
    assert (step["forwards"], step["backwards"], step["optimizer_steps"]) == (1, 1, 1)
    assert cat["parameters"] == unique_param_bytes(model)
    assert cat["gradients"] == train_bytes
    state = step["optimizer_state"]["by_name"]
    assert state["exp_avg"] == state["exp_avg_sq"] == train_bytes
    assert state["step"] == n_trainable * torch.tensor(0.0).element_size()
    assert cat["optimizer_state"] == sum(state.values())
    assert cat["autocast_copies"] == 0
    assert cat["activations"] == expected_activations
    by_bucket = step["activations_by_bucket"]
    assert set(by_bucket) == set(BUCKETS)
    assert sum(by_bucket.values()) == cat["activations"]
    assert by_bucket["block"] > 0
    assert by_bucket["block"] == max(by_bucket.values())
    # The timeline's growth events add up to the same totals.
    assert timeline_sum(step, "activations") == cat["activations"]
    assert timeline_sum(step, "gradients") == cat["gradients"]


def rows_by_bucket(rows: list[dict]) -> dict[str, int]:
    """The per-module rows added up under the bucket each row is labelled with."""
    out = dict.fromkeys(BUCKETS, 0)
    for r in rows:
        out[r["bucket"]] += r["bytes"]
    return out


def check_by_module(mem: dict, model: nn.Module, prof) -> None:
    step = mem["steps"][-1]
    assert mem["activations_step"] == step["index"]
    rows = mem["activations_by_module"]
    assert sum(r["bytes"] for r in rows) == step["categories"]["activations"]
    assert rows_by_bucket(rows) == step["activations_by_bucket"]  # the rows' labels agree with the buckets
    paths = dict(model.named_modules())
    assert all(r["path"] in paths or r["path"] == OUTSIDE for r in rows)
    assert all(r["bytes"] > 0 for r in rows)
    assert sum(r["bytes"] for r in mem["activations_by_block_module"]) == step["categories"]["activations"]
    for rec in prof.tracker.steps:  # every step, not just the reported one
        assert sum(rec.activations_by_module.values()) == rec.activations
        assert sum(rec.activations_by_bucket.values()) == rec.activations


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_architecture_two_adamw_steps_are_exact(arch, attn):
    model = build(arch, attn)
    assert model.config._attn_implementation == attn
    prof, _, walks, losses = train_steps(model, ARCHS[arch][1])
    assert_no_hooks(model)
    mem = memory(prof)
    steps = mem["steps"]
    assert [s["kind"] for s in steps] == ["first", "steady"]
    assert [s["index"] for s in steps] == [1, 2]
    assert all(w > 0 for w in walks)
    for step, walk in zip(steps, walks):
        check_step(step, model, walk)
        assert step["input_shape"] == [B, T] and step["input_is_tokens"]
    assert steps[0]["baseline"]["optimizer_state"] == 0
    assert steps[1]["baseline"]["optimizer_state"] == steps[0]["categories"]["optimizer_state"]
    check_by_module(mem, model, prof)
    # Every block of every trunk holds activations, labelled "block".
    rows = mem["activations_by_module"]
    blocks = [b for t in prof.report.models[0].buckets.trunks for b in t.block_paths]
    assert blocks
    for block in blocks:
        inside = [r for r in rows if r["path"] == block or r["path"].startswith(block + ".")]
        assert inside and all(r["bucket"] == "block" for r in inside), block
    # The profiler changed nothing: the same training without it ends with the same weights.
    twin = build(arch, attn)
    plain_losses = train_plain(twin, ARCHS[arch][1])
    assert [float(x) for x in plain_losses] == [float(x) for x in losses]
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name


def test_tied_weights_have_one_gradient():
    """GPT-2 (wte = lm_head), BERT (decoder weight and bias), T5 (four aliases), OPT: counted once."""
    expected_aliases = {"gpt2": 1, "bert": 2, "t5": 3, "opt": 1, "llama": 0}
    for arch, extra in expected_aliases.items():
        model = build(arch)
        aliases = [p for _, p in model.named_parameters(remove_duplicate=False)]
        with_duplicates = sum(p.numel() * p.element_size() for p in aliases)
        assert len(aliases) - len(unique_params(aliases)) == extra
        prof, _, _, _ = train_steps(model, ARCHS[arch][1], walk=False)
        grads = memory(prof)["steps"][-1]["categories"]["gradients"]
        assert grads == unique_param_bytes(model)
        if extra:
            assert grads < with_duplicates


def test_t5_four_way_tie_gradient_counted_once():
    model = build("t5")
    shared = model.shared.weight
    assert model.encoder.embed_tokens.weight is shared
    assert model.decoder.embed_tokens.weight is shared
    assert model.lm_head.weight is shared
    prof, _, walks, _ = train_steps(model, seq2seq_batch)
    step = memory(prof)["steps"][-1]
    with_duplicates = sum(p.numel() * p.element_size() for _, p in model.named_parameters(remove_duplicate=False))
    assert step["categories"]["gradients"] == with_duplicates - 3 * shared.numel() * shared.element_size()
    assert step["categories"]["gradients"] == unique_param_bytes(model)
    assert step["optimizer_state"]["by_name"]["exp_avg"] == unique_param_bytes(model)
    assert step["categories"]["activations"] == walks[-1]
    # Two trunks, encoder and decoder: both hold activations in the block bucket.
    rows = memory(prof)["activations_by_module"]
    assert any(r["path"].startswith("encoder.block.") and r["bucket"] == "block" for r in rows)
    assert any(r["path"].startswith("decoder.block.") and r["bucket"] == "block" for r in rows)


@pytest.mark.parametrize("ckpt_kwargs", [None, {"use_reentrant": True}, {"use_reentrant": False}])
def test_gpt2_gradient_checkpointing(ckpt_kwargs):
    plain = build("gpt2")
    prof_plain, _, _, _ = train_steps(plain, lm_batch, walk=False)
    base = memory(prof_plain)["steps"][-1]

    model = build("gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gradient_checkpointing_enable is a deprecated alias in transformers 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        assert model.is_gradient_checkpointing
    # The non-reentrant checkpoint recomputes when a saved tensor is read, so
    # the walk is only made for the reentrant one (whose blocks save nothing).
    walk = ckpt_kwargs == {"use_reentrant": True}
    prof, _, walks, _ = train_steps(model, lm_batch, walk=walk)  # must not crash; hooks checked inside
    mem = memory(prof)
    step = mem["steps"][-1]
    cat = step["categories"]
    assert step["complete"] and [s["kind"] for s in mem["steps"]] == ["first", "steady"]
    assert step["gradient_checkpointing"] and not base["gradient_checkpointing"]
    formulas = prof.to_dict()["models"][0]["estimates"]["formulas"]
    assert all(
        any("gradient checkpointing" in m for m in f["misses"]) for f in formulas if f["name"].startswith("korthikanti")
    )
    assert cat["gradients"] == unique_param_bytes(model)
    assert step["optimizer_state"]["by_name"]["exp_avg"] == unique_param_bytes(model)
    assert 0 < cat["activations"] < base["categories"]["activations"]
    assert cat["activations"] == sum(step["activations_by_bucket"].values())
    assert sum(r["bytes"] for r in mem["activations_by_module"]) == cat["activations"]
    # What checkpointing keeps of a block is its input (B, T, C) in float32; the
    # layers around the trunk are not checkpointed and hold what they held.
    hidden = B * T * model.config.n_embd * 4
    by_module = {(r["path"], r["bucket"]): r["bytes"] for r in mem["activations_by_module"]}
    for i in range(model.config.n_layer):
        assert by_module[f"transformer.h.{i}", "block"] == hidden
    assert step["activations_by_bucket"]["block"] == model.config.n_layer * hidden
    for bucket in ("embedding", "head", "other"):
        assert step["activations_by_bucket"][bucket] == base["activations_by_bucket"][bucket]
    if walk:
        assert walks[-1] == cat["activations"]


@pytest.mark.parametrize("frozen", ["transformer.wpe.weight", "transformer.wte.weight"])
def test_gpt2_frozen_embedding_drops_exactly_its_gradient(frozen):
    ref = build("gpt2")
    prof_ref, _, _, _ = train_steps(ref, lm_batch, walk=False)
    ref_grads = memory(prof_ref)["steps"][-1]["categories"]["gradients"]

    model = build("gpt2")
    weight = model.get_parameter(frozen)
    weight.requires_grad_(False)  # wte is tied to lm_head: one tensor, frozen once
    before = weight.detach().clone()
    frozen_bytes = weight.numel() * weight.element_size()
    prof, _, walks, _ = train_steps(model, lm_batch)
    assert_no_hooks(model)
    mem = memory(prof)
    for step, walk in zip(mem["steps"], walks):
        check_step(step, model, walk)
    cat = mem["steps"][-1]["categories"]
    assert ref_grads - cat["gradients"] == frozen_bytes
    assert cat["parameters"] == unique_param_bytes(model)  # frozen weights are still weights
    assert mem["steps"][-1]["optimizer_state"]["by_name"]["exp_avg"] == unique_param_bytes(model) - frozen_bytes
    assert torch.equal(weight, before)
    check_by_module(mem, model, prof)


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


def test_a_vision_transformer_gets_its_sequence_length_from_its_blocks_input():
    # Pixels in, no token ids: the blocks' (batch, patches + 1, hidden) input says what the formula needs.
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        num_labels=10,
    )
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config)
    opt = torch.optim.AdamW(model.parameters())
    with profile(model, sample_interval=None) as prof:
        for _ in range(2):
            logits = model(pixel_values=torch.randn(B, 3, 32, 32)).logits
            nn.functional.cross_entropy(logits, torch.randint(0, 10, (B,))).backward()
            opt.step()
            opt.zero_grad()
    entry = prof.report.models[0]
    assert entry.memory["steps"][-1]["trunk_input_shape"] == [B, (32 // 8) ** 2 + 1, 32]
    shape = entry.estimates["shape"]
    assert (shape["batch"], shape["seq"], shape["hidden"], shape["layers"], shape["heads"]) == (B, 17, 32, 2, 4)
    assert shape["seq_source"] == "from the first block's input"
    flash = next(f for f in entry.estimates["formulas"] if f["name"] == "korthikanti-flash")
    assert flash["applicable"] and flash["measured"] > 0
    assert "seq 17 (from the first block's input)" in prof.render()
