"""Estimates beside measurements, and fit predictions checked against real measurements (CPU)."""

from __future__ import annotations

import pytest
import torch
from support import tiny_gpt

from profiler import ProfilerError, profile
from profiler.model.traits import ModelTraits, model_traits
from profiler.results.estimates import estimates_section
from profiler.results.fit import CARDS, fit_points, plan_fit, predict_required, resolve_card
from profiler.script.options import parse_batches, parse_cards


def measured(model, opt, b, t=16, steps=2, autocast=False):
    with profile(model, sample_interval=None) as prof:
        for _ in range(steps):
            x = torch.randint(0, 64, (b, t))
            if autocast:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    _, loss = model(x, x)
            else:
                _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return prof.report.models[0]


def categories_total(entry) -> int:
    cat = entry.memory["steps"][-1]["categories"]
    return cat["parameters"] + cat["gradients"] + cat["optimizer_state"] + cat["activations"] + cat["autocast_copies"]


def test_formulas_use_the_observed_shape_and_report_errors():
    model = tiny_gpt(n_layer=3)
    opt = torch.optim.AdamW(model.parameters())
    entry = measured(model, opt, b=4, t=16)
    est = entry.estimates
    assert est["available"]
    assert est["shape"] == {
        "layers": 3,
        "hidden": 32,
        "heads": 2,
        "vocab": 64,
        "batch": 4,
        "seq": 16,
        "seq_source": None,
        "batch_source": "the input's first dimension (nothing in the model says otherwise)",
    }
    by_name = {f["name"]: f for f in est["formulas"]}
    n = entry.inventory.total
    tut = by_name["tutorial"]
    assert tut["estimate"] == 2 * n + 2 * n + 4 * n + 4 * 4 * 16 * 32
    assert tut["measured"] == categories_total(entry)
    assert tut["error"] == pytest.approx((tut["estimate"] - tut["measured"]) / tut["measured"])
    assert any("fp32" in m for m in tut["misses"])
    # fp32 Adam is exact in fp32: weights + grads + two moments = 16 bytes per parameter (+ step counters).
    assert abs(by_name["fp32-adam"]["error"]) < 0.001
    flash = by_name["korthikanti-flash"]
    assert flash["estimate"] == 3 * 34 * 16 * 4 * 32 * 2  # x2: fp32 activations
    assert flash["measured"] == entry.memory["steps"][-1]["activations_by_bucket"]["block"]
    assert by_name["korthikanti-full"]["estimate"] > flash["estimate"]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_korthikanti_dropout_masks_are_a_miss_only_without_dropout(dropout):
    model = tiny_gpt(dropout=dropout)
    opt = torch.optim.AdamW(model.parameters())
    est = measured(model, opt, b=2).estimates
    misses = " ".join(m for f in est["formulas"] if f["name"].startswith("korthikanti") for m in f["misses"])
    assert ("dropout masks" in misses) == (dropout == 0.0)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_estimates_from_traits_taken_earlier_equal_those_from_the_model(dropout):
    # The runner writes the report of a model the script dropped from traits
    # taken when it was found: the same estimates as from the model itself.
    model = tiny_gpt(dropout=dropout, n_head=4)
    entry = measured(model, torch.optim.AdamW(model.parameters()), b=2)
    from_traits = estimates_section(entry, model_traits(model))
    assert from_traits == estimates_section(entry, model) == entry.estimates
    assert from_traits["shape"]["heads"] == 4
    assert model_traits(model).active_dropout == (dropout > 0)
    assert model_traits(None) == ModelTraits()


def test_autocast_run_is_reported_as_mixed_precision():
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    entry = measured(model, opt, b=2, autocast=True)
    assert entry.estimates["mixed_precision"] is True
    zero = next(f for f in entry.estimates["formulas"] if f["name"] == "zero-mixed-adam")
    assert any("fp32 gradients" in m for m in zero["misses"])


def test_non_transformer_gets_a_statement_not_a_number():
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with profile(model, sample_interval=None) as prof:
        model(torch.randn(5, 8)).sum().backward()
        opt.step()
    est = prof.report.models[0].estimates
    kort = next(f for f in est["formulas"] if f["name"].startswith("korthikanti"))
    assert kort["applicable"] is False and "no repeated trunk of blocks was found" in kort["reason"]
    assert kort["measured"] is None  # no trunk: no block bucket to compare with, not "0 B"
    tutorial = next(f for f in est["formulas"] if f["name"] == "tutorial")
    assert tutorial["applicable"] is False and tutorial["estimate"] is None
    assert "not applicable" in prof.render()
    # Every formula counts Adam's moments: with SGD each says so.
    for name in ("tutorial", "zero-mixed-adam", "fp32-adam"):
        misses = next(f for f in est["formulas"] if f["name"] == name)["misses"]
        assert "the script's optimizer is SGD, not Adam: its state is 0.0 bytes/param, Adam's 8" in misses


