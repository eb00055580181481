"""``python -m profiler [OPTIONS] SCRIPT [ARGS...]`` (or ``-m MODULE``): run it, report its models.

Parse, validate, run, write, print. The script runs unchanged as
``__main__``; its stdout is left untouched and the report goes to stderr (so
``python -m profiler train.py > log`` keeps the log identical to a plain run),
and to ``--json PATH`` if asked. The process exits with the script's own
status. Our own errors are one line, exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Sequence

from . import __version__
from .errors import ProfilerError
from .results.gather import DEFAULT_TIMEOUT, gather_ranks, job_of, rank_path
from .results.report import Report
from .script.batch_sweep import SweepResult, check_batch_flag, measure_batches
from .script.options import Options, validate
from .script.runner import Program, load_module, load_script
from .script.session import ScriptSession
from .script.signals import TerminationGuard
from .tracking.parallel import launched_rank

__all__ = ["build_parser", "main"]

PROG = "python -m profiler"


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other error of ours."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if "required" in message and "script" in message:
            message = "no script given"
        self.exit(2, f"{PROG}: error: {message} (see {PROG} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Run a PyTorch script unchanged and report where its models' parameters and memory go.",
        epilog="Options go before SCRIPT; everything after SCRIPT (or after --) is passed to the script.",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    parser.add_argument(
        "--depth",
        type=_non_negative_int,
        default=2,
        metavar="N",
        help="module tree depth in the text report (default 2)",
    )
    parser.add_argument(
        "--steps",
        type=_non_negative_int,
        default=3,
        metavar="N",
        help="measure the memory of the first N training steps of each model, then remove the hooks "
        "(default 3; 0: parameters only)",
    )
    parser.add_argument(
        "--stop-after-steps", action="store_true", help="end the script (exit 0) once the steps are measured"
    )
    parser.add_argument(
        "--interval",
        type=_positive_float,
        default=0.01,
        metavar="SECONDS",
        help="NVML / host memory sampling interval during measured steps (default 0.01)",
    )
    parser.add_argument(
        "--live-peak",
        action="store_true",
        help="also count every tensor operators create (slower): a memory peak on the CPU, where the "
        "allocator keeps none",
    )
    parser.add_argument(
        "--no-sampler", action="store_true", help="no background sampling thread (no NVML or host RSS timeline)"
    )
    parser.add_argument(
        "--measure-every-forward",
        action="store_true",
        help="measure every forward tensor by tensor, also those called as one measured before (by default "
        "those are taken as its repeats, checked by their autograd graph's size: what keeps measuring cheap)",
    )
    parser.add_argument(
        "--fake",
        action="store_true",
        help="plan without memory: run the script on fake tensors (FakeTensorMode), for models larger than "
        "this machine; values the script reads (loss.item()) are answered with 0",
    )
    plan = parser.add_argument_group("planning (estimates and will-it-fit)")
    plan.add_argument(
        "--fit",
        metavar="CARD",
        help="project the step onto one card only (e.g. T4, A100-80GB, or a --gpu name); implies --project",
    )
    plan.add_argument(
        "--project",
        action="store_true",
        help="project the measured step onto GPUs: CUDA's autocast policy while measuring, every allocation "
        "replayed through a model of CUDA's caching allocator (slower, like --live-peak; fast with --fake)",
    )
    plan.add_argument(
        "--calibrate",
        metavar="REPORT.json",
        help="a JSON report of this tool from a real GPU run: its memory beyond the allocator (CUDA context, "
        "libraries) replaces the shipped H100 measurement in the projection; implies --project",
    )
    plan.add_argument("--gpu", action="append", metavar="NAME=GiB", help="add a card to the fit table (repeatable)")
    plan.add_argument(
        "--margin",
        type=float,
        default=0.10,
        metavar="FRACTION",
        help="safety margin of card memory left unused when planning (default 0.10)",
    )
    plan.add_argument(
        "--fit-batches",
        metavar="B1,B2",
        help="also measure the script at these batch sizes (in child runs) and fit memory against batch size",
    )
    plan.add_argument(
        "--batch-arg",
        default="--batch-size",
        metavar="FLAG",
        help="the script's batch-size flag, for --fit-batches; write it with '=', e.g. --batch-arg=--bs "
        "(default --batch-size)",
    )
    plan.add_argument(
        "--plot",
        metavar="PATH.png",
        help="draw one step's memory over time (needs matplotlib: pip install matplotlib, or the [plot] extra)",
    )
    parser.add_argument(
        "--gather-timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="under torchrun: how long rank 0 waits for the other ranks' figures at the end "
        f"(default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print no text report (use with --json)")
    parser.add_argument("--version", action="version", version=f"profiler {__version__}")
    parser.add_argument(
        "-m",
        dest="module",
        action="store_true",
        help="run a library module as a script, as python -m does (SCRIPT is then the module's name)",
    )
    parser.add_argument("script", help="the Python script to run (or, with -m, the module)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    return parser


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected more than 0, got {text}")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds, got {text}")
    return value


# Options only this tool has: after SCRIPT they reach the script, which is
# seldom what was meant. (--steps, --depth and the like are common script flags.)
_OWN_OPTIONS = (
    "--json",
    "--stop-after-steps",
    "--live-peak",
    "--no-sampler",
    "--measure-every-forward",
    "--fit",
    "--gpu",
    "--margin",
    "--fit-batches",
    "--batch-arg",
    "--plot",
    "-q",
    "--quiet",
)


def _own_options_after_script(args: list[str]) -> list[str]:
    """This tool's options among the script's arguments."""
    return [a for a in args if a.split("=", 1)[0] in _OWN_OPTIONS]


def _shadowed_module(script: str) -> str | None:
    """The script's own ``profiler`` module or package, which ``import profiler`` cannot reach now."""
    folder = os.path.dirname(os.path.realpath(script))
    ours = os.path.dirname(os.path.realpath(__file__))
    for candidate in (os.path.join(folder, "profiler.py"), os.path.join(folder, "profiler")):
        if os.path.exists(candidate) and os.path.realpath(candidate) != ours:
            return candidate
    return None


