"""The memory plot: a real PNG from a real profiled run, and clear errors when it cannot be drawn."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from profiler import ProfilerError, analyze, profile
from profiler.results import plot
from profiler.results.plot import matplotlib_available, plot_report, plot_step

# Everything but the missing-matplotlib test needs the optional extra.
needs_matplotlib = pytest.mark.skipif(not matplotlib_available(), reason="matplotlib (profiler[plot]) not installed")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True, tie_weights=True)


def _train(nanogpt, steps: int = 3, autocast: bool = False) -> dict:
    """Profile a few AdamW steps of a tiny GPT on the CPU; return the report as a dict."""
    torch.manual_seed(0)
    model = nanogpt.GPT(nanogpt.GPTConfig(**TINY))
    opt = torch.optim.AdamW(model.parameters())
    with profile(model, sample_interval=0.002) as prof:
        for _ in range(steps):
            x = torch.randint(0, 64, (2, 16))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    # Through JSON, as a report read back from --json would be.
    return json.loads(prof.to_json())


@pytest.fixture(scope="module")
def report(nanogpt) -> dict:
    return _train(nanogpt)


def _check_png(path, size_range=(10_000, 2_000_000)) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert size_range[0] < len(data) < size_range[1]
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        width, height = plot._FIGSIZE
        assert image.size == (round(width * plot._DPI), round(height * plot._DPI))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


@needs_matplotlib
def test_report_plot_is_a_png_of_the_expected_size(report, tmp_path):
    out = plot_report(report, tmp_path / "step.png")
    assert out == tmp_path / "step.png"
    _check_png(out)


@needs_matplotlib
def test_plot_step_takes_a_string_path_and_an_explicit_step(report, tmp_path):
    memory = report["models"][0]["memory"]
    first = memory["steps"][0]["index"]
    out = plot_step(memory, str(tmp_path / "first.png"), step=first, title="first step")
    _check_png(out)


@needs_matplotlib
def test_stack_adds_up_to_the_step_categories(report):
    """The drawn series end where the report's tables say they do."""
    for step in report["models"][0]["memory"]["steps"]:
        times, series, end = plot._series(step)
        cat = step["categories"]
        assert times == sorted(times) and times[-1] > end > 0
        assert series["parameters"][-1] == cat["parameters"]
        assert series["gradients"][-1] == cat["gradients"]
        assert series["optimizer_state"][-1] == cat["optimizer_state"]
        assert max(series["activations"]) == cat["activations"]  # all saved in forward before backward frees
        assert series["activations"][-1] == 0  # backward used them all


@needs_matplotlib
def test_bad_step_index_is_a_one_line_error(report, tmp_path):
    with pytest.raises(ProfilerError) as exc:
        plot_report(report, tmp_path / "x.png", step=99)
    message = _one_line(exc)
    assert "99" in message and "1, 2, 3" in message
    assert not (tmp_path / "x.png").exists()


@needs_matplotlib
def test_unknown_model_name_is_a_one_line_error(report, tmp_path):
    with pytest.raises(ProfilerError) as exc:
        plot_report(report, tmp_path / "x.png", model="nope")
    assert "'GPT'" in _one_line(exc)


@needs_matplotlib
def test_report_without_memory_is_a_one_line_error(nanogpt, tmp_path):
    static = analyze(nanogpt.GPT(nanogpt.GPTConfig(**TINY))).to_dict()
    with pytest.raises(ProfilerError) as exc:
        plot_report(static, tmp_path / "x.png")
    assert "no model" in _one_line(exc)

    no_steps = {"models": [{"name": "m", "memory": {"device": "cpu", "steps": []}}]}
    with pytest.raises(ProfilerError) as exc:
        plot_report(no_steps, tmp_path / "x.png", model="m")
    _one_line(exc)


@needs_matplotlib
def test_unwritable_path_is_a_one_line_error(report, tmp_path):
    with pytest.raises(ProfilerError) as exc:
        plot_report(report, tmp_path / "missing-dir" / "x.png")
    assert "cannot write" in _one_line(exc)


def test_missing_matplotlib_says_how_to_install_it(report, tmp_path, monkeypatch):
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert matplotlib_available() is False
    with pytest.raises(ProfilerError) as exc:
        plot_report(report, tmp_path / "x.png")
    message = _one_line(exc)
    assert "pip install matplotlib" in message and "[plot]" in message
    monkeypatch.undo()
    assert matplotlib_available() is True


@needs_matplotlib
def test_autocast_run_with_weight_copies_renders(nanogpt, tmp_path):
    report = _train(nanogpt, steps=2, autocast=True)
    memory = report["models"][0]["memory"]
    step = memory["steps"][-1]
    assert step["categories"]["autocast_copies"] > 0
    _, series, _ = plot._series(step)
    assert max(series["autocast_copies"]) == step["categories"]["autocast_copies"]
    _check_png(plot_step(memory, tmp_path / "autocast.png"))


@needs_matplotlib
def test_plotting_leaves_pyplot_alone(report, tmp_path):
    """No figure is registered with pyplot, so a notebook's figures and backend are untouched."""
    plt = pytest.importorskip("matplotlib.pyplot")
    before = plt.get_fignums()
    plot_report(report, tmp_path / "x.png")
    assert plt.get_fignums() == before


def _peak_marker(memory: dict, step: dict):
    """The drawn timeline's peak marker: (its x in seconds since the step began, the phase its legend names)."""
    from matplotlib.figure import Figure

    ax = Figure().add_subplot()
    handles = plot._draw_timeline(ax, memory, step)
    marker = next(h for h in handles if h.get_label().startswith("peak of the stack"))
    times, _, _ = plot._series(step)
    scale, _ = plot._time_scale(times[-1])
    phase = re.search(r"\(([a-z ]+)\)$", marker.get_label()).group(1)
    return marker.get_xdata()[0] / scale, phase


@needs_matplotlib
@pytest.mark.parametrize("autocast", [False, True])
def test_the_peak_marker_sits_in_the_phase_its_legend_names(nanogpt, autocast):
    memory = _train(nanogpt, steps=3, autocast=autocast)["models"][0]["memory"]
    for step in memory["steps"]:
        x, phase = _peak_marker(memory, step)
        spans = step["phase_spans"]
        if phase == "end of step":
            assert x >= step["seconds"] * 0.999
        elif phase.startswith("after "):  # between the phases' end and the step's
            assert x >= max(b for a, b in spans[phase[len("after ") :]]), (phase, x, spans)
        else:
            assert any(a <= x <= b for a, b in spans[phase]), (phase, x, spans)


@needs_matplotlib
def test_the_default_plot_draws_the_step_the_tables_describe(report, tmp_path):
    from profiler.results.steps import described_step

    memory = report["models"][0]["memory"]
    # The last complete step is one whose optimizer step a GradScaler skipped: the tables leave it out.
    steps = [dict(s) for s in memory["steps"]] + [dict(memory["steps"][-1], index=99, optimizer_skipped=True)]
    memory = dict(memory, steps=steps)
    assert plot._pick_step(memory, None) is described_step(steps)
    assert plot._pick_step(memory, None)["index"] == memory["activations_step"] != 99
