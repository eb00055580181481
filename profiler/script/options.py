"""The command line's options, checked before the script runs, as one object.

Checking up front matters: a bad card name or an unwritable ``--json`` path
found after an hour of training loses the hour. ``validate`` turns argparse's
namespace into ``Options`` or raises a one-line ``ProfilerError``; the session
and the batch sweep take the ``Options`` and nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from dataclasses import dataclass, field

from ..errors import ProfilerError
from ..results.calibration import Calibration, load_calibration
from ..results.fit import CARDS, check_margin, resolve_card
from ..results.gather import DEFAULT_TIMEOUT, rank_path
from ..tracking.parallel import launched_rank

__all__ = ["Options", "check_writable", "parse_batches", "parse_cards", "validate"]


@dataclass
class Options:
    """What to run, what to measure, and what to write."""

    target: str  # the script's path, or the module's name with run_module
    args: list[str] = field(default_factory=list)  # the script's own arguments
    run_module: bool = False  # `-m`: run a module as `python -m` does
    json: str | None = None  # absolute: the script may change directory before we write
    plot: str | None = None
    depth: int = 2
    quiet: bool = False
    steps: int = 3
    stop_after_steps: bool = False
    interval: float | None = 0.01  # None: no sampler thread
    live_peak: bool = False
    reuse_repeats: bool = True  # --measure-every-forward turns it off
    cards: dict[str, float] = field(default_factory=lambda: dict(CARDS))
    margin: float = 0.10
    focus: str | None = None  # --fit CARD
    batches: list[int] = field(default_factory=list)  # --fit-batches
    batch_arg: str = "--batch-size"
    fake: bool = False  # --fake: the script runs on fake tensors (a plan, no memory)
    gather_timeout: float = DEFAULT_TIMEOUT  # under torchrun: how long rank 0 waits for the others' figures
    project: bool = False  # --project, or --fit CARD: project the steps onto GPUs
    calibration: Calibration | None = None  # what the projection adds beyond the allocator (--calibrate)

    @property
    def plan(self) -> dict:
        """The fit planner's keyword arguments."""
        return {"cards": self.cards, "margin": self.margin, "focus": self.focus}


def validate(ns: argparse.Namespace) -> Options:
    """Check every option and build ``Options``; a one-line ``ProfilerError`` for the first bad one."""
    for option in ("json", "plot"):
        if getattr(ns, option) == "":
            raise ProfilerError(f"--{option} needs a file path")
    if ns.steps == 0:
        asked = [
            flag
            for flag, value in (
                ("--fit", ns.fit),
                ("--gpu", ns.gpu),
                ("--fit-batches", ns.fit_batches),
                ("--plot", ns.plot),
                ("--stop-after-steps", ns.stop_after_steps),
            )
            if value
        ]
        if asked:
            raise ProfilerError(
                f"{', '.join(asked)} {'needs' if len(asked) == 1 else 'need'} measured steps; drop --steps 0"
            )
    if ns.fake and ns.live_peak:
        raise ProfilerError("--live-peak counts the tensors operators create: with --fake there is no memory to count")
    rank = launched_rank()
    if rank is not None and ns.fit_batches:
        raise ProfilerError(
            "--fit-batches runs the script again in child processes, which under torchrun would join this job's "
            "rendezvous: launch torchrun once per batch size instead"
        )
    json_path = None
    if ns.json:
        # Under torchrun each rank writes its own file beside the path, and rank 0 the merged one too.
        # Every rank checks both (only rank 0 creating the merged one, so two ranks never race for it):
        # a path only rank 0 refused would leave the others waiting for it at the job's rendezvous.
        if rank is not None:
            _writable_path(rank_path(ns.json, rank), "--json")
        json_path = _writable_path(ns.json, "--json", create=rank in (None, 0))
    plot_path = None
    if ns.plot:
        if not ns.plot.lower().endswith(".png"):
            raise ProfilerError(f"--plot {ns.plot}: the picture is a PNG; give a path ending in .png")
        plot_path = _writable_path(ns.plot, "--plot", create=rank in (None, 0))
        from ..results.plot import MISSING_MATPLOTLIB, matplotlib_available

        if not matplotlib_available():
            raise ProfilerError(f"--plot: {MISSING_MATPLOTLIB}")
    cards = parse_cards(ns.gpu)
    if ns.fit is not None:
        resolve_card(ns.fit, cards)
    project = bool(ns.project or ns.fit is not None or ns.calibrate is not None)
    if project and ns.steps == 0:
        raise ProfilerError("--project needs measured steps; drop --steps 0")
    calibration = load_calibration(ns.calibrate) if project else None
    check_margin(ns.margin)
    args = list(ns.args)
    if args and args[0] == "--":
        args = args[1:]
    return Options(
        target=ns.script,
        args=args,
        run_module=ns.module,
        json=json_path,
        plot=plot_path,
        depth=ns.depth,
        quiet=ns.quiet,
        steps=ns.steps,
        stop_after_steps=ns.stop_after_steps,
        interval=None if ns.no_sampler else ns.interval,
        live_peak=ns.live_peak,
        reuse_repeats=not ns.measure_every_forward,
        cards=cards,
        margin=ns.margin,
        focus=ns.fit,
        batches=parse_batches(ns.fit_batches) if ns.fit_batches else [],
        batch_arg=ns.batch_arg,
        gather_timeout=ns.gather_timeout,
        fake=ns.fake,
        project=project,
        calibration=calibration,
    )


def _writable_path(path: str, option: str, create: bool = True) -> str:
    """The absolute path, once it is known to be writable (the script may change directory: Hydra does)."""
    check_writable(path, option, create)
    return os.path.abspath(path)


def check_writable(path: str, option: str, create: bool = True) -> None:
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
    if not create:  # (another process checks it by writing)
        return
    existed = os.path.exists(target)
    try:
        with open(target, "a" if existed else "x"):
            pass
    except OSError as exc:
        raise ProfilerError(f"{option} {path}: cannot write there ({exc.strerror or exc})") from None
    if not existed:
        with contextlib.suppress(OSError):
            os.remove(target)


def parse_cards(specs: list[str] | None) -> dict[str, float]:
    """The card table plus ``NAME=GiB`` entries from the command line."""
    cards = dict(CARDS)
    for spec in specs or []:
        name, sep, size = spec.partition("=")
        if not sep or not name.strip():
            raise ProfilerError(f"--gpu expects NAME=GiB (e.g. RTX4090=24), got {spec!r}")
        try:
            gib = float(size)
        except ValueError:
            raise ProfilerError(f"--gpu {spec}: {size!r} is not a number of GiB") from None
        if not gib > 0 or math.isinf(gib):
            raise ProfilerError(f"--gpu {spec}: memory must be a positive number of GiB")
        cards[name.strip()] = gib
    return cards


def parse_batches(text: str) -> list[int]:
    """``"4,8"`` -> ``[4, 8]``; anything but positive whole numbers is a one-line error."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) <= 0:
            raise ProfilerError(f"--fit-batches expects positive whole numbers separated by commas, got {text!r}")
        out.append(int(part))
    if len(set(out)) != len(out):
        raise ProfilerError(f"--fit-batches has a repeated batch size: {text!r}")
    return sorted(out)
