"""Measure a script again at other batch sizes, for fit planning (``--fit-batches``).

An unmodified script cannot be told its batch size from inside, but most take
it as a flag. Each size is measured in a fresh child process (``python -m
profiler --stop-after-steps ... SCRIPT ARGS --batch-size B``; argparse lets
the last occurrence of a flag win), so one size's memory never leaks into
another's and a size that runs out of memory only loses its own point.

The sweep runs after the script, for minutes on a large model: each child run
is announced with its batch size, and its time said when it ends. Ctrl-C or
SIGTERM during the sweep stops it; the points measured before are kept, and
the report says the fit is partial.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ProfilerError
from ..results.fit import FitPoint, fit_points
from ..results.steps import described_step
from .options import Options
from .signals import Terminated

__all__ = ["SweepResult", "check_batch_flag", "measure_batches"]


@dataclass
class SweepResult:
    """What each child run measured, per model name; notes on runs that failed; the interruption, if any."""

    flag: str = "--batch-size"
    runs: dict[str, list[tuple[int, dict]]] = field(default_factory=dict)  # (batch asked for, its memory section)
    notes: list[str] = field(default_factory=list)
    interrupted: BaseException | None = None  # KeyboardInterrupt or Terminated

    def memories(self, name: str) -> list[tuple[int, dict]]:
        """Each child run's batch size and memory section for model ``name`` (for the GPU projection)."""
        return list(self.runs.get(name, []))

    def fit_inputs(self, name: str, memory: dict) -> tuple[list[FitPoint], int | None, list[str]]:
        """The fit points the child runs give model ``name``, the batch dimension they show, and notes.

        ``memory`` is the main run's. The batch is the input dimension the
        model's steps say it is; where the child runs contradict that (the
        dimension they measured did not follow the flag), the one dimension
        that changed from the main run to each child run, to the size asked
        for, is the batch: a script that feeds (sequence, batch) tensors to a
        model that does not say so.
        """
        runs = self.runs.get(name, [])
        measured = [fit_points(mem) for _, mem in runs]
        dim = None
        if any(all(p.batch != batch for p in found) for (batch, _), found in zip(runs, measured)):
            dim = _dimension_that_followed(memory, runs)
        points, notes = [], []
        if dim is not None:
            notes.append(
                f"--fit-batches: {name}'s batch is its input's dimension {dim}, the one that followed {self.flag} "
                "from run to run"
            )
            measured = [fit_points(mem, dim) for _, mem in runs]
        for (batch, _), found in zip(runs, measured):
            if not found:
                notes.append(f"--fit-batches: no complete step of {name} at {self.flag} {batch}")
            elif all(p.batch != batch for p in found):
                # The script ignored the flag (or takes the batch size under another name).
                seen = sorted({p.batch for p in found})
                notes.append(
                    f"--fit-batches: the run with {self.flag} {batch} measured {name} at batch "
                    f"{', '.join(map(str, seen))}, not {batch} (does the script take {self.flag}? see --batch-arg)"
                )
            else:
                points.extend(found)
        return points, dim, notes


def _dimension_that_followed(memory: dict, runs: list[tuple[int, dict]]) -> int | None:
    """The one input dimension that differs from the main run's in every child run, and is the batch asked for."""
    main = described_step(memory.get("steps", []))
    common: set[int] | None = None
    for batch, mem in runs:
        child = described_step(mem.get("steps", []))
        if main is None or child is None or not main.get("input_shape") or not child.get("input_shape"):
            return None
        a, b = main["input_shape"], child["input_shape"]
        if len(a) != len(b):
            return None
        dims = {i for i, (x, y) in enumerate(zip(a, b)) if x != y and y == batch}
        common = dims if common is None else common & dims
    return next(iter(common)) if common is not None and len(common) == 1 else None


