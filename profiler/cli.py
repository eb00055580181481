"""``python -m profiler [OPTIONS] SCRIPT [ARGS...]``: run a script, report its models.

The script runs unchanged as ``__main__``; its stdout is left untouched and the
report goes to stderr (so ``python -m profiler train.py > log`` keeps the log
identical to a plain run), and to ``--json PATH`` if asked. The process exits
with the script's own status. Our own errors are one line, exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence


from . import __version__
from .batches import measure_batches
from .discovery import ModelWatcher
from .errors import ProfilerError
from .estimates import check_margin, parse_batches, parse_cards, resolve_card
from .runner import load_script, run_script
from .session import ScriptSession, script_models
from .tracking import StopAfterSteps

__all__ = ["main", "build_parser"]

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
    parser.add_argument("--depth", type=_non_negative_int, default=2, metavar="N", help="module tree depth in the text report (default 2)")
    parser.add_argument("--steps", type=_non_negative_int, default=3, metavar="N", help="measure the memory of the first N training steps of each model, then remove the hooks (default 3; 0: parameters only)")
    parser.add_argument("--stop-after-steps", action="store_true", help="end the script (exit 0) once the steps are measured")
    parser.add_argument("--interval", type=_positive_float, default=0.01, metavar="SECONDS", help="NVML / host memory sampling interval during measured steps (default 0.01)")
    parser.add_argument("--live-peak", action="store_true", help="also count every tensor operators create (slower): a memory peak on the CPU, where the allocator keeps none")
    parser.add_argument("--no-sampler", action="store_true", help="no background sampling thread (no NVML or host RSS timeline)")
    plan = parser.add_argument_group("planning (estimates and will-it-fit)")
    plan.add_argument("--fit", metavar="CARD", help="show the fit for one card only (e.g. T4, A100-80GB, or a --gpu name)")
    plan.add_argument("--gpu", action="append", metavar="NAME=GiB", help="add a card to the fit table (repeatable)")
    plan.add_argument("--margin", type=float, default=0.10, metavar="FRACTION", help="safety margin of card memory left unused when planning (default 0.10)")
    plan.add_argument("--fit-batches", metavar="B1,B2", help="also measure the script at these batch sizes (in child runs) and fit memory against batch size")
    plan.add_argument("--batch-arg", default="--batch-size", metavar="FLAG", help="the script's batch-size flag, for --fit-batches; write it with '=', e.g. --batch-arg=--bs (default --batch-size)")
    plan.add_argument("--plot", metavar="PATH.png", help="draw one step's memory over time (needs matplotlib: pip install matplotlib, or the [plot] extra)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print no text report (use with --json)")
    parser.add_argument("--version", action="version", version=f"profiler {__version__}")
    parser.add_argument("script", help="the Python script to run")
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
    return value


def check_writable(path: str, option: str) -> None:
    """Fail before the script runs, not after an hour of training.

    The file is opened for appending (or created and removed again) rather
    than judged by ``os.access``, which says yes to root everywhere, even on
    /proc or a read-only mount.
    """
    target = os.path.abspath(path)
    if os.path.isdir(target):
        raise ProfilerError(f"{option} {path}: is a directory")
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise ProfilerError(f"{option} {path}: directory {parent} does not exist")
    existed = os.path.exists(target)
    try:
        with open(target, "a" if existed else "x"):
            pass
    except OSError as exc:
        raise ProfilerError(f"{option} {path}: cannot write there ({exc.strerror or exc})") from None
    if not existed:
        with contextlib.suppress(OSError):
            os.remove(target)


def _validate(opts: argparse.Namespace) -> dict:
    """Check every option before the script runs, not after an hour of training."""
    for option in ("json", "plot"):
        if getattr(opts, option) == "":
            raise ProfilerError(f"--{option} needs a file path")
    if opts.steps == 0:
        asked = [flag for flag, value in (("--fit", opts.fit), ("--gpu", opts.gpu), ("--fit-batches", opts.fit_batches), ("--plot", opts.plot)) if value]
        if asked:
            raise ProfilerError(f"{', '.join(asked)} {'needs' if len(asked) == 1 else 'need'} measured steps; drop --steps 0")
    # Absolute now: the script may change directory (Hydra does) before we write.
    if opts.json:
        check_writable(opts.json, "--json")
        opts.json = os.path.abspath(opts.json)
    if opts.plot:
        if not opts.plot.lower().endswith(".png"):
            raise ProfilerError(f"--plot {opts.plot}: the picture is a PNG; give a path ending in .png")
        check_writable(opts.plot, "--plot")
        opts.plot = os.path.abspath(opts.plot)
        from .plot import MISSING_MATPLOTLIB, matplotlib_available

        if not matplotlib_available():
            raise ProfilerError(f"--plot: {MISSING_MATPLOTLIB}")
    cards = parse_cards(opts.gpu)
    if opts.fit:
        resolve_card(opts.fit, cards)
    check_margin(opts.margin)
    opts.batches = parse_batches(opts.fit_batches) if opts.fit_batches else []
    return {"cards": cards, "margin": opts.margin, "focus": opts.fit}


# Options only this tool has: after SCRIPT they reach the script, which is
# seldom what was meant. (--steps, --depth and the like are common script flags.)
_OWN_OPTIONS = ("--json", "--stop-after-steps", "--live-peak", "--no-sampler", "--fit", "--gpu", "--margin",
                "--fit-batches", "--batch-arg", "--plot", "-q", "--quiet")


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


def _print_report(text: str) -> None:
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


def _die_by_interrupt_like_python() -> None:
    """End as Python ends on a KeyboardInterrupt nobody caught: killed by SIGINT (status -2, shell 130).

    CPython does that only for an interrupt that escapes the ``-m`` module, so
    it is raised again from here; its traceback (the script's) is printed already.
    """
    sys.excepthook = lambda *exc_info: None
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None, *, reraise_interrupt: bool = False) -> int:
    """Run the command line; ``reraise_interrupt`` (for ``python -m``) ends an interrupted script as Python would."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parser.parse_args(argv)
    if opts.args and opts.args[0] == "--":
        opts.args = opts.args[1:]
    try:
        plan = _validate(opts)
        code = load_script(opts.script)
    except ProfilerError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code

    misplaced = _own_options_after_script(opts.args)
    if misplaced:
        _print_report(f"{PROG}: warning: {', '.join(misplaced)} after the script {'goes' if len(misplaced) == 1 else 'go'} "
                      "to the script, not to this tool: options go before SCRIPT")
    shadowed = _shadowed_module(opts.script)
    if shadowed:
        _print_report(f"{PROG}: warning: the script's own {shadowed} is hidden under the runner: "
                      "`import profiler` gives this tool (rename the module to run the script here)")
    session = ScriptSession(
        opts.steps, opts.stop_after_steps, None if opts.no_sampler else opts.interval, plan, live_peak=opts.live_peak
    )
    try:
        with ModelWatcher(on_new_model=session.on_new_model, on_compiled_first_call_end=session.on_compiled_first_call_end) as watcher:
            session.request_stop = watcher.stop_script_at_next_call
            session.hooks_host = watcher
            result = run_script(code, opts.script, opts.args)
    finally:
        session.close()

    notes = session.notes
    fallback = []
    if not session.found_any:
        fallback = script_models(result.globals)
        if fallback:
            notes.append("no model was called; reporting the models left in the script's globals")
    if result.failed:
        notes.append(f"the script raised {type(result.exception).__name__}; the report covers what ran before it")
    elif isinstance(result.exception, StopAfterSteps):
        notes.append("the script was ended by --stop-after-steps once its models' steps were measured (exit 0)")
    extra_points = None
    if opts.batches and not result.failed:
        extra_points, batch_notes = measure_batches(opts.script, opts.args, opts.batches, opts.batch_arg, opts.steps, opts.live_peak)
        notes.extend(batch_notes)
        for note in batch_notes:  # said even with -q: a planning point is missing
            _print_report(f"{PROG}: warning: {note}")
    report = session.report(result.globals, fallback, extra_points)
    if isinstance(result.exception, StopAfterSteps):
        waiting = [m.name for m in report.models if m.memory is not None and not m.memory.get("steps") and m.inventory.trainable]
        if waiting:
            report.notes.append(
                f"{', '.join(waiting)} had no training step before the stop: a model whose training begins later "
                "(a GAN's generator after several discriminator steps) is not waited for; run without "
                "--stop-after-steps, or with more --steps, to measure it"
            )
    unfinished = session.unfinished()  # after report(): by the names the report gives them
    if opts.stop_after_steps and not isinstance(result.exception, StopAfterSteps) and unfinished:
        report.notes.append(
            f"--stop-after-steps did not stop the script: {', '.join(unfinished)} completed fewer than "
            f"{opts.steps} step(s) in this run"
        )
    elif unfinished and not result.failed:
        report.notes.append(f"{', '.join(unfinished)} completed fewer than {opts.steps} training step(s): what ran is measured")
    report.script = {"path": opts.script, "args": opts.args, "exit_code": result.exit_code}
    # Files first: a script that closed its stderr still gets them.
    written, failure = [], None
    try:
        if opts.json:
            report.to_json(opts.json)
            written.append(f"report written to {opts.json}")
        if opts.plot:
            from .plot import plot_report

            plot_report(report.to_dict(), opts.plot)
            written.append(f"plot written to {opts.plot}")
    except ProfilerError as exc:
        failure = (f"{PROG}: error: {exc}", exc.exit_code)
    except OSError as exc:
        failure = (f"{PROG}: error: cannot write {exc.filename or 'the report'}: {exc.strerror or exc}", 2)
    except Exception as exc:  # noqa: BLE001 - our bug: one line, and the printed report still comes
        failure = (f"{PROG}: error: could not write the report files: {type(exc).__name__}: {exc}", 1)
    with contextlib.suppress(Exception):  # the script may have replaced or closed sys.stdout
        sys.stdout.flush()
    if not opts.quiet:
        try:
            _print_report("\n" + report.render(depth=opts.depth))
        except Exception as exc:  # noqa: BLE001 - our bug: one line (printed below), and the files were written
            line = f"{PROG}: error: could not render the report: {type(exc).__name__}: {exc}"
            if failure is None:
                failure = (line, 1)
            else:
                _print_report(line)
    for line in written:
        _print_report(f"{PROG}: {line}")
    if failure is not None:
        _print_report(failure[0])
        return result.exit_code or failure[1]
    if reraise_interrupt and isinstance(result.exception, KeyboardInterrupt):
        _die_by_interrupt_like_python()
    return result.exit_code
