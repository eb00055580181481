"""Trunks and buckets found from the structure: nanoGPT, MoE, and plain models.

(Real third-party architectures built from their configs are in ``test_buckets_transformers.py``.)
"""

from __future__ import annotations

import pytest
import torch
from support import check_buckets, inventory_and_buckets
from torch import nn

from profiler import analyze

# --------------------------------------------------------------------------- nanoGPT


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_nanogpt_buckets(nanogpt, hand_count, tied, bias):
    V, T, C, L = 32000, 512, 768, 12
    config = nanogpt.GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=12, n_embd=C, bias=bias, tie_weights=tied)
    with torch.device("meta"):
        model = nanogpt.GPT(config)
    h = hand_count(V, T, C, L, bias=bias, tied=tied)
    inv, b = inventory_and_buckets(model)
    check_buckets(model, inv, b, h["total"])

    assert [t.path for t in b.trunks] == ["transformer.h"]
    trunk = b.trunks[0]
    assert trunk.blocks == L
    assert trunk.block_paths == [f"transformer.h.{i}" for i in range(L)]
    assert trunk.params_per_block == h["per_block"]
    assert trunk.params == L * h["per_block"]

    assert b.totals == {"embedding": h["embedding"], "block": h["block"], "head": h["head"], "other": 0}
    assert b.bytes == {k: 4 * v for k, v in b.totals.items()}

    assert b.module_bucket["transformer.wte"] == "embedding"
    assert b.module_bucket["transformer.wpe"] == "embedding"
    assert b.module_bucket["transformer.h"] == "block"
    assert b.module_bucket["transformer.h.3.mlp.c_fc"] == "block"
    assert b.module_bucket["transformer.ln_f"] == "head"
    assert b.module_bucket["lm_head"] == "head"
    if tied:
        # One tensor, two names: charged once, to the embedding; each alias is shown where it lives.
        assert b.param_bucket["transformer.wte.weight"] == "embedding"
        assert b.alias_bucket == {**b.alias_bucket, "transformer.wte.weight": "embedding", "lm_head.weight": "head"}
    else:
        assert b.param_bucket["lm_head.weight"] == "head"


@pytest.mark.parametrize("bias", [True, False])
def test_nanogpt_block_breakdown(make_gpt, hand_count, bias):
    C = 32
    model = make_gpt(bias=bias)
    inv, b = inventory_and_buckets(model)
    (trunk,) = b.trunks
    rows = {(p.module, p.name): p for p in trunk.breakdown}
    # nn.Linear stores its weight as (out_features, in_features): c_attn maps C -> 3C.
    assert rows[("attn.c_attn", "weight")].shape == (3 * C, C)
    assert rows[("attn.c_attn", "weight")].numel == 3 * C * C
    assert rows[("attn.c_attn", "weight")].type == "Linear"
    assert rows[("attn.c_proj", "weight")].shape == (C, C)
    assert rows[("mlp.c_fc", "weight")].shape == (4 * C, C)
    assert rows[("mlp.c_proj", "weight")].shape == (C, 4 * C)
    assert rows[("ln_1", "weight")].shape == (C,)
    if bias:
        assert rows[("attn.c_attn", "bias")].shape == (3 * C,)
        assert rows[("mlp.c_proj", "bias")].shape == (C,)
        assert rows[("ln_2", "bias")].numel == C
        assert len(rows) == 12
    else:
        assert not any(name == "bias" for _, name in rows)
        assert len(rows) == 6
    assert sum(p.numel for p in trunk.breakdown) == hand_count(64, 16, C, 2, bias=bias)["per_block"]
    # Each module's weight and bias are separate entries adding up to the module's count.
    parts = hand_count(64, 16, C, 2, bias=bias)["block_parts"]
    for module, count in parts.items():
        assert sum(p.numel for p in trunk.breakdown if p.module == module) == count


def test_nanogpt_report_text_shows_breakdown(tiny_gpt):
    text = analyze(tiny_gpt).render()
    assert "96x32" in text  # c_attn weight, (out, in)
    assert "transformer.h" in text


# --------------------------------------------------------------------------- plain models


def test_plain_mlp_has_no_trunk():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    inv, b = inventory_and_buckets(model)
    check_buckets(model, inv, b, 10 * 20 + 20 + 20 * 30 + 30 + 30 * 5 + 5)
    assert b.trunks == []
    assert b.totals == {"embedding": 0, "block": 0, "head": 0, "other": inv.total}
    assert set(b.param_bucket.values()) == {"other"}


