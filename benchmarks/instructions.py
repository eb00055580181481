"""Instructions a training step executes under each tool, counted by valgrind: the overhead without the noise.

Step times on a shared machine swing by 10-30% from minute to minute (see
README.md), more than the overhead being measured on small models. The number
of instructions a step executes barely moves: run under valgrind's cachegrind,
the same command counts the same instructions to within a few hundred in
billions, whatever else the machine is doing. An edit anywhere in the code
moves the process's memory layout and with it a step's count, by up to about
1% of a tiny step (pointer-keyed tables hash differently): a difference
between two versions of the code is real where it is larger than that. This
benchmark counts them for one step in each mode:

    plain        the step, nothing else
    hooks_floor  profile()'s hooks, each doing nothing (hook_floor.py)
    bare_reads   the reads a step's figures are made of, without profile()'s bookkeeping (bare_reads.py)
    ours         inside profiler.profile(model, optimizer) (no sampler thread: its samples come every
                 10 ms whatever the step does, and are counted in the timed benchmark)

and, with ``--counterfactuals``, profile() with one kind of its per-step reads
left out, and with all three (``counterfactuals.py``; the figures of those runs
are wrong where that kind changes, and are not looked at): how much of its
work each kind of read costs, with what it does with it. Each is what taking
that kind as unchanged between steps, instead of reading it, could save at
most.

Each mode runs in two child processes under cachegrind, with ``--short`` and
``--long`` measured steps after three warm-up steps and the block's first step;
a step's instructions are the difference over the difference in steps, so
start-up (importing torch, building the model, entering the block) cancels out.
Leaving the block (the report) is not counted: each child ends with
``os._exit`` inside it, like ``steps_only`` in overhead.py. The garbage
collector is off during the counted steps: a collection falls in one run's
steps and not in the other's (a full one is millions of instructions), which
would move a mode's count by more than a tool's work; overhead.py times the
collections each block's steps paid for (``gc ms/step``).

Instructions are not time. In a training step our Python runs between torch's
kernels, with the caches cold, at fewer instructions per second than torch's
own code: the same share of instructions costs more of the step's time (the
JSON sets both side by side where overhead.py's result file for the model
exists). The time target lives in overhead.py's JSON; this one says how much
work each mode adds, to the instruction.

    python benchmarks/instructions.py --model tiny
    python benchmarks/instructions.py --model lbfgs --short 2 --long 8

Needs valgrind on PATH. Writes benchmarks/results/instructions_<model>.json (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import counterfactuals  # noqa: E402
import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

MODES = ("plain", "hooks_floor", "bare_reads", "ours")
WARMUP = 3
COUNTERFACTUALS = counterfactuals.MODES  # profile() with one kind of its per-step reads left out


def build_step(model: str) -> tuple[Any, dict[str, Any]]:
    """The benchmark's step on the CPU, one intra-op thread (as overhead.py on this machine)."""
    torch.set_num_threads(1)
    if model == "lbfgs":
        return common.closure_step(torch.device("cpu"))
    return common.nanogpt_step(model, torch.device("cpu"))


def enter_mode(mode: str, step: Any) -> contextlib.ExitStack:
    """Enter ``mode`` around ``step``'s model and optimizer; the stack holds what the mode needs alive.

    Held by the caller for as long as the mode must last: a counterfactual's
    context manager put its reads back as soon as nothing held it (a
    ``left_out(...).__enter__()`` whose object was dropped ran its ``finally``
    at once, and the child counted ``profile()`` with every read).
    """
    stack = contextlib.ExitStack()
    if mode == "hooks_floor":
        from hook_floor import HookFloor  # noqa: PLC0415

        stack.enter_context(HookFloor(step.model, step.optimizer))
    elif mode == "bare_reads":
        from bare_reads import BareReads  # noqa: PLC0415

        stack.enter_context(BareReads(step.model, step.optimizer))
    elif mode == "ours" or mode in COUNTERFACTUALS:
        import profiler  # noqa: PLC0415

        if mode in COUNTERFACTUALS:
            stack.enter_context(counterfactuals.left_out(mode, step.model))
        stack.enter_context(profiler.profile(step.model, step.optimizer, sample_interval=None))
    elif mode != "plain":
        raise SystemExit(f"unknown mode {mode!r}")
    return stack


def child(model: str, mode: str, steps: int) -> None:
    """Run in a child under valgrind: warm up, enter ``mode``, take its first step and ``steps`` more, then leave.

    Ends with ``os._exit`` inside the block: what the tool does on leaving (the
    report) is not a step's.
    """
    step, _ = build_step(model)
    for _ in range(WARMUP):
        step()
    _held = enter_mode(mode, step)  # (held to the end, never left: the child ends inside)
    step()  # the block's first step (measured in full by profile()), in both runs
    gc.collect()
    gc.disable()  # (a collection falls in one run's steps and not the other's: counted in overhead.py's gc ms/step)
    for _ in range(steps):
        step()
    sys.stdout.flush()
    os._exit(0)


def cachegrind_total(out_file: Path) -> int:
    """The total instruction count (``summary:``) of a cachegrind output file."""
    for line in out_file.read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise ValueError(f"no summary line in {out_file}")


