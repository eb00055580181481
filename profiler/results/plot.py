"""Draw one training step's memory as a picture.

The tables of the text report say how big each category is at the end of a
step; they cannot say *when* memory is held. A step's peak is usually not at
its end: activations pile up through forward and drain through backward while
gradients fill in, and the optimizer creates its state on the first step. The
picture answers the questions the tables leave open:

* which category dominates at each moment of the step (a stacked area of
  parameters, optimizer state, gradients, autocast weight copies and
  activations over time);
* where the peak is, and in which phase (forward / backward / optimizer are
  shaded, the highest point of the stack is marked, and on CUDA the caching
  allocator's per-phase peaks are drawn as ticks);
* how much the process really holds beyond what the hooks can attribute: on
  CUDA the NVML line, whose gap above the stack is the CUDA context,
  workspaces, temporaries and fragmentation; on CPU host RSS, on its own axis
  because it also counts the interpreter and every library loaded;
* which part of the model the activations come from (the bar chart by
  bucket: embedding, blocks, head, other).

matplotlib is an optional extra (``pip install matplotlib``, or the ``[plot]`` extra), imported
only when a plot is drawn. Figures are made with ``matplotlib.figure.Figure``
and the Agg canvas directly, never through ``pyplot``, so drawing a plot from
inside a notebook or an application leaves its backend and open figures alone.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from ..errors import ProfilerError
from .schema import MemoryJSON, StepJSON
from .steps import described_step
from .units import format_bytes

__all__ = ["plot_step", "plot_report", "matplotlib_available", "MISSING_MATPLOTLIB"]

MISSING_MATPLOTLIB = (
    "drawing the plot needs matplotlib: pip install matplotlib (or, from a checkout, pip install -e '.[plot]')"
)

# Bottom to top: what lives across steps first, what comes and goes on top,
# so the transient part of the stack is the part that moves.
_STACK = (
    ("parameters", "parameters", "#4C72B0"),
    ("optimizer_state", "optimizer state", "#8172B3"),
    ("gradients", "gradients", "#DD8452"),
    ("autocast_copies", "autocast weight copies", "#937860"),
    ("activations", "activations (saved for backward)", "#55A868"),
)
# Phase and measured-line colours are hues the stack does not use, so nothing reads as a category.
_PHASE_COLORS = {"forward": "#1F9EB3", "backward": "#D62728", "optimizer": "#9A9B1C"}
_NVML_COLOR = "#E7298A"
_RSS_COLOR = "#444444"
_BUCKET_COLORS = {"embedding": "#64B5CD", "block": "#55A868", "head": "#CCB974", "other": "#8C8C8C"}

_MIB = float(1 << 20)
_FIGSIZE = (13.0, 5.6)  # inches
_DPI = 100


def matplotlib_available() -> bool:
    """Whether plots can be drawn, so a caller can say so before running a long script."""
    try:
        _import_matplotlib()
    except ProfilerError:
        return False
    return True


def _import_matplotlib() -> tuple[Any, Any]:
    """``(Figure, FigureCanvasAgg)``, imported on first use; the extra is optional."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ProfilerError(MISSING_MATPLOTLIB) from exc
    return Figure, FigureCanvasAgg


# --------------------------------------------------------------------- choosing


def _pick_step(memory: MemoryJSON, step: int | None) -> StepJSON:
    """The step to draw: ``step`` matches a step's ``index`` as the text report prints it.

    By default the step the tables describe (``steps.described_step``): the
    last one that updated the weights, the steady state a training run
    repeats (the first step also creates the optimizer state).
    """
    steps = memory.get("steps") or []
    if not steps:
        raise ProfilerError("nothing to plot: no training step was measured")
    if step is None:
        return described_step(steps)
    for s in steps:
        if s.get("index") == step:
            return s
    known = ", ".join(str(s.get("index")) for s in steps)
    raise ProfilerError(f"no step {step} to plot; the measured steps are: {known}")


def _step_end(s: StepJSON, times: list[float]) -> float:
    """When the step ended, in seconds since it began (never before its last event)."""
    end = float(s.get("seconds") or 0.0)
    for spans in (s.get("phase_spans") or {}).values():
        for _, b in spans:
            end = max(end, float(b))
    if times:
        end = max(end, max(times))
    return end if end > 0 else 1e-6