def test_fit_prediction_from_small_batches_holds_at_a_larger_one():
    model = tiny_gpt(n_layer=2)
    opt = torch.optim.AdamW(model.parameters())
    small = [measured(model, opt, b=b) for b in (2, 4)]
    points = [p for e in small[1:] for p in fit_points(e.memory)]
    fit = plan_fit(small[0].memory, extra_points=points)
    assert fit["measured_batches"] == [2, 4]
    assert "linear fit" in fit["method"]
    big = measured(model, opt, b=16)
    predicted = predict_required(fit, 16)
    actual = categories_total(big)
    assert abs(predicted - actual) / actual < 0.03


def test_single_batch_plan_says_its_assumption_and_scales_per_sample():
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    entry = measured(model, opt, b=4)
    fit = entry.fit
    assert "one measured batch size" in fit["method"]
    cat = entry.memory["steps"][-1]["categories"]
    assert fit["bytes_per_sample"] == pytest.approx(cat["activations"] / 4)
    t4 = next(c for c in fit["cards"] if c["card"] == "T4")
    assert t4["capacity"] == 16 * 1024**3
    assert t4["fits_at_measured_batch"] is True
    expected = int((t4["capacity"] * 0.9 - fit["fixed_bytes"]) // fit["bytes_per_sample"])
    assert t4["largest_batch"] == expected
    assert any("CUDA context" in n for n in fit["notes"])


def test_fit_focus_margin_and_custom_cards():
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    entry = measured(model, opt, b=2)
    cards = parse_cards(["Tiny=0.001"])
    fit = plan_fit(entry.memory, cards=cards, margin=0.5, focus="tiny")
    assert [c["card"] for c in fit["cards"]] == ["Tiny"]
    row = fit["cards"][0]
    assert row["usable"] == int(0.001 * 1024**3 * 0.5)
    assert row["fits_at_measured_batch"] == (row["required_at_measured_batch"] <= row["usable"])
    assert resolve_card("a100", CARDS) == "A100-80GB"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: resolve_card("X9", CARDS), "unknown card"),
        (lambda: parse_cards(["bad"]), "NAME=GiB"),
        (lambda: parse_cards(["x=-1"]), "positive"),
        (lambda: parse_batches("4,0"), "positive whole numbers"),
        (lambda: parse_batches("a"), "positive whole numbers"),
        (lambda: parse_batches("4,4"), "repeated"),
    ],
)
def test_bad_planning_input_is_one_line(call, message):
    with pytest.raises(ProfilerError) as info:
        call()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_impossible_margin_is_refused():
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    entry = measured(model, opt, b=2, steps=1)
    with pytest.raises(ProfilerError, match="margin"):
        plan_fit(entry.memory, margin=1.0)


def test_estimates_and_fit_in_json():
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    entry = measured(model, opt, b=2)
    d = entry.to_dict()
    assert d["estimates"]["formulas"] and d["fit"]["cards"]
    text = entry.render()
    assert "Textbook estimates" in text and "Will it fit?" in text


def test_a_conv1d_trunk_gets_no_sequence_length_from_its_channels():
    # (batch, channels, length) into Conv1d blocks is not (batch, sequence, hidden).
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(16, 16, 5, padding=2)
            self.attn = torch.nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x):
            x = x + self.conv(x)
            t = x.transpose(1, 2)
            return x + self.attn(t, t, t, need_weights=False)[0].transpose(1, 2)

    model = torch.nn.Sequential(torch.nn.Conv1d(2, 16, 3, padding=1), *[Block() for _ in range(3)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with profile(model, sample_interval=None) as prof:
        for _ in range(2):
            model(torch.randn(4, 2, 40)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    entry = prof.report.models[0]
    assert entry.memory["steps"][-1]["trunk_input_shape"] == [4, 16, 40]
    assert entry.estimates["shape"]["seq"] is None
    kort = next(f for f in entry.estimates["formulas"] if f["name"].startswith("korthikanti"))
    assert kort["applicable"] is False and "no sequence length" in kort["reason"]


def test_class_labels_beside_the_input_are_not_token_ids():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    class WithLabels(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x, labels):
            return torch.nn.functional.cross_entropy(self.net(x), labels)

    wrapped = WithLabels()
    with profile(wrapped, sample_interval=None) as prof:
        wrapped(torch.randn(6, 8), torch.randint(0, 4, (6,))).backward()
        opt.step()
    step = prof.report.models[0].memory["steps"][0]
    assert step["input_shape"] == [6, 8] and step["input_is_tokens"] is False
