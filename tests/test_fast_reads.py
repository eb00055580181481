"""The per-step reads written for speed give what the plain reads give, on every kind of tensor.

``memory_map`` (many tensors' memory in one loop) against ``memory_of`` one by
one, the gradient hook's arrivals against it on a sparse gradient and dense
ones, and the ledger's parameter test against PyTorch's own
``isinstance(t, nn.Parameter)`` (whose metaclass also accepts a tensor flagged
``_is_param``), on plain tensors, views, parameters and their views, flagged
tensors, subclasses, sparse and empty tensors and tensors on the meta device.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from profiler import profile
from profiler.tracking.ledger import _is_parameter
from profiler.tracking.parameters import unique_bytes
from profiler.tracking.saved_tensors import memory_map, memory_of, tensors_in


class _Sub(torch.Tensor):
    pass


def _kinds() -> dict[str, torch.Tensor]:
    base = torch.randn(6, 4)
    param = nn.Parameter(torch.randn(5, 3))
    flagged = torch.randn(3)
    flagged._is_param = True
    return {
        "plain": base,
        "view": base[2:],
        "alias": base.view(24),
        "parameter": param,
        "parameter view": param[1:],
        "parameter detached": param.detach(),
        "flagged": flagged,
        "flagged view": flagged[1:],
        "subclass": torch.randn(4).as_subclass(_Sub),
        "sparse": torch.randn(4, 4).to_sparse(),
        "empty": torch.empty(0),
        "meta": torch.empty(8, device="meta"),
        "int": torch.arange(10),
    }


@pytest.mark.parametrize("name", list(_kinds()))
def test_is_parameter_is_torchs_own_test(name: str) -> None:
    t = _kinds()[name]
    torch_says = isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)
    assert _is_parameter(t) is torch_says


def test_memory_map_is_memory_of_one_by_one() -> None:
    kinds = _kinds()
    tensors = list(kinds.values())
    expected = dict([memory_of(t) for t in tensors])
    assert memory_map(tensors) == expected
    # views and aliases of one storage are one entry: the base, its view and its alias share it
    assert len({memory_of(kinds[k])[0] for k in ("plain", "view", "alias")}) == 1
    assert unique_bytes([kinds["plain"], kinds["view"], kinds["alias"]]) == 6 * 4 * 4


def test_memory_map_of_tied_parameters_counts_once() -> None:
    emb = nn.Embedding(10, 8)
    head = nn.Linear(8, 10, bias=False)
    head.weight = emb.weight
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in (emb.weight, head.weight)}
    assert memory_map([emb.weight, head.weight]) == storages
    assert unique_bytes([emb.weight, head.weight]) == 10 * 8 * 4


def test_gradient_arrivals_read_as_memory_of_reads_them() -> None:
    """The gradient hook's arrivals are ``memory_of`` each gradient: dense ones, and a sparse one (no storage)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 8, sparse=True), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 50, (4, 6))
    with profile(model, opt, sample_interval=None) as prof:
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            model(ids).sum().backward()
            held = dict(memory_of(p.grad) for p in model.parameters())
            opt.step()
    assert not [n for n in prof.tracker.notes if "internal error" in n]
    assert model[0].weight.grad.is_sparse
    for step in prof.tracker.steps:
        arrived = [n for _, category, n in step.events if category == "gradients" and n > 0]
        assert sorted(arrived) == sorted(held.values())


def _tensors_in_by_the_definition(obj: object, depth: int = 0) -> list[torch.Tensor]:
    """What ``tensors_in`` is defined to find: tensors, in order, inside containers nested at most 3 deep."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth > 3:
        return []
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors_in_by_the_definition(v, depth + 1)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors_in_by_the_definition(v, depth + 1)]
    return []


_LEAVES = [torch.zeros(2), nn.Parameter(torch.ones(3)), torch.zeros(1).as_subclass(_Sub), 7, None, "x"]


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.sampled_from(range(len(_LEAVES))),
        lambda inner: st.one_of(
            st.lists(inner, max_size=4).map(tuple),
            st.lists(inner, max_size=4),
            st.dictionaries(st.sampled_from("abc"), inner, max_size=3),
        ),
        max_leaves=12,
    ),
    st.integers(0, 4),
)
@example(shape=(0, 1), depth=4)  # (a flat tuple of plain tensors past the depth: nothing, as for any container)
@example(shape=((0,),), depth=3)
@example(shape=((0, 1), {}), depth=1)  # (a forward's (args, kwargs))
def test_tensors_in_finds_what_its_definition_finds(shape: object, depth: int) -> None:
    """Its shortcuts (a flat tuple of plain tensors, a pair of arguments) keep the definition's order and depth."""

    def build(s: object) -> object:
        if isinstance(s, int):
            return _LEAVES[s]
        if isinstance(s, dict):
            return {k: build(v) for k, v in s.items()}
        return type(s)(build(v) for v in s)

    obj = build(shape)
    found = tensors_in(obj, depth)
    assert [id(t) for t in found] == [id(t) for t in _tensors_in_by_the_definition(obj, depth)]