def test_consecutive_linears_of_different_sizes_are_not_a_trunk():
    model = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 30), nn.Linear(30, 20), nn.Linear(20, 5))
    inv, b = inventory_and_buckets(model)
    assert b.trunks == []
    assert b.totals["other"] == inv.total


class SmallBlock(nn.Module):
    def __init__(self, C: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(C)
        self.ff = nn.Sequential(nn.Linear(C, 2 * C), nn.GELU(), nn.Linear(2 * C, C))

    def forward(self, x):
        return x + self.ff(self.norm(x))


def _positional(tie: bool = False) -> nn.Sequential:
    V, C = 50, 8
    model = nn.Sequential(
        nn.Embedding(V, C), SmallBlock(C), SmallBlock(C), SmallBlock(C), nn.LayerNorm(C), nn.Linear(C, V)
    )
    if tie:
        model[5].weight = model[0].weight
    return model


def test_sequential_buckets_by_position():
    V, C = 50, 8
    model = _positional()
    per_block = 2 * C + (C * 2 * C + 2 * C) + (2 * C * C + C)
    inv, b = inventory_and_buckets(model)
    check_buckets(model, inv, b, V * C + 3 * per_block + 2 * C + C * V + V)
    assert [(t.path, t.blocks) for t in b.trunks] == [("", 3)]
    assert b.trunks[0].block_paths == ["1", "2", "3"]
    assert b.totals == {"embedding": V * C, "block": 3 * per_block, "head": 2 * C + C * V + V, "other": 0}
    assert [b.module_bucket[p] for p in "012345"] == ["embedding", "block", "block", "block", "head", "head"]
    assert model(torch.tensor([[1, 2]])).shape == (1, 2, V)


def test_sequential_tied_head_charged_to_embedding():
    V, C = 50, 8
    model = _positional(tie=True)
    inv, b = inventory_and_buckets(model)
    assert [set(g.aliases) for g in inv.tie_groups] == [{"0.weight", "5.weight"}]
    assert b.totals["embedding"] == V * C
    assert b.totals["head"] == 2 * C + V  # LayerNorm and the head's bias only
    assert b.alias_bucket["5.weight"] == "head"
    assert sum(b.totals.values()) == inv.total


# --------------------------------------------------------------------------- MoE


class Expert(nn.Module):
    def __init__(self, C: int) -> None:
        super().__init__()
        self.up = nn.Linear(C, 2 * C)
        self.down = nn.Linear(2 * C, C)


class DenseLayer(nn.Module):
    def __init__(self, C: int) -> None:
        super().__init__()
        self.attn = nn.Linear(C, C)
        self.mlp = Expert(C)


class MoELayer(nn.Module):
    def __init__(self, C: int, experts: int = 4) -> None:
        super().__init__()
        self.attn = nn.Linear(C, C)
        self.router = nn.Linear(C, experts, bias=False)
        self.experts = nn.ModuleList([Expert(C) for _ in range(experts)])


class TinyLM(nn.Module):
    def __init__(self, layers: list[nn.Module], C: int = 8, V: int = 20) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, C)
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(C)
        self.head = nn.Linear(C, V, bias=False)


def test_moe_experts_are_not_the_trunk():
    C, V, E, L = 8, 20, 4, 3
    model = TinyLM([MoELayer(C, E) for _ in range(L)], C, V)
    expert = C * 2 * C + 2 * C + 2 * C * C + C
    layer = C * C + C + C * E + E * expert
    inv, b = inventory_and_buckets(model)
    check_buckets(model, inv, b, V * C + L * layer + 2 * C + C * V)
    assert [(t.path, t.blocks) for t in b.trunks] == [("layers", L)]
    assert b.trunks[0].params_per_block == layer
    assert b.totals == {"embedding": V * C, "block": L * layer, "head": 2 * C + C * V, "other": 0}
    assert b.module_bucket["layers.1.experts.2.up"] == "block"


def test_interleaved_dense_and_moe_layers_form_one_trunk():
    C = 8
    model = TinyLM([DenseLayer(C), MoELayer(C), DenseLayer(C), MoELayer(C)], C)
    inv, b = inventory_and_buckets(model)
    assert sum(b.totals.values()) == inv.total
    assert not any("experts" in t.path for t in b.trunks)
    assert [t.path for t in b.trunks] == ["layers"]
    assert b.totals["embedding"] == 20 * C