def check_batch_flag(source: str | None, flag: str, args: list[str]) -> None:
    """Refuse, before the main run, a ``--batch-arg`` that the script's own argparse options cannot take.

    Only where that is certain: the script defines its options itself with
    literal ``add_argument("--...")`` calls and no parent parsers. A script
    whose options come from elsewhere (a config module, ``HfArgumentParser``)
    cannot be judged from its source, and runs as asked.
    """
    if source is None or any(a == flag or a.startswith(flag + "=") for a in args):
        return  # (the user passes the flag to the script already: it takes it)
    options = _argparse_options(source)
    if not options:
        return
    prefixed = [o for o in options if o.startswith(flag)]  # argparse accepts a unique prefix
    if flag in options or len(prefixed) == 1:
        return
    batchy = sorted(o for o in options if "batch" in o.lower())
    hint = (
        f"its options that mention a batch: {', '.join(batchy)}"
        if batchy
        else (f"its options: {', '.join(sorted(options)[:8])}{', ...' if len(options) > 8 else ''}")
    )
    raise ProfilerError(
        f"--fit-batches: the script's argparse options have no {flag} ({hint}); "
        "give its batch-size flag with --batch-arg=FLAG"
    )


def _argparse_options(source: str) -> set[str]:
    """The option strings a script defines with literal ``add_argument`` calls; empty when that is not all of them."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return set()
    options: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        if name == "ArgumentParser" and any(k.arg == "parents" for k in node.keywords):
            return set()  # options inherited from a parser defined elsewhere
        if name == "add_argument":
            literal = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if len(literal) != len(node.args):
                return set()  # flags computed at run time (add_argument(*names)): cannot tell
            options.update(o for o in literal if o.startswith("-"))
    return options


def measure_batches(options: Options, say: Callable[[str], None]) -> SweepResult:
    """One child run per batch size of ``options.batches``; ``say`` announces each run and its time."""
    result = SweepResult(flag=options.batch_arg)
    flag, total = options.batch_arg, len(options.batches)
    for i, batch in enumerate(options.batches, 1):
        say(f"--fit-batches: run {i} of {total}, the script at {flag} {batch} (a child process) ...")
        try:
            _measure_one(options, batch, say, result)
        except (KeyboardInterrupt, Terminated) as exc:  # a running child is killed by subprocess.run
            what = "Ctrl-C" if isinstance(exc, KeyboardInterrupt) else "SIGTERM"
            done = sorted({b for runs in result.runs.values() for b, _ in runs})
            result.notes.append(
                f"--fit-batches was interrupted ({what}) during the run at {flag} {batch}: the fit points are "
                "partial, the fit uses "
                + (f"the batch sizes measured before it ({', '.join(map(str, done))}) and " if done else "")
                + "the main run's step"
            )
            result.interrupted = exc
            break
    return result


def _measure_one(options: Options, batch: int, say: Callable[[str], None], result: SweepResult) -> None:
    """Run the script at ``batch`` in a child profiler and take its fit points."""
    flag = options.batch_arg
    target = ["-m", options.target] if options.run_module else ["--", options.target]
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        cmd = [
            sys.executable,
            "-m",
            "profiler",
            "-q",
            "--no-sampler",
            "--steps",
            str(max(options.steps, 2)),
            "--stop-after-steps",
            "--json",
            out,
            *(["--live-peak"] if options.live_peak else []),
            *([] if options.reuse_repeats else ["--measure-every-forward"]),
            *(["--fake"] if options.fake else []),
            *(["--project"] if options.project else []),
            *target,
            *options.args,
            flag,
            str(batch),
        ]
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        say(
            f"--fit-batches: {flag} {batch} {'done' if proc.returncode == 0 else 'failed'} "
            f"in {time.monotonic() - started:.1f} s"
        )
        if proc.returncode != 0 or not os.path.exists(out):
            # The script's own last words, not the child profiler's.
            lines = [
                ln for ln in proc.stderr.strip().splitlines() if ln.strip() and not ln.startswith("python -m profiler:")
            ]
            last = lines[-1].strip() if lines else "no output"
            result.notes.append(f"--fit-batches: the run at {flag} {batch} failed (exit {proc.returncode}): {last}")
            return
        with open(out, encoding="utf-8") as fh:
            report = json.load(fh)
    _take_points(report, batch, result)


def _take_points(report: dict, batch: int, result: SweepResult) -> None:
    """Keep what the child run at ``batch`` measured of each model (judged in ``SweepResult.fit_inputs``)."""
    for model in report.get("models", []):
        result.runs.setdefault(model["name"], []).append((batch, model.get("memory", {})))