def _series(s: StepJSON) -> tuple[list[float], dict[str, list[float]], float]:
    """Times, each category's bytes held from that time on (step-post semantics), step end.

    Parameters are constant; optimizer state and gradients start at what was
    alive when the step began; autocast copies and activations start at zero.
    Every event adds its delta; several events at one instant make one point.
    """
    tl = s.get("timeline")
    if tl is None:
        raise ProfilerError(f"step {s.get('index')} has no timeline to plot (report written by an older profiler)")
    baseline = s.get("baseline") or {}
    params = baseline.get("parameters", (s.get("categories") or {}).get("parameters") or 0)
    value = {
        "parameters": float(params or 0),
        "optimizer_state": float(baseline.get("optimizer_state") or 0),
        "gradients": float(baseline.get("gradients") or 0),
        "autocast_copies": 0.0,
        "activations": 0.0,
    }
    events = sorted(zip(tl.get("t", []), tl.get("category", []), tl.get("delta", [])), key=lambda e: e[0])
    times = [0.0]
    series = {k: [v] for k, v in value.items()}
    for t, category, delta in events:
        if category not in value:
            continue
        t = max(float(t), 0.0)
        value[category] += delta
        if t != times[-1]:
            times.append(t)
            for k in series:
                series[k].append(value[k])
        else:
            for k in series:
                series[k][-1] = value[k]
    # What is held when the step ends (the first step's new optimizer state is counted
    # at the very end) must be visible: run the last values a little past the end.
    step_end = _step_end(s, times)
    times.append(step_end * 1.03)
    for k in series:
        # A storage freed here but saved before the step began would go below zero:
        # nothing can hold negative memory, so the stack starts at zero.
        series[k] = [max(v, 0.0) for v in series[k]]
        series[k].append(series[k][-1])
    return times, series, step_end


def _samples_in_step(memory: MemoryJSON, s: StepJSON, end: float) -> dict[str, tuple[list[float], list[float]]]:
    """Sampler readings taken during this step, on the step's clock, per column."""
    sampler = memory.get("sampler") or {}
    tl = sampler.get("timeline") or {}
    offset = s.get("sampler_offset")
    if offset is None or not tl.get("t"):
        return {}
    slack = 1e-4 * max(end, 1e-3)
    out: dict[str, tuple[list[float], list[float]]] = {}
    for column in ("nvml_process_used", "nvml_device_used", "host_rss"):
        xs, ys = [], []
        for t, v in zip(tl["t"], tl.get(column) or []):
            rel = float(t) - float(offset)
            if v is not None and -slack <= rel <= end + slack:
                xs.append(min(max(rel, 0.0), end))
                ys.append(float(v))
        if xs:
            out[column] = (xs, ys)
    return out


def _time_scale(end: float) -> tuple[float, str]:
    """Milliseconds for the short steps of small models, seconds for long ones."""
    return (1e3, "ms") if end < 2.0 else (1.0, "s")


# --------------------------------------------------------------------- drawing


