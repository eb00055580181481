"""Properties of the inventory and the buckets on random module trees with random
ties, shared submodules and frozen leaves, on the CPU and on the meta device."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from profiler import analyze

BUCKETS = ("embedding", "block", "head", "other")

# ----------------------------------------------------------------------------- trees as data
#
# A tree is plain data so that the very same model can be built twice, once on
# the CPU and once on the meta device:
#   ("linear", in, out, bias) | ("embedding", num, dim) | ("layernorm", dim, affine)
#   ("list" | "seq" | "plain", [children])
#   ("repeat", "list" | "seq", k, child)   k structurally identical copies (a trunk)

dims = st.sampled_from([2, 3, 4])
leaves = st.one_of(
    st.tuples(st.just("linear"), dims, dims, st.booleans()),
    st.tuples(st.just("embedding"), dims, dims),
    st.tuples(st.just("layernorm"), dims, st.booleans()),
)


def _extend(children):
    return st.one_of(
        st.tuples(st.sampled_from(["list", "seq", "plain"]), st.lists(children, min_size=1, max_size=4)),
        st.tuples(st.just("repeat"), st.sampled_from(["list", "seq"]), st.integers(2, 4), children),
    )


trees = st.recursive(leaves, _extend, max_leaves=10)
index = st.integers(0, 1000)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("tie"), index, index),  # leaf j's weight := leaf i's weight Parameter
        st.tuples(st.just("share"), index, index),  # register module i again inside container j
        st.tuples(st.just("freeze"), index),
    ),
    max_size=4,
)


def _container(kind: str, mods: list[nn.Module]) -> nn.Module:
    if kind == "list":
        return nn.ModuleList(mods)
    if kind == "seq":
        return nn.Sequential(*mods)
    parent = nn.Module()
    for i, m in enumerate(mods):
        parent.add_module(f"m{i}", m)
    return parent


def build(spec) -> nn.Module:
    kind = spec[0]
    if kind == "linear":
        return nn.Linear(spec[1], spec[2], bias=spec[3])
    if kind == "embedding":
        return nn.Embedding(spec[1], spec[2])
    if kind == "layernorm":
        return nn.LayerNorm(spec[1], elementwise_affine=spec[2])
    if kind == "repeat":
        _, container, k, child = spec
        return _container(container, [build(child) for _ in range(k)])
    return _container(kind, [build(c) for c in spec[1]])


def apply_ops(model: nn.Module, operations) -> None:
    shared = 0
    for op in operations:
        mods = list(model.modules())
        weighted = [m for m in mods if isinstance(getattr(m, "weight", None), nn.Parameter)]
        if op[0] == "tie" and weighted:
            src, dst = weighted[op[1] % len(weighted)], weighted[op[2] % len(weighted)]
            if src is not dst and src.weight.shape == dst.weight.shape:
                dst.weight = src.weight
        elif op[0] == "share":
            src = mods[op[1] % len(mods)]
            containers = [m for m in mods if isinstance(m, (nn.ModuleList, nn.Sequential)) or type(m) is nn.Module]
            if not containers or src is model:
                continue
            dst = containers[op[2] % len(containers)]
            if any(m is dst for m in src.modules()):
                continue  # would make a cycle
            if isinstance(dst, (nn.ModuleList, nn.Sequential)):
                dst.append(src)
            else:
                dst.add_module(f"shared{shared}", src)
                shared += 1
        elif op[0] == "freeze":
            params = list(model.parameters())
            if params:
                params[op[1] % len(params)].requires_grad_(False)


def make(spec, operations, device: str = "cpu") -> nn.Module:
    with torch.device(device):
        model = build(spec)
    apply_ops(model, operations)
    return model


def _unique(module: nn.Module) -> dict[int, nn.Parameter]:
    return {id(p): p for _, p in module.named_parameters(remove_duplicate=False)}


def _summary(report):
    entry = report.models[0]
    inv, b = entry.inventory, entry.buckets
    return {
        "total": inv.total,
        "with_duplicates": inv.total_with_duplicates,
        "trainable": inv.trainable,
        "parameters": [(p.aliases, p.numel, p.shape, p.requires_grad) for p in inv.parameters],
        "modules": [(m.path, m.params, m.own_params, m.trainable, m.frozen) for m in inv.modules],
        "buckets": dict(b.totals),
        "param_bucket": dict(b.param_bucket),
        "trunks": [(t.path, t.block_paths, t.params, t.params_per_block) for t in b.trunks],
        "module_bucket": dict(b.module_bucket),
    }


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(spec=trees, operations=ops)
def test_inventory_properties(spec, operations):
    model = make(spec, operations)
    unique = _unique(model)  # may be empty: a module without parameters counts zero
    report = analyze(model)
    entry = report.models[0]
    inv, b = entry.inventory, entry.buckets

    # Unique total: each Parameter object once, however many names it has.
    assert inv.total == sum(p.numel() for p in unique.values())
    assert inv.total == sum(p.numel() for p in model.parameters())
    # With duplicates: every name counts.
    named = list(model.named_parameters(remove_duplicate=False))
    assert inv.total_with_duplicates == sum(p.numel() for _, p in named)
    assert inv.trainable == sum(p.numel() for p in unique.values() if p.requires_grad)
    assert inv.bytes == sum(p.numel() * p.element_size() for p in unique.values())

    # Every alias appears in exactly one group, and a group is exactly one Parameter object.
    aliases = [a for p in inv.parameters for a in p.aliases]
    assert sorted(aliases) == sorted(n for n, _ in named)
    assert len(set(aliases)) == len(aliases)
    for p in inv.parameters:
        assert len({id(model.get_parameter(a)) for a in p.aliases}) == 1
        assert p.tied == (len(p.aliases) > 1)
    assert len({id(model.get_parameter(p.name)) for p in inv.parameters}) == len(inv.parameters) == len(unique)
    assert {g.name for g in inv.tie_groups} == {p.name for p in inv.parameters if len(p.aliases) > 1}

    # Every module's count is its own subtree's unique count, never more than the root's.
    root = inv.total
    for m in inv.modules:
        assert m.params <= root
        assert m.params == sum(p.numel() for p in _unique(model.get_submodule(m.path)).values())
        assert m.trainable + m.frozen == m.params
    assert inv.modules[0].path == "" and inv.modules[0].params == root

    # Buckets partition the unique parameters.
    assert set(b.totals) == set(BUCKETS)
    assert sum(b.totals.values()) == root
    assert set(b.param_bucket) == {p.name for p in inv.parameters}
    assert set(b.alias_bucket) == set(aliases)
    for p in inv.parameters:
        charged = b.param_bucket[p.name]
        assert charged in BUCKETS
        assert charged in {b.alias_bucket[a] for a in p.aliases}
        assert charged == min((b.alias_bucket[a] for a in p.aliases), key=BUCKETS.index)
    for bucket in BUCKETS:
        assert b.totals[bucket] == sum(p.numel for p in inv.parameters if b.param_bucket[p.name] == bucket)
    for t in b.trunks:
        assert t.blocks >= 2
        assert t.block_paths and all(b.module_bucket[path] == "block" for path in t.block_paths)
    # A tensor charged to "block" lives in some trunk; a trunk's tensor tied to an embedding is
    # charged to the embedding but still counted in its trunk.
    assert b.totals["block"] <= sum(t.params for t in b.trunks) <= root
    if not inv.tie_groups:
        assert sum(t.params for t in b.trunks) == b.totals["block"]
    if not b.trunks:
        # Without a trunk an embedding table is still an embedding; every other parameter is "other".
        tables = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        in_tables = {id(p) for m in tables for p in m.parameters()}
        embedding = sum(p.numel() for p in unique.values() if id(p) in in_tables)
        assert b.totals == {"embedding": embedding, "block": 0, "head": 0, "other": root - embedding}

    # The report's JSON says the same.
    d = report.to_dict()["models"][0]["parameters"]
    assert d["total"] == inv.total
    assert d["total_with_duplicates"] == inv.total_with_duplicates
    assert d["trainable"] == inv.trainable
    assert sorted(sorted(t["aliases"]) for t in d["tied"]) == sorted(sorted(g.aliases) for g in inv.tie_groups)


@SETTINGS
@given(spec=trees, operations=ops)
def test_meta_device_gives_the_same_counts(spec, operations):
    cpu = make(spec, operations, "cpu")
    meta = make(spec, operations, "meta")
    assert [n for n, _ in cpu.named_parameters(remove_duplicate=False)] == [
        n for n, _ in meta.named_parameters(remove_duplicate=False)
    ]
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert _summary(analyze(meta)) == _summary(analyze(cpu))


def test_generator_makes_ties_shares_and_trunks():
    """The strategies above reach the interesting cases (guards against a vacuous property)."""
    block = ("seq", [("linear", 3, 3, True), ("layernorm", 3, True)])
    spec = ("plain", [("embedding", 4, 3), ("repeat", "list", 3, block), ("linear", 3, 4, False)])
    model = make(spec, [("tie", 0, 7), ("share", 4, 0), ("freeze", 0)])
    entry = analyze(model).models[0]
    inv, b = entry.inventory, entry.buckets
    assert [t.path for t in b.trunks] == ["m1"]
    groups = {g.aliases for g in inv.tie_groups}
    assert ("m0.weight", "m2.weight") in groups  # Embedding(4, 3) and the Linear(3, 4) head: both (4, 3)
    assert ("m1.0.0.weight", "shared0.weight") in groups  # the first block's Linear, registered twice
    assert ("m1.0.0.bias", "shared0.bias") in groups
    assert inv.trainable == inv.total - 12
    assert b.totals["embedding"] == 12