def count(model: str, mode: str, steps: int, workdir: Path) -> int:
    """Instructions of one child process (start-up included) running ``steps`` measured steps of ``mode``."""
    out_file = workdir / f"cg_{mode}_{steps}"
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [
        "valgrind",
        "--tool=cachegrind",
        "--cache-sim=no",
        f"--cachegrind-out-file={out_file}",
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        mode,
        "--model",
        model,
        "--steps",
        str(steps),
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if run.returncode != 0 or not out_file.exists():
        tail = (run.stderr or run.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"{mode} ({steps} steps) failed under valgrind: " + " | ".join(tail))
    return cachegrind_total(out_file)


def timed_ratios(model: str) -> list[dict[str, Any]]:
    """overhead.py's time ratios for this model, from its result files here: time beside instructions.

    The steps counted here are a block's later ones (its first is left out): set
    beside them, each file's later steps (its first step left out too) and its
    steps only (all of a block's steps; nearly all later ones in a long run).
    """
    out = []
    for name in (f"overhead_{model}_cpu.json", f"overhead_{model}_cpu_long.json"):
        path = common.RESULTS / name
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        ratios = data.get("ratios_to_plain", {})
        out.append(
            {
                "file": name,
                "file_timestamp_utc": data.get("timestamp_utc"),
                "steps_per_block": data.get("settings", {}).get("steps_per_repeat"),
                "ours_later_steps_ratio": ratios.get("ours", {}).get("later_steps_ratio"),
                "ours_steps_only_ratio": ratios.get("ours", {}).get("steps_only_ratio_of_medians"),
                "hooks_floor_steps_only_ratio": ratios.get("hooks_floor", {}).get("steps_only_ratio_of_medians"),
            }
        )
    return out


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    if args.long <= args.short:
        raise SystemExit("--long must be more steps than --short")
    step, desc = build_step(args.model)
    t0 = time.perf_counter()
    jobs = [(mode, n) for mode in args.modes for n in (args.short, args.long)]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=args.jobs) as pool:
        totals = dict(zip(jobs, pool.map(lambda job: count(args.model, job[0], job[1], Path(tmp)), jobs)))
    steps = args.long - args.short
    per_step = {mode: (totals[(mode, args.long)] - totals[(mode, args.short)]) / steps for mode in args.modes}
    plain = per_step.get("plain")
    modes: dict[str, Any] = {}
    for mode in args.modes:
        row: dict[str, Any] = {
            "instructions_per_step": round(per_step[mode]),
            "runs": {str(n): totals[(mode, n)] for n in (args.short, args.long)},
        }
        if plain and mode != "plain":
            row["over_plain_per_step"] = round(per_step[mode] - plain)
            row["ratio"] = round(per_step[mode] / plain, 5)
        modes[mode] = row
    if plain and "ours" in per_step:
        extra = per_step["ours"] - plain
        if args.model == "lbfgs":  # (each LBFGS step evaluates its closure max_iter times: tolerances are 0)
            evaluations = step.optimizer.defaults["max_iter"]
            modes["ours"]["over_plain_per_closure_evaluation"] = round(extra / evaluations)
        for ref in ("hooks_floor", "bare_reads", *COUNTERFACTUALS):
            if ref in per_step and extra:
                modes[ref]["share_of_ours_over_plain"] = round((per_step[ref] - plain) / extra, 4)
        for ref, what in COUNTERFACTUALS.items():
            if ref in per_step:
                modes[ref]["left_out"] = what
                modes[ref]["saved_per_step"] = round(per_step["ours"] - per_step[ref])
    return {
        "benchmark": "instructions",
        "machine": common.machine_info(),
        "settings": {
            "model": desc,
            "device": "cpu",
            "torch_num_threads": 1,
            "warmup_steps": WARMUP,
            "short_steps": args.short,
            "long_steps": args.long,
            "counter": "valgrind --tool=cachegrind --cache-sim=no (instructions executed, all threads)",
            "valgrind": subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip(),
        },
        "modes": modes,
        "time_from_overhead_benchmark": timed_ratios(args.model),
        "wall_s": round(time.perf_counter() - t0, 1),
        "timestamp_utc": common.utc_now(),
    }


def print_table(result: dict[str, Any]) -> None:
    rows = []
    for mode, row in result["modes"].items():
        rows.append(
            [
                mode,
                f"{row['instructions_per_step'] / 1e6:.3f} M",
                f"{row['over_plain_per_step'] / 1e3:+,.0f} k" if "over_plain_per_step" in row else "",
                f"{row['ratio']:.4f}x" if "ratio" in row else "",
            ]
        )
    print(tabulate(rows, headers=["mode", "instructions / step", "over plain", "ratio"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", choices=["tiny", "small", "lbfgs"])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=[*MODES, *COUNTERFACTUALS])
    ap.add_argument(
        "--counterfactuals",
        action="store_true",
        help="also count profile() with each kind of per-step read left out, and with all three (four more modes)",
    )
    ap.add_argument("--short", type=int, default=4, help="measured steps in the shorter run (default 4)")
    ap.add_argument("--long", type=int, default=24, help="measured steps in the longer run (default 24)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="child processes at once")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        child(args.model, args.child, args.steps)
        return 0
    if args.counterfactuals:
        args.modes = [*args.modes, *(m for m in COUNTERFACTUALS if m not in args.modes)]
    if "plain" not in args.modes:
        args.modes = ["plain", *args.modes]
    if any(m in COUNTERFACTUALS for m in args.modes) and "ours" not in args.modes:
        args.modes = [*args.modes, "ours"]  # (what each leaves out is said against it)
    if shutil.which("valgrind") is None:
        print("instructions.py: valgrind is not on PATH (apt install valgrind); nothing was counted", file=sys.stderr)
        return 2
    try:
        result = benchmark(args)
    except RuntimeError as exc:
        print(f"instructions.py: {exc}", file=sys.stderr)
        return 1
    print_table(result)
    subset = "" if set(args.modes) in (set(MODES), set(MODES) | set(COUNTERFACTUALS)) else "_" + "_".join(args.modes)
    path = common.write_json(f"instructions_{args.model}{subset}", result, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