def _fmt_time(value: float) -> str:
    """Three significant digits, without falling into exponent notation for 1000 ms and up."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _marker(xs: list[float]) -> str:
    """Dots on sparse samples show where readings were taken; dense ones would be a smear."""
    return "o" if len(xs) <= 40 else ""


def _phase_at(spans: dict[str, Any], t: float) -> str | None:
    """The phase running at time ``t`` (seconds since the step began), or the one just before."""
    before: tuple[float, str] | None = None
    for name, ranges in spans.items():
        for a, b in ranges or []:
            if a <= t <= b:
                return name
            if b < t and (before is None or b > before[0]):
                before = (b, name)
    return f"after {before[1]}" if before else None


def _draw_timeline(ax: Any, memory: MemoryJSON, s: StepJSON) -> list[Any]:
    """Draw the step's memory over time on ``ax``; return the handles for the legend."""
    import matplotlib.transforms as mtransforms
    import numpy as np
    from matplotlib.patches import Patch

    times, series, step_end = _series(s)
    end = times[-1]
    scale, unit = _time_scale(end)
    x = np.asarray(times) * scale
    handles: list[Any] = []

    lower = np.zeros(len(x))
    for key, label, color in _STACK:
        y = np.asarray(series[key]) / _MIB
        if key != "parameters" and not y.any():
            continue  # a category that never held memory would only clutter the legend
        upper = lower + y
        handles.append(ax.fill_between(x, lower, upper, step="post", color=color, alpha=0.85, linewidth=0, label=label))
        lower = upper
    total = lower
    ax.step(x, total, where="post", color="black", linewidth=0.8)

    top = float(total.max()) if len(total) else 0.0

    # Where the stack is highest: the moment a smaller batch or checkpointing would have to lower.
    # The marker sits where the label says, at the moment the peak is reached, in the phase it names
    # (not in the middle of the plateau that follows, which may be the next phase).
    i = int(np.argmax(total))
    spans = s.get("phase_spans") or {}
    where = "end of step" if times[i] >= step_end else _phase_at(spans, times[i])
    peak = format_bytes(int(round(total[i] * _MIB)))
    label = f"peak of the stack: {peak}, reached at {_fmt_time(times[i] * scale)} {unit}"
    above = mtransforms.offset_copy(ax.transData, fig=ax.figure, y=5, units="points")
    (peak_marker,) = ax.plot(
        [times[i] * scale],
        [total[i]],
        marker="v",
        color="black",
        markersize=7,
        linestyle="none",
        transform=above,
        label=label + (f" ({where})" if where else ""),
    )
    handles.append(peak_marker)

    # The caching allocator's own peak per phase (CUDA only): ticks across each phase.
    phases = s.get("phases") or {}
    tick_label = "allocator peak per phase"
    for name, ph in phases.items():
        peak = (ph or {}).get("peak_allocated")
        if peak is None:
            continue
        for a, b in spans.get(name, []) or []:
            line = ax.hlines(
                peak / _MIB, a * scale, b * scale, colors="black", linestyles="--", linewidth=1.5, label=tick_label
            )
            if tick_label:
                handles.append(line)
                tick_label = None
            top = max(top, peak / _MIB)

    samples = _samples_in_step(memory, s, end)
    rss_ax = None
    device_key = (
        "nvml_process_used"
        if "nvml_process_used" in samples
        else ("nvml_device_used" if "nvml_device_used" in samples else None)
    )
    if device_key is not None:
        xs, ys = samples[device_key]
        label = "NVML process used" if device_key == "nvml_process_used" else "NVML device used (all processes)"
        (line,) = ax.plot(
            np.asarray(xs) * scale,
            np.asarray(ys) / _MIB,
            color=_NVML_COLOR,
            marker=_marker(xs),
            markersize=3,
            linewidth=1.6,
            label=label,
        )
        handles.append(line)
        top = max(top, max(ys) / _MIB)
    elif "host_rss" in samples:
        # Host RSS includes the interpreter and every library: hundreds of MiB that are
        # not the step's. Its own axis keeps the stack readable; the shape is what matters.
        xs, ys = samples["host_rss"]
        rss_ax = ax.twinx()
        (line,) = rss_ax.plot(
            np.asarray(xs) * scale,
            np.asarray(ys) / _MIB,
            color=_RSS_COLOR,
            linestyle="--",
            marker=_marker(xs),
            markersize=3,
            linewidth=1.0,
            label="host RSS (psutil), right axis",
        )
        rss_ax.set_ylabel("host RSS (psutil), MiB", color=_RSS_COLOR)
        rss_ax.tick_params(axis="y", colors=_RSS_COLOR)
        lo, hi = min(ys) / _MIB, max(ys) / _MIB
        pad = max((hi - lo) * 0.25, 1.0)
        rss_ax.set_ylim(max(lo - pad, 0.0), hi + pad)
        handles.append(line)

    ax.set_xlim(0, end * scale)
    ax.set_ylim(0, top * 1.12 if top > 0 else 1.0)
    ax.set_xlabel(f"time since the step began ({unit})")
    ax.set_ylabel("memory (MiB)")
    ax.grid(axis="y", alpha=0.3)

    # Phases: shaded behind the stack, named in a strip just above the axes.
    strip = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
    width = end * scale
    for name, ranges in spans.items():
        color = _PHASE_COLORS.get(name, "#999999")
        named = False
        for a, b in ranges or []:
            ax.axvspan(a * scale, b * scale, color=color, alpha=0.08, zorder=0)
            ax.axvline(a * scale, color=color, alpha=0.5, linewidth=0.8, zorder=0.5)
            ax.add_patch(_strip_patch(a * scale, b * scale, strip, color))
            if (b - a) * scale >= 0.06 * width:  # room for the name above the span
                ax.text(
                    (a + b) / 2 * scale,
                    1.012,
                    name,
                    transform=strip,
                    ha="center",
                    va="bottom",
                    fontsize=9,
                    color=color,
                    clip_on=False,
                )
                named = True
        if ranges and not named:  # every span too short to name: say in the legend what the colour is
            handles.append(Patch(color=color, alpha=0.9, label=f"{name} (bar above the plot)"))

    return handles


def _strip_patch(a: float, b: float, transform: Any, color: str) -> Any:
    """A thin coloured bar just above the axes marking one phase span."""
    from matplotlib.patches import Rectangle

    return Rectangle((a, 1.0), b - a, 0.01, transform=transform, color=color, alpha=0.9, clip_on=False, linewidth=0)