def say(text: str) -> None:
    """To the script's stderr if it still works, else to the process's own."""
    for stream in (sys.stderr, sys.__stderr__):
        if stream is None:  # print(file=None) would write to stdout
            continue
        try:
            print(text, file=stream, flush=True)
            return
        except Exception:  # noqa: BLE001 - closed, or replaced by something that cannot write
            continue
    with contextlib.suppress(OSError):  # both closed: file descriptor 2 may still be open
        os.write(2, (text + "\n").encode("utf-8", "replace"))


def _prepare(argv: list[str]) -> tuple[Options, Program]:
    """Parse and check everything before the script runs; a ``ProfilerError`` for the first problem."""
    options = validate(build_parser().parse_args(argv))
    program = load_module(options.target) if options.run_module else load_script(options.target)
    if options.batches:
        check_batch_flag(_source(program), options.batch_arg, options.args)
    misplaced = _own_options_after_script(options.args)
    if misplaced:
        say(
            f"{PROG}: warning: {', '.join(misplaced)} after the script {'goes' if len(misplaced) == 1 else 'go'} "
            "to the script, not to this tool: options go before SCRIPT"
        )
    shadowed = None if options.run_module else _shadowed_module(options.target)
    if shadowed:
        say(
            f"{PROG}: warning: the script's own {shadowed} is hidden under the runner: "
            "`import profiler` gives this tool (rename the module to run the script here)"
        )
    return options, program


