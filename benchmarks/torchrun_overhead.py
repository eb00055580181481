"""Per-step overhead of ``profiler.profile()`` under torchrun, beside the same step in a single process.

The example GPT (``examples/nanogpt_distributed.py``'s model) trains in three
settings: one process (no process group), 2 ranks with DDP and 2 ranks with
FSDP2 (gloo on CPU, NCCL on GPUs). In each, plain blocks of K steps and
blocks inside ``profile(model, opt)`` alternate, so drift in the machine's
load hits both alike; the overhead is the median profiled step over the
median plain step, per rank. The profiled blocks include everything the
profiler does at their end under torchrun (its report, and the gather of
every rank's figures on rank 0).

    python benchmarks/torchrun_overhead.py                 # all three settings, writes the JSON
    python benchmarks/torchrun_overhead.py --repeats 3     # quicker

Writes benchmarks/results/torchrun_overhead_<device>.json (or --out).
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
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "examples"))

import common  # noqa: E402
import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

SETTINGS = ("single", "ddp", "fsdp2")
MODEL = {"n_layer": 4, "n_head": 4, "n_embd": 256, "vocab_size": 8000, "block_size": 128}
BATCH, SEQ = 4, 128


def worker(setting: str, repeats: int, k: int, out: Path) -> None:
    """One process's timings (a rank's, under torchrun)."""
    import torch.distributed as dist
    from nanogpt import GPT, GPTConfig
    from nanogpt_distributed import make_optimizer, wrap

    from profiler import profile

    distributed = setting != "single"
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    )
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL)).to(device)
    model = wrap(model, setting, device) if distributed else model
    opt = make_optimizer(model, setting if distributed else "single", 3e-4)
    gen = torch.Generator(device=device).manual_seed(rank)

    def step() -> None:
        data = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ + 1), device=device, generator=gen)
        _, loss = model(data[:, :-1], data[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()  # warm-up: the optimizer's state, DDP's bucket rebuild

    def steps(into: list[float]) -> None:
        for _ in range(k):
            t = time.perf_counter()
            step()
            common.sync(device)
            into.append(time.perf_counter() - t)

    times: dict[str, list[float]] = {"plain": [], "ours": [], "plain_steps": [], "ours_steps": []}
    for _ in range(repeats):
        for mode in ("plain", "ours"):
            common.sync(device)
            t0 = time.perf_counter()
            if mode == "plain":
                steps(times["plain_steps"])
            else:
                with profile(model, opt, sample_interval=None):
                    steps(times["ours_steps"])
            common.sync(device)
            times[mode].append((time.perf_counter() - t0) / k)
    (out / f"rank{rank}.json").write_text(json.dumps(times))
    if distributed:
        dist.destroy_process_group()


def launch(setting: str, repeats: int, k: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            str(Path(__file__).resolve()),
            "--worker",
            setting,
            "--repeats",
            str(repeats),
            "--k",
            str(k),
            "--tmp",
            tmp,
        ]
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        if setting == "single":
            cmd = [sys.executable, *args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{setting} failed:\n{proc.stderr[-3000:]}")
        ranks = sorted(Path(tmp).glob("rank*.json"))
        per_rank = []
        for path in ranks:
            times = json.loads(path.read_text())
            plain, ours = common.median(times["plain"]), common.median(times["ours"])
            plain_step, ours_step = common.median(times["plain_steps"]), common.median(times["ours_steps"])
            per_rank.append(
                {
                    "rank": int(path.stem[4:]),
                    "plain_s": plain,
                    "ours_s": ours,
                    "ratio": common.ratio(ours, plain),  # whole blocks: setup, steps, report and gather
                    "plain_step_s": plain_step,
                    "ours_step_s": ours_step,
                    "step_ratio": common.ratio(ours_step, plain_step),  # the measured steps alone
                    "times": times,
                }
            )
    return {
        "setting": setting,
        "ranks": per_rank,
        "ratio_max": max(r["ratio"] for r in per_rank),
        "step_ratio_max": max(r["step_ratio"] for r in per_rank),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--k", type=int, default=4, help="steps per block")
    p.add_argument("--out")
    p.add_argument("--worker", choices=SETTINGS, help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.repeats, args.k, Path(args.tmp))
        return 0
    runs = [launch(s, args.repeats, args.k) for s in SETTINGS]
    single, single_steps = runs[0]["ratio_max"], runs[0]["step_ratio_max"]
    data = {
        "benchmark": "torchrun_overhead",
        "machine": common.machine_info(),
        "model": MODEL | {"batch": BATCH, "seq": SEQ, "optimizer": "AdamW"},
        "repeats": args.repeats,
        "steps_per_block": args.k,
        "runs": runs,
        "target": "per-step overhead under torchrun the same as in a single process",
        "single_process_ratio": single,
        "single_process_step_ratio": single_steps,
        "torchrun_minus_single": {r["setting"]: round(r["ratio_max"] - single, 4) for r in runs[1:]},
        "torchrun_minus_single_steps": {r["setting"]: round(r["step_ratio_max"] - single_steps, 4) for r in runs[1:]},
    }
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = common.write_json(f"torchrun_overhead_{device}", data, args.out)
    rows = [
        [
            r["setting"],
            x["rank"],
            f"{x['plain_s'] * 1e3:.1f}",
            f"{x['ours_s'] * 1e3:.1f}",
            f"{x['ratio']:.3f}",
            f"{x['plain_step_s'] * 1e3:.1f}",
            f"{x['ours_step_s'] * 1e3:.1f}",
            f"{x['step_ratio']:.3f}",
        ]
        for r in runs
        for x in r["ranks"]
    ]
    headers = ["setting", "rank", "block ms/step", "profiled", "ratio", "step ms", "measured step", "ratio"]
    print(tabulate(rows, headers=headers))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
