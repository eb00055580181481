"""Time and host memory of planning a 7B/8B training step on fake tensors (``python -m profiler --fake``).

Each model of ``examples/plan_llama.py`` (Llama-2-7B, Mistral-7B, Llama-3-8B;
bf16 weights, AdamW, batch 1 x 2048) is planned in a child process, as a user
runs it; the wall time and the child's peak RSS are recorded with the
figures the plan found; then the first model again with gradient checkpointing
at batch 4, and with the GPU projection (``--project``). Budget: under 60 s and 2 GiB of RSS a model, on 2 cores.

    python benchmarks/plan_speed.py
    python benchmarks/plan_speed.py --models llama-2-7b --steps 2

Writes benchmarks/results/plan_speed.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
from tabulate import tabulate  # noqa: E402

MODELS = ("llama-2-7b", "mistral-7b", "llama-3-8b")
BUDGET_S, BUDGET_RSS = 60.0, 2 * 1024**3
PROJECTED = ("card", "allocated_peak", "reserved_peak", "device_used_peak", "fits", "largest_batch")


def plan(model: str, steps: int, extra: list[str], options: tuple[str, ...] = ()) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        cmd = [sys.executable, "-m", "profiler", "-q", "--fake", "--no-sampler", *options, "--json", str(out),
               str(ROOT / "examples" / "plan_llama.py"), "--model", model, "--steps", str(steps), *extra]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        err = Path(tmp) / "stderr"
        t0 = time.perf_counter()
        with open(err, "w") as fh:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=fh, env=env)
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"{model} failed:\n{err.read_text()[-3000:]}")
        rss = usage.ru_maxrss * 1024  # KiB on Linux
        report = json.loads(out.read_text())
    (entry,) = report["models"]
    step = entry["memory"]["steps"][-1]
    projection = entry.get("projection")
    return {
        "model": model,
        "args": [*options, *extra],
        "steps": steps,
        "seconds": round(seconds, 2),
        "peak_rss_bytes": rss,
        "parameters": entry["parameters"]["total"],
        "categories": step["categories"],
        "fit": [(c["card"], c["fits_at_measured_batch"], c["largest_batch"]) for c in entry["fit"]["cards"]],
        "projection": None if projection is None else [{k: c.get(k) for k in PROJECTED} for c in projection["cards"]],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--models", nargs="+", choices=MODELS, default=list(MODELS), help="(the first also runs checkpointed, batch 4)"
    )
    p.add_argument("--steps", type=int, default=2, help="steps each plan runs (the last is described)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    runs = [plan(m, args.steps, []) for m in args.models]
    runs.append(plan(args.models[0], args.steps, ["--checkpointing", "--batch-size", "4"]))
    runs.append(plan(args.models[0], args.steps, [], ("--project",)))  # with the GPU projection
    worst_s = max(r["seconds"] for r in runs)
    rss = [r["peak_rss_bytes"] for r in runs]
    data = {
        "benchmark": "plan_speed",
        "machine": common.machine_info(),
        "settings": {"steps": args.steps, "dtype": "bf16", "optimizer": "AdamW", "batch": "1 x 2048 unless args"},
        "runs": runs,
        "target": {"seconds": BUDGET_S, "peak_rss_bytes": BUDGET_RSS},
        "target_met": worst_s < BUDGET_S and bool(rss) and max(rss) < BUDGET_RSS,
        "load": common.loadavg(),
    }
    path = common.write_json("plan_speed", data, args.out)
    gib = 1024**3
    rows = [
        [r["model"], " ".join(r["args"]) or "-", f"{r['parameters']:,}", r["seconds"],
         f"{r['peak_rss_bytes'] / gib:.2f}",
         f"{sum(v for v in r['categories'].values() if v) / gib:.2f}"]
        for r in runs
    ]  # fmt: skip
    print(tabulate(rows, headers=["model", "args", "parameters", "seconds", "peak RSS GiB", "planned GiB"]))
    print(f"written to {path} (target met: {data['target_met']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