def _source(program: Program) -> str | None:
    if program.source_path is None:
        return None
    try:
        with open(program.source_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def _write_files(report: Report, options: Options) -> tuple[list[str], tuple[str, int] | None]:
    """Write ``--json`` and ``--plot``; what was written, and the failure (message, exit status) if any."""
    written, failure = [], None
    try:
        if options.json:
            report.to_json(options.json)
            written.append(f"report written to {options.json}")
        if options.plot:
            report.plot(options.plot)
            written.append(f"plot written to {options.plot}")
    except ProfilerError as exc:
        failure = (f"{PROG}: error: {exc}", exc.exit_code)
    except OSError as exc:
        failure = (f"{PROG}: error: cannot write {exc.filename or 'the report'}: {exc.strerror or exc}", 2)
    except Exception as exc:  # noqa: BLE001 - our bug: one line, and the printed report still comes
        failure = (f"{PROG}: error: could not write the report files: {type(exc).__name__}: {exc}", 1)
    return written, failure


def _gather_ranks(
    report: Report, options: Options, terminated: bool
) -> tuple[int | None, list[str], tuple[str, int] | None]:
    """Under torchrun: this rank's own file first, then its figures to rank 0 (see ``results.gather``).

    Returns (this rank, or None for a single process; files written; a failure). A
    terminated job (torchrun stops the others when a rank dies) waits for nobody.
    """
    setup = job_of(report)
    if setup is None:
        return None, [], None
    written, failure = [], None
    file = rank_path(options.json, setup.rank) if options.json else None
    if file is not None:
        try:
            report.to_json(file)
            written.append(f"rank {setup.rank}: report written to {file}")
        except OSError as exc:
            failure = (f"{PROG}: error: cannot write {file}: {exc.strerror or exc}", 2)
            file = None
    try:
        gather_ranks(report, setup, file, 0.0 if terminated else options.gather_timeout)
    except Exception as exc:  # noqa: BLE001 - our bug: this rank's own report stands
        report.notes.append(f"the ranks' figures could not be gathered: {type(exc).__name__}: {exc}")
    return setup.rank, written, failure


def _print_report(report: Report, options: Options, failure: tuple[str, int] | None) -> tuple[str, int] | None:
    """The text report to stderr (unless -q); a rendering failure becomes the failure if there is none yet."""
    with contextlib.suppress(Exception):  # the script may have replaced or closed sys.stdout
        sys.stdout.flush()
    if options.quiet:
        return failure
    try:
        say("\n" + report.render(depth=options.depth))
    except Exception as exc:  # noqa: BLE001 - our bug: one line (printed below), and the files were written
        line = f"{PROG}: error: could not render the report: {type(exc).__name__}: {exc}"
        if failure is None:
            return (line, 1)
        say(line)
    return failure


def _die_by_interrupt_like_python() -> None:
    """End as Python ends on a KeyboardInterrupt nobody caught: killed by SIGINT (status -2, shell 130).

    CPython does that only for an interrupt that escapes the ``-m`` module, so
    it is raised again from here; its traceback (the script's) is printed already.
    """
    sys.excepthook = lambda *exc_info: None
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None, *, end_like_python: bool = False) -> int:
    """Run the command line and return the exit status.

    ``end_like_python`` (for ``python -m profiler``) ends an interrupted or
    terminated run as Python would: by the signal, once the report is out.
    """
    try:
        options, program = _prepare(list(sys.argv[1:] if argv is None else argv))
    except ProfilerError as exc:
        rank = launched_rank()  # under torchrun every rank says it: which one is speaking
        print(f"{PROG}: {'' if rank is None else f'rank {rank}: '}error: {exc}", file=sys.stderr)
        return exc.exit_code

    with TerminationGuard() as guard:
        session = ScriptSession(options)
        result = session.run(program)
        sweep = None
        if options.batches and not result.failed:
            sweep = measure_batches(
                options, (lambda text: None) if options.quiet else (lambda text: say(f"{PROG}: {text}"))
            )
        guard.defer()  # from here a SIGTERM waits until the report is out
        report = session.report(result, sweep)
        if options.quiet:  # said even with -q: a planning point is missing
            for note in (n for n in report.notes if n.startswith("--fit-batches")):
                say(f"{PROG}: warning: {note}")
        rank, written, failure = _gather_ranks(report, options, terminated=guard.received is not None)
        if rank in (None, 0):
            # Files first: a script that closed its stderr still gets them.
            more, failure = _write_files(report, options)
            written += more
            failure = _print_report(report, options, failure)
        for line in written:
            say(f"{PROG}: {line}")
    if failure is not None:
        say(failure[0])
        return result.exit_code or failure[1]
    interrupted = isinstance(result.exception, KeyboardInterrupt) or _interrupted(sweep)
    if end_like_python:
        guard.die_if_terminated()
        if interrupted:
            _die_by_interrupt_like_python()
    if guard.received is not None:
        return 128 + guard.received
    return 130 if _interrupted(sweep) else result.exit_code


def _interrupted(sweep: SweepResult | None) -> bool:
    return sweep is not None and isinstance(sweep.interrupted, KeyboardInterrupt)
