"""Measure a script again at other batch sizes, for fit planning (``--fit-batches``).

An unmodified script cannot be told its batch size from inside, but most take
it as a flag. Each size is measured in a fresh child process (``python -m
profiler --stop-after-steps ... SCRIPT ARGS --batch-size B``; argparse lets
the last occurrence of a flag win), so one size's memory never leaks into
another's and a size that runs out of memory only loses its own point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from .estimates import FitPoint, fit_points

__all__ = ["measure_batches"]


def measure_batches(
    script: str,
    args: list[str],
    batches: list[int],
    batch_arg: str,
    steps: int,
    live_peak: bool = False,
) -> tuple[dict[str, list[FitPoint]], list[str]]:
    """Fit points per model name from one child run per batch size, and notes on failures."""
    points: dict[str, list[FitPoint]] = {}
    notes = []
    for batch in batches:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "report.json")
            cmd = [
                sys.executable, "-m", "profiler", "-q", "--no-sampler", "--steps", str(max(steps, 2)),
                "--stop-after-steps", "--json", out, *(["--live-peak"] if live_peak else []),
                "--", script, *args, batch_arg, str(batch),
            ]
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0 or not os.path.exists(out):
                # The script's own last words, not the child profiler's.
                lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip() and not ln.startswith("python -m profiler:")]
                last = lines[-1].strip() if lines else "no output"
                notes.append(f"--fit-batches: the run at {batch_arg} {batch} failed (exit {proc.returncode}): {last}")
                continue
            with open(out, encoding="utf-8") as fh:
                report = json.load(fh)
        for model in report.get("models", []):
            found = fit_points(model.get("memory", {}))
            if not found:
                notes.append(f"--fit-batches: no complete step of {model['name']} at {batch_arg} {batch}")
            elif all(p.batch != batch for p in found):
                # The script ignored the flag (or takes the batch size under another name).
                seen = sorted({p.batch for p in found})
                notes.append(
                    f"--fit-batches: the run with {batch_arg} {batch} measured {model['name']} at batch "
                    f"{', '.join(map(str, seen))}, not {batch} (does the script take {batch_arg}? see --batch-arg)"
                )
                continue
            points.setdefault(model["name"], []).extend(found)
    return points, notes
