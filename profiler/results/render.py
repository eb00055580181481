"""The report as text tables: what ``Report.render()`` and the command line print.

Presentation only: everything shown is read from the report's data (the
inventory, the buckets and the JSON-shaped sections), so the text and the
JSON can never disagree about a figure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tabulate import tabulate

from ..model.buckets import BUCKETS, Trunk
from .render_projection import render_projection
from .render_ranks import render_ranks
from .schema import MemoryJSON
from .steps import shown_steps
from .units import format_bytes, format_count

if TYPE_CHECKING:
    from .report import ModelReport, Report

__all__ = [
    "format_bytes",
    "format_count",
    "render_estimates",
    "render_fit",
    "render_memory",
    "render_model",
    "render_report",
]


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def render_model(m: ModelReport, depth: int = 2) -> str:
    """The text report of one model: its parameters, then what was measured of its steps."""
    inv, b = m.inventory, m.buckets
    total = inv.total
    parts = [f"== {m.name} ({inv.model_class}) =="]
    parallel = m.extra.get("parallel")
    if parallel is not None:
        wrapper = parallel.get("wrapper") or "no data-parallel wrapper"
        parts.append(
            f"rank {parallel['rank']} of {parallel['world_size']} ({wrapper}): every figure below is this rank's"
            + ("; rank 0 prints every rank's at the end" if parallel["world_size"] > 1 else "")
        )
        parts.extend(f"note: {n}" for n in parallel.get("notes", []))
    summary = [
        ["parameters (unique)", format_count(total), format_bytes(inv.bytes)],
        ["parameters (with duplicates)", format_count(inv.total_with_duplicates), ""],
        ["trainable", format_count(inv.trainable), ""],
        ["frozen", format_count(total - inv.trainable), ""],
        ["buffers", format_count(inv.buffer_total), format_bytes(inv.buffer_bytes)],
    ]
    parts.append(tabulate(summary, headers=["", "count", "bytes"], colalign=("left", "right", "right")))
    if inv.uninitialized:
        names = ", ".join(inv.uninitialized[:4]) + (", ..." if len(inv.uninitialized) > 4 else "")
        parts.append(
            f"note: {len(inv.uninitialized)} lazy parameter(s) not initialised yet (their module never ran), "
            f"not counted: {names}"
        )

    rows = [[k, format_count(b.totals[k]), _percent(b.totals[k], total), format_bytes(b.bytes[k])] for k in BUCKETS]
    rows.append(
        [
            "total",
            format_count(sum(b.totals.values())),
            _percent(sum(b.totals.values()), total),
            format_bytes(sum(b.bytes.values())),
        ]
    )
    placed = "; placed by the order the modules ran in" if b.run_order else ""
    parts.append(
        f"Buckets (found from the structure{placed}; a tied tensor is charged once)\n"
        + tabulate(rows, headers=["bucket", "params", "share", "bytes"], colalign=("left", "right", "right", "right"))
    )

    if b.trunks:
        rows = [
            [t.path or "(root)", t.blocks, format_count(t.params_per_block), format_count(t.params)] for t in b.trunks
        ]
        parts.append(
            "Trunks\n"
            + tabulate(
                rows, headers=["path", "blocks", "params/block", "params"], colalign=("left", "right", "right", "right")
            )
        )
    elif b.cores:
        parts.append(
            f"Trunks: no run of structurally identical blocks found; the recurrent core ({', '.join(b.cores)}) is "
            "the block bucket, what runs before it embedding, after it head."
        )
    elif b.totals["embedding"]:
        parts.append(
            "Trunks: no run of structurally identical blocks found; the embedding tables are 'embedding', every "
            "other parameter is in 'other'."
        )
    else:
        parts.append("Trunks: no run of structurally identical blocks found; every parameter is in 'other'.")

    if inv.tie_groups:
        rows = []
        for p in inv.tie_groups:
            aliases = "\n".join(f"{a} [{b.alias_bucket[a]}]" for a in p.aliases)
            rows.append([aliases, format_count(p.numel), format_bytes(p.nbytes), b.param_bucket[p.name]])
        parts.append(
            "Tied parameters (one tensor, several names; counted once)\n"
            + tabulate(
                rows,
                headers=["aliases [bucket]", "params", "bytes", "charged to"],
                colalign=("left", "right", "right", "left"),
            )
        )
    else:
        parts.append("Tied parameters: none (no two names share storage).")

    parts.append(_render_tree(m, depth))
    for t in b.trunks:
        parts.append(_render_breakdown(t))

    wm = inv.weight_memory()
    parts.append(
        "Weight memory by storage format (unique parameters)\n"
        + tabulate(
            [[k, format_bytes(v)] for k, v in wm.items()], headers=["format", "bytes"], colalign=("left", "right")
        )
    )
    if m.memory is not None:
        parts.extend(render_memory(m.memory))
    if m.estimates is not None:
        parts.extend(render_estimates(m.estimates))
    projection = m.extra.get("projection")
    if projection is not None and projection.get("available"):
        parts.extend(render_projection(projection))  # the fit from the CPU's categories is superseded
    elif m.fit is not None:
        parts.extend(render_fit(m.fit))
    return "\n\n".join(parts)


def _render_tree(model: ModelReport, depth: int) -> str:
    rows = []
    for m in model.inventory.modules:
        if m.depth > depth or (m.params == 0 and m.buffers == 0 and m.depth > 0):
            continue
        label = "  " * m.depth + (m.path.rpartition(".")[2] if m.path else "(root)")
        rows.append([label, m.type, format_count(m.params), format_bytes(m.bytes), model.buckets.module_bucket[m.path]])
    return f"Modules to depth {depth} (subtree unique parameters)\n" + tabulate(
        rows,
        headers=["module", "type", "params", "bytes", "bucket"],
        colalign=("left", "left", "right", "right", "left"),
        preserve_whitespace=True,  # the leading spaces show the nesting
    )


def _render_breakdown(trunk: Trunk) -> str:
    by_module: dict[str, dict[str, Any]] = {}
    for p in trunk.breakdown:
        row = by_module.setdefault(p.module, {"type": p.type, "weight": None, "bias": None, "other": []})
        if p.name in ("weight", "bias") and row[p.name] is None:
            row[p.name] = p
        else:
            row["other"].append(p)
    rows = []
    total = 0
    for mod, r in by_module.items():
        w, bias = r["weight"], r["bias"]
        other = sum(p.numel for p in r["other"])
        n = (w.numel if w else 0) + (bias.numel if bias else 0) + other
        total += n
        rows.append(
            [
                mod or "(block)",
                r["type"],
                "x".join(map(str, w.shape)) if w else "-",
                format_count(w.numel) if w else "-",
                "x".join(map(str, bias.shape)) if bias else "-",
                format_count(bias.numel) if bias else "-",
                ", ".join(f"{p.name} {'x'.join(map(str, p.shape))}" for p in r["other"]) or "-",
                format_count(n),
            ]
        )
    rows.append(["total", "", "", "", "", "", "", format_count(total)])
    head = f"One block of {trunk.path or '(root)'}: {trunk.representative} (x{trunk.blocks}), weights and biases"
    return (
        head
        + "\n"
        + tabulate(
            rows,
            headers=["submodule", "type", "weight", "params", "bias", "params", "other", "total"],
            colalign=("left", "left", "right", "right", "right", "right", "left", "right"),
        )
    )


def render_report(report: Report, depth: int = 2) -> str:
    """Every model's text report, then the report's notes."""
    parts = [render_model(m, depth) for m in report.models]
    if not report.models:
        parts.append("No model with parameters was found.")
    if report.ranks is not None:
        parts.extend(render_ranks(report.ranks))
    parts.extend(f"note: {n}" for n in report.notes)
    return "\n\n".join(parts)


_CATEGORY_LABELS = [
    ("parameters", "parameters"),
    ("gradients", "gradients"),
    ("optimizer_state", "optimizer state"),
    ("activations", "activations (saved for backward)"),
    ("autocast_copies", "autocast weight copies"),
    ("other", "other (temporaries, workspace)"),
]

_PEAK_LABELS = [
    ("peak_allocated", "peak allocated (allocator)"),
    ("live_tensor_peak", "live-tensor peak (dispatch tracking)"),
    ("reserved", "reserved (allocator)"),
    ("nvml_process_used_peak", "NVML process used, peak"),
    ("nvml_device_used_peak", "NVML device used, peak"),
    ("nvml_device_used_above_baseline_peak", "NVML device used above the sampler's start, peak"),
    ("host_rss_peak", "host RSS, peak"),
]


def render_memory(memory: MemoryJSON) -> list[str]:
    """Text tables of the measured memory section."""
    steps = memory.get("steps", [])
    parts = []
    if not steps:
        parts.append("Memory: no training step was measured.")
        parts.extend(f"  note: {n}" for n in memory.get("notes", []))
        return parts
    shown = shown_steps(steps)
    headers = ["measured on " + memory["device"]] + [f"step {s['index']} ({s['kind']})" for s in shown]
    rows = [[label] + [format_bytes(s["categories"][key]) for s in shown] for key, label in _CATEGORY_LABELS]
    rows += [
        [label] + [format_bytes(s.get(key)) for s in shown]
        for key, label in _PEAK_LABELS
        if key not in ("nvml_device_used_above_baseline_peak", "live_tensor_peak") or shown[-1].get(key) is not None
    ]
    for s in shown:
        nvml, reserved = s.get("nvml_process_used_peak"), s.get("reserved")
        if nvml is not None and reserved is not None:
            rows.append(
                ["CUDA context + library workspaces (NVML process - reserved)"]
                + [
                    format_bytes(x.get("nvml_process_used_peak", 0) - (x.get("reserved") or 0))
                    if x.get("nvml_process_used_peak") is not None
                    else "n/a"
                    for x in shown
                ]
            )
            break
    parts.append(
        "Memory of a training step\n" + tabulate(rows, headers=headers, colalign=("left",) + ("right",) * len(shown))
    )

    steady = shown[-1]
    live = steady.get("live_tensor_peak") is not None
    peak_key, peak_label = (
        ("live_tensor_peak", "live-tensor peak")
        if live and steady.get("peak_allocated") is None
        else ("peak_allocated", "peak allocated")
    )
    device_time = any(ph.get("gpu_seconds") is not None for ph in steady["phases"].values())
    phase_rows = [
        [name, _seconds(ph["seconds"])]
        + ([_seconds(ph.get("gpu_seconds"))] if device_time else [])
        + [
            format_bytes(ph.get(peak_key)),
            format_bytes(ph.get("host_rss_peak")),
            format_bytes(ph.get("nvml_process_used_peak")),
        ]
        for name, ph in steady["phases"].items()
    ]
    headers = ["phase", "host seconds" if device_time else "seconds"] + (["GPU seconds"] if device_time else [])
    headers += [peak_label, "host RSS peak", "NVML process peak"]
    # disable_numparse: tabulate would print a short phase's "0.000412" as "0".
    parts.append(
        f"Phases of step {steady['index']}\n"
        + tabulate(
            phase_rows, headers=headers, colalign=("left",) + ("right",) * (len(headers) - 1), disable_numparse=True
        )
    )

    opt = steady.get("optimizer_state", {})
    if opt.get("by_name"):
        rows = [[k, format_bytes(v)] for k, v in opt["by_name"].items()]
        rows += [[f"param group {i}", format_bytes(v)] for i, v in enumerate(opt.get("by_group", []))]
        parts.append(
            f"Optimizer state ({memory.get('optimizer')})\n"
            + tabulate(rows, headers=["state", "bytes"], colalign=("left", "right"))
        )

    act = steady.get("activations_by_bucket", {})
    total_act = steady["categories"]["activations"]
    rows = [[b, format_bytes(v), _percent(v, total_act)] for b, v in act.items()]
    parts.append(
        f"Activations by bucket (step {memory.get('activations_step')})\n"
        + tabulate(rows, headers=["bucket", "bytes", "share"], colalign=("left", "right", "right"))
    )
    top = memory.get("activations_by_block_module", [])[:12]
    if top:
        rows = [
            [
                m["path"] or "(root)",
                m["bucket"],
                m["modules"],
                format_bytes(m["bytes"]),
                _percent(m["bytes"], total_act),
            ]
            for m in top
        ]
        parts.append(
            "Activations by module, largest first (each saved tensor charged to the innermost module that saved it; "
            "'*' sums that module over every block)\n"
            + tabulate(
                rows,
                headers=["module", "bucket", "modules", "bytes", "share"],
                colalign=("left", "left", "right", "right", "right"),
            )
        )
    parts.extend(f"note: {n}" for n in memory.get("notes", []))
    return parts


def _seconds(value: float | None) -> str:
    """Milliseconds shown: a phase of a small model takes well under one."""
    if value is None:
        return "n/a"
    return f"{value:.3f}" if value >= 0.001 else f"{value:.6f}"


def _known(value: Any) -> str:
    return "unknown" if value is None else str(value)


def _error(e: float | None) -> str:
    if e is None:
        return "n/a"
    text = f"{100 * e:+.0f}%"
    return "0%" if text in ("+0%", "-0%") else text  # an exact match, or within half a percent


def render_estimates(est: dict[str, Any]) -> list[str]:
    """Each formula beside the measurement, with its error and what it leaves out."""
    if not est.get("available"):
        return [f"Estimates: {est.get('reason')}"]
    shape = est["shape"]
    head = (
        f"Textbook estimates beside the measurement (step {est['step']}; "
        f"batch {_known(shape['batch'])}, seq {_known(shape['seq'])}"
        f"{' (' + shape['seq_source'] + ')' if shape.get('seq_source') else ''}, {_known(shape['layers'])} layers, "
        f"hidden {_known(shape['hidden'])}, {_known(shape['heads'])} heads; "
        f"{'mixed precision' if est['mixed_precision'] else 'no autocast'})"
    )
    rows = []
    for f in est["formulas"]:
        if not f["applicable"]:
            rows.append(
                [f["name"], "n/a", format_bytes(f["measured"]), "n/a", "not applicable: " + (f["reason"] or "")]
            )
            continue
        rows.append(
            [
                f["name"],
                format_bytes(f["estimate"]),
                format_bytes(f["measured"]),
                _error(f["error"]),
                "\n".join(f["misses"]),
            ]
        )
    parts = [
        head
        + "\n"
        + tabulate(
            rows,
            headers=["formula", "estimate", "measured", "error", "what it misses"],
            colalign=("left", "right", "right", "right", "left"),
        )
    ]
    tutorial = next((f for f in est["formulas"] if f["name"] == "tutorial" and f["applicable"]), None)
    if tutorial:
        rows = [
            [t["term"], format_bytes(t["estimate"]), format_bytes(t["measured"]), _error(t["error"])]
            for t in tutorial["terms"]
        ]
        parts.append(
            "The tutorial's formula, term by term\n"
            + tabulate(
                rows, headers=["term", "tutorial", "measured", "error"], colalign=("left", "right", "right", "right")
            )
        )
    parts.append(
        "Sources\n" + tabulate([[f["name"], f["source"]] for f in est["formulas"]], headers=["formula", "source"])
    )
    return parts


def render_fit(fit: dict[str, Any]) -> list[str]:
    """Does it fit, and the largest batch per card, with the assumption used."""
    if not fit.get("available"):
        return [f"Fit planning: {fit.get('reason')}"]
    rows = []
    for c in fit["cards"]:
        rows.append(
            [
                c["card"],
                format_bytes(c["capacity"]),
                format_bytes(c["required_at_measured_batch"]),
                "yes" if c["fits_at_measured_batch"] else "no",
                "n/a" if c["largest_batch"] is None else str(c["largest_batch"]),
            ]
        )
    head = (
        f"Will it fit? (batch {fit['measured_batch']}"
        + (f", seq {fit['sequence_length']}" if fit["sequence_length"] is not None else "")
        + "; "
        f"{format_bytes(fit['fixed_bytes'])} fixed + {format_bytes(int(fit['bytes_per_sample']))} per sample; "
        f"safety margin {100 * fit['margin']:.0f}%)"
    )
    parts = [
        head
        + "\n"
        + tabulate(
            rows,
            headers=["card", "memory", "needed now", "fits", "largest batch"],
            colalign=("left", "right", "right", "left", "right"),
        )
    ]
    parts.append(f"fit method: {fit['method']}; measured quantity: {fit['source']}")
    parts.extend(f"note: {n}" for n in fit.get("notes", []))
    return parts
