"""The static inventory: exact parameter counts, ties, frozen weights, buffers,
dtypes, weight memory, errors and the JSON schema of the report."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

import profiler
from profiler import ProfilerError, analyze

# nanoGPT at the tutorial size of the example: 32k vocabulary, 512 context, GPT-2 small's width.
V, T, C = 32000, 512, 768


def _inv(model):
    return analyze(model).models[0].inventory


def _build_meta(nanogpt, **overrides):
    config = dict(vocab_size=V, block_size=T, n_layer=12, n_head=12, n_embd=C, dropout=0.0, bias=True, tie_weights=True)
    config.update(overrides)
    with torch.device("meta"):
        return nanogpt.GPT(nanogpt.GPTConfig(**config))


# --------------------------------------------------------------------------- nanoGPT, exact


def test_hand_count_formula_is_gpt2_small_shaped(hand_count):
    # The formula itself, pinned by numbers worked out on paper: a GPT-2-small block has
    # 7,087,872 parameters, and 32000*768 + 512*768 + 12 blocks + ln_f = 110,025,216.
    h = hand_count(V, T, C, 12)
    assert h["per_block"] == 7_087_872
    assert h["total"] == 110_025_216
    assert h["total_with_duplicates"] == 110_025_216 + 32000 * 768


@pytest.mark.parametrize(
    "tied, bias, n_layer",
    [(True, True, 12), (False, True, 12), (True, False, 12), (False, False, 12), (True, True, 24), (False, False, 24)],
)
def test_nanogpt_tutorial_size_exact_counts_on_meta(nanogpt, hand_count, tied, bias, n_layer):
    model = _build_meta(nanogpt, tie_weights=tied, bias=bias, n_layer=n_layer)
    assert next(model.parameters()).device.type == "meta"
    expected = hand_count(V, T, C, n_layer, bias=bias, tied=tied)

    report = analyze(model)
    inv = report.models[0].inventory
    assert inv.total == expected["total"]
    assert inv.total_with_duplicates == expected["total_with_duplicates"]
    assert inv.trainable == expected["total"]
    assert inv.bytes == 4 * expected["total"]  # fp32

    params = report.to_dict()["models"][0]["parameters"]
    assert params["total"] == expected["total"]
    assert params["total_with_duplicates"] == expected["total_with_duplicates"]
    assert params["bytes"] == 4 * expected["total"]

    if tied:
        assert [set(t["aliases"]) for t in params["tied"]] == [{"transformer.wte.weight", "lm_head.weight"}]
        assert params["tied"][0]["numel"] == V * C
    else:
        assert params["tied"] == []


def test_bias_free_layernorm_has_weight_only(nanogpt):
    inv = _inv(_build_meta(nanogpt, bias=False, n_layer=1))
    names = {a for p in inv.parameters for a in p.aliases}
    assert "transformer.h.0.ln_1.weight" in names
    assert "transformer.h.0.ln_1.bias" not in names
    assert "transformer.h.0.attn.c_attn.bias" not in names


def test_tied_nanogpt_lists_both_aliases_on_cpu(tiny_gpt):
    inv = _inv(tiny_gpt)
    assert len(inv.tie_groups) == 1
    group = inv.tie_groups[0]
    assert set(group.aliases) == {"transformer.wte.weight", "lm_head.weight"}
    assert group.numel == 64 * 32
    assert group.shape == (64, 32)
    # Registration order: the transformer (and its wte) comes before lm_head.
    assert group.name == "transformer.wte.weight"


def test_module_counts_charge_a_tie_to_every_module_that_reaches_it(tiny_gpt):
    inv = _inv(tiny_gpt)
    mods = {m.path: m for m in inv.modules}
    assert mods[""].params == inv.total
    assert mods["transformer"].params == inv.total  # wte lives inside it
    assert mods["lm_head"].params == 64 * 32
    assert mods["lm_head"].own_params == 64 * 32
    assert mods["transformer.wte"].params == 64 * 32
    assert all(m.params <= inv.total for m in inv.modules)


# --------------------------------------------------------------------------- tie detection


class Pair(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a = a
        self.b = b


def test_cpu_tie_by_same_parameter_object():
    m = Pair(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    m.b.weight = m.a.weight
    inv = _inv(m)
    assert inv.total == 16
    assert inv.total_with_duplicates == 32
    assert [g.aliases for g in inv.tie_groups] == [("a.weight", "b.weight")]


def test_cpu_tie_by_same_storage_distinct_parameter_objects():
    m = Pair(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    m.b.weight = nn.Parameter(m.a.weight.data)  # a second Parameter over the same memory
    assert m.b.weight is not m.a.weight
    assert m.b.weight.data_ptr() == m.a.weight.data_ptr()
    inv = _inv(m)
    assert inv.total == 16
    assert [set(g.aliases) for g in inv.tie_groups] == [{"a.weight", "b.weight"}]


def test_cpu_equal_values_are_not_a_tie():
    m = Pair(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        m.a.weight.fill_(1.0)
        m.b.weight.fill_(1.0)
    inv = _inv(m)
    assert inv.total == 32
    assert inv.tie_groups == []


def test_meta_tie_by_identity_and_distinct_meta_params_not_merged():
    with torch.device("meta"):
        m = Pair(nn.Linear(8, 8, bias=False), Pair(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)))
    m.b.b.weight = m.a.weight
    # The premise: every meta tensor reports the same (null) pointer.
    assert m.a.weight.data_ptr() == m.b.a.weight.data_ptr() == 0
    inv = _inv(m)
    assert inv.total == 2 * 64  # a.weight (= b.b.weight) and b.a.weight
    assert inv.total_with_duplicates == 3 * 64
    assert [g.aliases for g in inv.tie_groups] == [("a.weight", "b.b.weight")]
    assert len(inv.parameters) == 2


def test_meta_many_distinct_params_stay_distinct():
    with torch.device("meta"):
        m = nn.Sequential(*[nn.Linear(16, 16) for _ in range(5)])
    inv = _inv(m)
    assert len(inv.parameters) == 10
    assert inv.total == 5 * (16 * 16 + 16)
    assert inv.tie_groups == []


def test_disjoint_slices_of_one_storage_are_not_merged():
    flat = torch.zeros(20)
    m = nn.Module()
    m.first = nn.Parameter(flat[:10])
    m.second = nn.Parameter(flat[10:])
    assert m.first.untyped_storage().data_ptr() == m.second.untyped_storage().data_ptr()
    inv = _inv(m)
    assert inv.total == 20
    assert inv.tie_groups == []
    assert {p.name for p in inv.parameters} == {"first", "second"}


def test_same_slice_of_one_storage_is_merged():
    flat = torch.zeros(20)
    m = nn.Module()
    m.first = nn.Parameter(flat[5:15])
    m.again = nn.Parameter(flat[5:15])
    inv = _inv(m)
    assert inv.total == 10
    assert [set(g.aliases) for g in inv.tie_groups] == [{"first", "again"}]


def test_shared_submodule_counted_once():
    shared = nn.Linear(4, 4)
    m = nn.Module()
    m.enc = shared
    m.other = nn.Linear(4, 2)
    m.dec = shared
    inv = _inv(m)
    assert inv.total == 20 + 10
    assert inv.total_with_duplicates == 2 * 20 + 10
    assert {g.aliases for g in inv.tie_groups} == {("enc.weight", "dec.weight"), ("enc.bias", "dec.bias")}
    mods = {mi.path: mi for mi in inv.modules}
    assert mods["enc"].params == mods["dec"].params == 20
    assert mods[""].params == 30


# --------------------------------------------------------------------------- frozen, buffers, dtypes


def test_frozen_parameters():
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    m[0].requires_grad_(False)
    report = analyze(m)
    inv = report.models[0].inventory
    assert inv.total == 30
    assert inv.trainable == 10
    mods = {mi.path: mi for mi in inv.modules}
    assert (mods["0"].frozen, mods["0"].trainable) == (20, 0)
    assert (mods["1"].frozen, mods["1"].trainable) == (0, 10)
    assert (mods[""].frozen, mods[""].trainable) == (20, 10)
    params = report.to_dict()["models"][0]["parameters"]
    assert params["trainable"] == 10
    assert params["frozen"] == 20


class WithBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("running", torch.zeros(3))
        self.register_buffer("cache", torch.zeros(5, dtype=torch.float64), persistent=False)
        self.register_buffer("empty", None)
        self.inner = nn.Module()
        self.inner.register_buffer("mask", torch.ones(7, dtype=torch.bool), persistent=False)
        self.inner.register_buffer("steps", torch.zeros(2, dtype=torch.int64))


def test_buffers_persistent_and_non_persistent():
    m = WithBuffers()
    assert set(m.state_dict()) == {"lin.weight", "lin.bias", "running", "inner.steps"}
    report = analyze(m)
    inv = report.models[0].inventory
    assert inv.total == 12  # buffers are not parameters
    by_name = {b.name: b for b in inv.buffers}
    assert set(by_name) == {"running", "cache", "inner.mask", "inner.steps"}
    assert by_name["running"].persistent and by_name["inner.steps"].persistent
    assert not by_name["cache"].persistent and not by_name["inner.mask"].persistent
    assert inv.buffer_total == 3 + 5 + 7 + 2
    assert inv.buffer_bytes == 3 * 4 + 5 * 8 + 7 * 1 + 2 * 8
    buffers = report.to_dict()["models"][0]["buffers"]
    assert buffers["total"] == 17
    assert buffers["bytes"] == 75
    assert buffers["persistent"] == 5
    assert buffers["non_persistent"] == 12
    mods = {mi.path: mi for mi in inv.modules}
    assert (mods["inner"].persistent_buffers, mods["inner"].non_persistent_buffers) == (2, 7)
    assert (mods[""].persistent_buffers, mods[""].non_persistent_buffers) == (5, 12)


def test_dtypes_half_bf16():
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    m[1].to(torch.bfloat16)
    report = analyze(m)
    inv = report.models[0].inventory
    assert inv.dtype_counts() == {"float32": 72, "bfloat16": 36}
    assert inv.bytes == 72 * 4 + 36 * 2
    params = report.to_dict()["models"][0]["parameters"]
    assert params["dtypes"] == {"float32": 72, "bfloat16": 36}
    assert params["bytes"] == 360
    mods = {mi.path: mi for mi in inv.modules}
    assert mods["1"].bytes == 72
    assert mods[""].dtypes == {"float32": 72, "bfloat16": 36}


def test_weight_memory_per_format(tiny_gpt):
    inv = _inv(tiny_gpt)
    n = inv.total
    assert inv.weight_memory() == {"fp32": 4 * n, "fp16": 2 * n, "bf16": 2 * n, "int8": n}


def test_weight_memory_ignores_current_dtype(nanogpt, hand_count):
    model = _build_meta(nanogpt, n_layer=2).to(torch.bfloat16)
    inv = _inv(model)
    n = hand_count(V, T, C, 2)["total"]
    assert inv.bytes == 2 * n
    assert inv.weight_memory() == {"fp32": 4 * n, "fp16": 2 * n, "bf16": 2 * n, "int8": n}


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [42, "model", None, [nn.Linear(2, 2)], torch.zeros(3)])
def test_analyze_non_module_raises_one_line(bad):
    with pytest.raises(ProfilerError) as info:
        analyze(bad)
    message = str(info.value)
    assert message and "\n" not in message
    assert "Module" in message


@pytest.mark.parametrize(
    "empty", [nn.ReLU(), nn.Sequential(), nn.Sequential(nn.ReLU(), nn.Dropout()), WithBuffers().inner]
)
def test_a_module_without_parameters_counts_zero(empty):
    # A static count of nn.ReLU() or an empty Sequential is zero parameters, not an error.
    report = analyze(empty)
    (entry,) = report.models
    params = report.to_dict()["models"][0]["parameters"]
    assert params["total"] == params["bytes"] == params["trainable"] == entry.inventory.total == 0
    assert params["buckets"] == {"embedding": 0, "block": 0, "head": 0, "other": 0}
    assert params["tied"] == [] and params["trunks"] == []
    buffers = sum(b.numel() for b in empty.buffers())
    assert report.to_dict()["models"][0]["buffers"]["total"] == buffers
    text = report.render()
    assert "parameters (unique)" in text and "Tied parameters: none" in text


def test_analyze_of_something_not_a_module_is_one_line():
    with pytest.raises(ProfilerError) as info:
        analyze(torch.zeros(3))
    assert str(info.value) and "\n" not in str(info.value)


def test_profiler_error_is_exported():
    assert profiler.ProfilerError is ProfilerError
    assert issubclass(ProfilerError, Exception)


# --------------------------------------------------------------------------- JSON schema


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def test_to_dict_schema(tiny_gpt):
    report = analyze(tiny_gpt, name="gpt")
    d = report.to_dict()
    assert d["schema"] == "profiler.report/1" == profiler.SCHEMA
    assert len(d["models"]) == 1
    model = d["models"][0]
    assert model["name"] == "gpt"
    assert model["class"] == "GPT"

    p = model["parameters"]
    for key in ("total", "total_with_duplicates", "trainable", "bytes"):
        assert _is_int(p[key]), key
    assert p["total"] == sum(x.numel() for x in tiny_gpt.parameters())
    assert set(p["buckets"]) == {"embedding", "block", "head", "other"}
    assert all(_is_int(v) for v in p["buckets"].values())
    assert sum(p["buckets"].values()) == p["total"]

    assert len(p["trunks"]) == 1
    trunk = p["trunks"][0]
    assert trunk["path"] == "transformer.h"
    assert trunk["blocks"] == 2
    assert _is_int(trunk["params_per_block"])

    assert len(p["tied"]) == 1
    assert set(p["tied"][0]["aliases"]) == {"transformer.wte.weight", "lm_head.weight"}
    assert p["tied"][0]["numel"] == 64 * 32

    paths = [m["path"] for m in p["modules"]]
    assert paths[0] == ""
    assert set(paths) == {name for name, _ in tiny_gpt.named_modules()}
    for m in p["modules"]:
        assert {"path", "type", "params", "bytes", "bucket"} <= set(m)
        assert _is_int(m["params"]) and _is_int(m["bytes"])
        assert m["bucket"] in {"embedding", "block", "head", "other", "mixed"}
    by_path = {m["path"]: m for m in p["modules"]}
    assert by_path["transformer.h.0.attn.c_attn"]["type"] == "Linear"
    assert by_path["transformer.h.0.attn.c_attn"]["params"] == 32 * 96 + 96
    assert by_path["transformer.h.0.attn.c_attn"]["bytes"] == 4 * (32 * 96 + 96)

    b = model["buffers"]
    assert _is_int(b["total"]) and _is_int(b["bytes"])


def test_bytes_are_ints_on_meta_and_in_low_precision(nanogpt):
    model = _build_meta(nanogpt, n_layer=1).to(torch.float16)
    d = analyze(model).to_dict()
    p = d["models"][0]["parameters"]
    assert _is_int(p["bytes"]) and p["bytes"] == 2 * p["total"]
    assert all(_is_int(m["bytes"]) for m in p["modules"])
    assert all(_is_int(v) for v in p["weight_memory"].values())


def test_json_round_trip(tiny_gpt, tmp_path):
    report = analyze(tiny_gpt)
    path = tmp_path / "report.json"
    text = report.to_json(path)
    assert json.loads(text) == report.to_dict()
    assert json.loads(path.read_text(encoding="utf-8")) == report.to_dict()


def test_json_round_trip_with_buffers_ties_and_dtypes():
    m = WithBuffers()
    m.lin2 = nn.Linear(3, 3).to(torch.bfloat16)
    m.lin3 = m.lin
    report = analyze(m)
    assert json.loads(json.dumps(report.to_dict())) == report.to_dict()


# --------------------------------------------------------------------------- render depth


def _deep_model() -> nn.Module:
    """root -> alpha -> beta -> gamma -> delta (Linear), plus a shallow omega (Linear)."""
    root = nn.Module()
    root.alpha = nn.Module()
    root.alpha.beta = nn.Module()
    root.alpha.beta.gamma = nn.Module()
    root.alpha.beta.gamma.delta = nn.Linear(3, 3)
    root.omega = nn.Linear(3, 1)
    return root


_NAMES_BY_DEPTH = {1: ["alpha", "omega"], 2: ["beta"], 3: ["gamma"], 4: ["delta"]}


def _tree_section(text: str) -> str:
    sections = [s for s in text.split("\n\n") if s.startswith("Modules to depth")]
    assert len(sections) == 1, text
    return sections[0]


def _tree_labels(text: str) -> list[str]:
    lines = _tree_section(text).splitlines()
    start = next(i for i, line in enumerate(lines) if set(line.replace(" ", "")) == {"-"}) + 1
    return [line.split()[0] for line in lines[start:] if line.strip()]


@pytest.mark.parametrize("depth", [0, 1, 2, 3, 4])
def test_render_depth_limits_the_tree(depth):
    text = analyze(_deep_model()).render(depth=depth)
    labels = _tree_labels(text)
    assert labels[0] == "(root)"
    for d, names in _NAMES_BY_DEPTH.items():
        for name in names:
            if d <= depth:
                assert name in labels, (depth, name, labels)
            else:
                assert name not in labels, (depth, name, labels)
                assert not re.search(rf"\b{name}\b", _tree_section(text))


def test_render_depth_on_nanogpt(tiny_gpt):
    text = analyze(tiny_gpt).render(depth=1)
    labels = _tree_labels(text)
    assert "transformer" in labels and "lm_head" in labels
    assert "h" not in labels and "wte" not in labels and "c_attn" not in labels


def test_render_tree_is_indented_by_depth():
    lines = _tree_section(analyze(_deep_model()).render(depth=4)).splitlines()

    def indent(name: str) -> int:
        line = next(line for line in lines if re.match(rf"\s*{name}\b", line))
        return len(line) - len(line.lstrip(" "))

    assert indent("alpha") < indent("beta") < indent("gamma") < indent("delta")


def test_a_lazy_module_that_never_ran_is_named_not_counted():
    # Its parameters have no shape yet: counting them would raise, guessing them
    # would be a guess. The rest of the model is counted as usual.
    model = nn.Sequential(nn.Linear(8, 16), nn.LazyLinear(4), nn.LazyBatchNorm1d())
    report = analyze(model).to_dict()["models"][0]
    assert report["parameters"]["total"] == 8 * 16 + 16
    assert report["parameters"]["uninitialized"] == ["1.weight", "1.bias", "2.weight", "2.bias"]
    assert report["buffers"]["total"] == 1  # num_batches_tracked; the running statistics have no shape yet
    assert "4 lazy parameter(s) not initialised yet" in analyze(model).render()
