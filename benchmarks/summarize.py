"""Print the performance tables of benchmarks/README.md from the committed JSON results.

The documentation must not carry numbers that no run produced; this script is
how its tables are made: ``python benchmarks/summarize.py`` reads
``benchmarks/results/*.json`` and prints Markdown tables with the machine
each number came from.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tabulate import tabulate

RESULTS = Path(__file__).resolve().parent / "results"
MODES = (
    "ours",
    "ours_no_sampler",
    "ours_live",
    "watch",
    "hooks_floor",
    "torch_profiler",
    "memtracker",
    "ours_no_reads",
)
LABELS = {
    "ours": "profiler.profile()",
    "ours_no_reads": "profile() without its gradient, state and mode reads (counterfactual)",
    "ours_live": "profiler.profile(live_peak=True), opt-in",
    "ours_no_sampler": "profiler.profile(sample_interval=None): no host-memory sampler",
    "watch": "runner after its steps (model discovery hooks only)",
    "hooks_floor": "profile()'s hooks, doing nothing (floor)",
    "torch_profiler": "torch.profiler (profile_memory)",
    "memtracker": "MemTracker",
}


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def _machine(d: dict) -> str:
    m = d["machine"]
    where = m.get("cuda_device") or f"CPU, {m['cpu_count']} cores"
    return f"{where}, torch {m['torch']}"


def overhead_table() -> str:
    rows = []
    for path in sorted(RESULTS.glob("overhead_*.json")):
        d = json.loads(path.read_text())
        s = d["settings"]
        plain = d["medians"]["plain"]["per_step_s"]
        for mode in MODES:
            if mode not in d["medians"]:
                continue
            r = d["ratios_to_plain"][mode]
            model = s.get("model", {})
            rows_by = f"{model.get('batch')}x{model.get('seq')}" if model.get("seq") else f"batch {model.get('batch')}"
            shape = f"{model.get('preset')} ({rows_by}, {model.get('amp')})"
            rows.append(
                [
                    path.name,
                    shape,
                    s.get("torch_num_threads"),
                    _machine(d),
                    LABELS[mode],
                    f"{plain:.4g}",
                    f"{d['medians'][mode]['per_step_s']:.4g}",
                    f"{r['ratio_of_medians']:.3f}x",
                    f"{r['steps_only_ratio_of_medians']:.3f}x" if "steps_only_ratio_of_medians" in r else "n/a",
                    f"{r['ratio_of_mins']:.3f}x",
                    s.get("steps_per_repeat"),
                    f"{gc_s * 1e3:.3f}" if (gc_s := d["medians"][mode].get("gc_s_per_step")) is not None else "n/a",
                ]
            )
    return tabulate(
        rows,
        headers=[
            "file",
            "model",
            "threads",
            "machine",
            "tool",
            "plain s/step",
            "tool s/step",
            "ratio",
            "steps only",
            "ratio of mins",
            "steps a block",
            "gc ms/step",
        ],
        tablefmt="github",
    )


INSTRUCTION_LABELS = {
    "plain": "plain step",
    "hooks_floor": "profile()'s hooks, doing nothing (floor)",
    "bare_reads": "the step's reads alone (bare_reads.py)",
    "ours": "profiler.profile()",
    "ours_no_gradient_reads": "profile() without its gradient reads (counterfactual)",
    "ours_no_state_reads": "profile() without its optimizer-state reads (counterfactual)",
    "ours_no_mode_reads": "profile() without its mode-signature reads (counterfactual)",
    "ours_no_reads": "profile() without any of these three reads (counterfactual)",
}


def instructions_table() -> str:
    """Instructions per step under each mode (``instructions.py``), and each mode's share of ``profile()``'s."""
    rows = []
    for path in sorted(RESULTS.glob("instructions_*.json")):
        d = json.loads(path.read_text())
        model = d["settings"]["model"]
        for mode, row in d["modes"].items():
            rows.append(
                [
                    path.name,
                    model.get("preset"),
                    INSTRUCTION_LABELS.get(mode, mode),
                    f"{row['instructions_per_step'] / 1e6:.3f} M",
                    f"{row['over_plain_per_step'] / 1e3:+,.0f} k" if "over_plain_per_step" in row else "",
                    f"{row['ratio']:.4f}x" if "ratio" in row else "",
                    f"{row['share_of_ours_over_plain']:.0%}" if "share_of_ours_over_plain" in row else "",
                ]
            )
    if not rows:
        return "(no instructions_*.json)"
    headers = ["file", "model", "mode", "instructions / step", "over plain", "ratio", "share of ours"]
    return tabulate(rows, headers=headers, tablefmt="github")


def static_table() -> str:
    d = _load("static_speed.json")
    if d is None:
        return "(no static_speed.json)"
    rows = [
        [
            name,
            f"{m['params_total']:,}",
            m["device"],
            f"{m['medians']['build_s']:.3f}",
            f"{m['medians']['analyze_s']:.4f}",
        ]
        for name, m in d["models"].items()
    ]
    table = tabulate(rows, headers=["model", "parameters", "device", "build s", "analyze() s"], tablefmt="github")
    return table + f"\n\n({_machine(d)}; target met: {d['target_met']})"


def torchrun_table() -> str:
    d = _load("torchrun_overhead_cpu.json")
    if d is None:
        return "(no torchrun_overhead_cpu.json)"
    rows = [
        [
            run["setting"],
            x["rank"],
            f"{x['plain_s'] * 1e3:.1f}",
            f"{x['ours_s'] * 1e3:.1f}",
            f"{x['ratio']:.3f}x",
            f"{x['step_ratio']:.3f}x",
        ]
        for run in d["runs"]
        for x in run["ranks"]
    ]
    headers = ["setting", "rank", "plain ms/step", "profiled ms/step", "ratio", "steps only"]
    table = tabulate(rows, headers=headers, tablefmt="github")
    return table + f"\n\n({_machine(d)}; {d['repeats']} repeats of {d['steps_per_block']} steps)"


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    print(overhead_table())
    print()
    print(instructions_table())
    print()
    print(static_table())
    print()
    print(torchrun_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