def _draw_buckets(ax: Any, s: StepJSON) -> None:
    by_bucket = s.get("activations_by_bucket") or {}
    names = list(by_bucket) or ["embedding", "block", "head", "other"]
    values = [float(by_bucket.get(n) or 0) / _MIB for n in names]
    total = sum(values)
    bars = ax.bar(names, values, color=[_BUCKET_COLORS.get(n, "#8C8C8C") for n in names], width=0.65)
    ax.set_title("activations by bucket", fontsize=10)
    ax.set_ylabel("MiB")
    ax.grid(axis="y", alpha=0.3)
    ax.tick_params(axis="x", labelsize=9)
    if total <= 0:
        ax.set_ylim(0, 1)
        ax.text(0.5, 0.5, "no activations measured", transform=ax.transAxes, ha="center", va="center", color="#555555")
        return
    ax.set_ylim(0, max(values) * 1.22)
    for bar, v in zip(bars, values):
        share = 100 * v / total
        ax.annotate(
            f"{format_bytes(int(round(v * _MIB)))}\n{share:.0f}%",
            (bar.get_x() + bar.get_width() / 2, v),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
        )


def _default_title(memory: MemoryJSON, s: StepJSON) -> str:
    """Which step, of what input, on which device and optimizer: what the numbers depend on."""
    kind = s.get("kind", "step") + ("" if s.get("complete", True) else ", incomplete")
    title = f"training step {s.get('index')} ({kind})"
    shape = s.get("input_shape")
    if shape:
        title += ", input " + "\u00d7".join(map(str, shape)) + (" tokens" if s.get("input_is_tokens") else "")
    if memory.get("device"):
        title += f", on {memory['device']}"
    if memory.get("optimizer"):
        title += f", {memory['optimizer']}"
    return title


def plot_step(
    memory: MemoryJSON,
    path: str | os.PathLike[str],
    step: int | None = None,
    title: str | None = None,
) -> pathlib.Path:
    """Write a PNG of one step of a model's ``memory`` section and return its path.

    Left: the step's memory over time, stacked by category, with the phases,
    the tracked peak, the allocator's per-phase peaks (CUDA) and the sampled
    NVML process memory (or host RSS on CPU). Right: activations by bucket.

    Args:
        memory: a model's ``memory`` section from ``Report.to_dict()``.
        path: where to write the PNG.
        step: the step's ``index`` as the text report prints it; default the
            last complete step.
        title: the figure's title; by default the step, device and optimizer.
    """
    Figure, FigureCanvasAgg = _import_matplotlib()
    s = _pick_step(memory, step)
    out = pathlib.Path(path)

    fig = Figure(figsize=_FIGSIZE, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    try:
        grid = fig.add_gridspec(1, 2, width_ratios=(3.2, 1))
        handles = _draw_timeline(fig.add_subplot(grid[0, 0]), memory, s)
        _draw_buckets(fig.add_subplot(grid[0, 1]), s)
        # Below both panels, across the whole width, so long labels never squeeze the plot.
        fig.legend(handles=handles, loc="outside lower center", ncol=min(4, len(handles)), fontsize=9, frameon=False)
        fig.suptitle(title if title is not None else _default_title(memory, s), fontsize=12)
        try:
            fig.savefig(out, format="png", dpi=_DPI)
        except OSError as exc:
            raise ProfilerError(f"cannot write the plot to {out}: {exc.strerror or exc}") from exc
    finally:
        fig.clear()
    return out


def plot_report(
    report_dict: dict[str, Any],
    path: str | os.PathLike[str],
    model: str | None = None,
    step: int | None = None,
) -> pathlib.Path:
    """Plot one model of a ``Report.to_dict()`` (or its JSON, loaded) with :func:`plot_step`.

    Args:
        report_dict: the report as a dict.
        path: where to write the PNG.
        model: the model's name in the report; default the first model that
            has measured steps.
        step: the step's ``index``; default the last complete step.
    """
    _import_matplotlib()  # say what is missing before looking at the report
    models = report_dict.get("models") or []
    if model is not None:
        chosen = next((m for m in models if m.get("name") == model), None)
        if chosen is None:
            names = ", ".join(repr(m.get("name")) for m in models) or "none"
            raise ProfilerError(f"no model named {model!r} in the report (models: {names})")
        if not (chosen.get("memory") or {}).get("steps"):
            raise ProfilerError(f"nothing to plot: model {model!r} has no measured training step")
    else:
        chosen = next((m for m in models if (m.get("memory") or {}).get("steps")), None)
        if chosen is None:
            raise ProfilerError("nothing to plot: no model in the report has a measured training step")
    memory = chosen["memory"]
    s = _pick_step(memory, step)
    name = chosen.get("name") or "model"
    cls = chosen.get("class")
    who = name if not cls or cls == name else f"{name} ({cls})"
    title = f"{who}: {_default_title(memory, s)}"
    return plot_step(memory, path, step=s.get("index"), title=title)
