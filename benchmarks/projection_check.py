"""The GPU projection against the real GPU step it is calibrated with, figure by figure.

``profiler/calibration/gpu_h100_seed_fp16_b8.json`` is the seed model's fp16
AMP step at batch 8 x 512, measured on an H100 with PyTorch's own allocator
counters and NVML (no code of this project involved). This script runs the
same step as that file describes it (loss inside forward, only the loss kept,
autocast around the forward, GradScaler, AdamW with its defaults,
``zero_grad(set_to_none=True)`` after the step) on fake tensors under
``profile(project=True)``, and compares each projected H100 figure with the
measured one, step by step: allocated memory at the step's start, the peaks
of forward, backward and the optimizer step, reserved memory, NVML's device
memory used, and the bytes saved for backward.

Only the memory beyond the allocator (NVML used - reserved) is taken from the
calibration itself, so the device-used figure agrees by construction up to the
reserved memory's error; every other figure is projected independently.

Then the same step's projection at other batch sizes: what the T4 fits.

On a machine with a CUDA GPU, ``--gpu-batches 4,16`` also measures the same
step on it at those batch sizes (each in a fresh process, with the reads the
calibration file describes) beside its projection for that card: held-out
points for the projection (``benchmarks/gpu_check.py`` runs this).

    python benchmarks/projection_check.py
    python benchmarks/projection_check.py --batches 4,8,16,32
    python benchmarks/projection_check.py --gpu-batches 4,16      # on a GPU machine

Writes benchmarks/results/projection_calibration.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

import profiler  # noqa: E402
from profiler.results.calibration import BUILT_IN  # noqa: E402


def calibration_file() -> dict:
    return json.loads(resources.files("profiler.calibration").joinpath(BUILT_IN).read_text(encoding="utf-8"))


def project(batch: int, seq: int, steps: int) -> tuple[dict, float]:
    """The calibration file's step at ``batch`` x ``seq``, planned on fake tensors with a projection."""
    ng = common.load_nanogpt()
    started = time.perf_counter()
    with profiler.fake_tensors():
        torch.manual_seed(0)
        model = ng.GPT(ng.GPTConfig())  # vocab 32000, block 512, n_embd 768, 12 layers, tied, biases, no dropout
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler("cpu")
        with profiler.profile(model, opt, project=True, sample_interval=None) as prof:
            for _ in range(steps):
                data = torch.randint(0, 32000, (batch, seq + 1))
                x, y = data[:, :-1], data[:, 1:]
                with torch.autocast("cpu", dtype=torch.float16):
                    loss = model(x, y)[1]
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    (entry,) = prof.report.models
    return {"projection": entry.extra["projection"], "memory": entry.memory}, seconds


def compare(measured: dict, projection: dict, memory: dict, card: str = "H100-80GB") -> list[dict]:
    """Per step: each measured figure beside the projected one (the ``card`` row's replay, workspaces included)."""
    (row,) = [c for c in projection["cards"] if c["card"] == card]
    non_allocator = projection["calibration"]["non_allocator_bytes"]
    steps = memory["gpu_replay"]["with_workspaces"][str(row["cublas_workspace"])]["steps"]
    by_index = {s["index"]: s for s in steps}
    saved = {s["index"]: s["categories"]["activations"] + s["categories"]["autocast_copies"] for s in memory["steps"]}
    rows = []
    for number, (real, index) in enumerate(zip(measured["steps"], sorted(by_index)), start=1):
        rep = by_index[index]
        phases = rep["phases"]
        pairs = {
            "allocated at step start": (real["alloc_start"], rep["allocated_start"]),
            "forward peak": (real["peak_fwd"], phases["forward"]),
            "backward peak": (real["peak_bwd"], phases["backward"]),
            "optimizer step peak": (real["peak_step"], phases["optimizer"]),
            "reserved": (real["reserved"], rep["reserved"]),
            "device used (NVML, end of step)": (real["nvml_used_end"], rep["reserved"] + non_allocator),
        }
        if "saved_tensor_bytes_unique_storage" in real:
            pairs["saved for backward"] = (real["saved_tensor_bytes_unique_storage"], saved[index])
        for figure, (truth, projected) in pairs.items():
            rows.append(
                {
                    "step": number,
                    "figure": figure,
                    "measured": truth,
                    "projected": projected,
                    "error": common.rel_err(projected, truth),
                }
            )
    return rows


def measure_on_gpu(batch: int, seq: int, steps: int = 3) -> dict:
    """The calibration file's step on this process's GPU, read as that file describes (no profiler)."""
    import pynvml

    ng = common.load_nanogpt()
    dev = torch.device("cuda", torch.cuda.current_device())
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(dev.index)  # (as CUDA orders them, without CUDA_VISIBLE_DEVICES)

    def used() -> int:
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)

    idle = used()
    torch.cuda.init()
    torch.zeros(1, device=dev)
    after_init = used()
    torch.manual_seed(0)
    model = ng.GPT(ng.GPTConfig()).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda")

    def sync_read() -> int:
        torch.cuda.synchronize(dev)
        return torch.cuda.memory_allocated(dev)

    rows = []
    for _ in range(steps):
        data = torch.randint(0, 32000, (batch, seq + 1), device=dev)
        x, y = data[:, :-1], data[:, 1:]
        row = {"alloc_start": sync_read()}
        torch.cuda.reset_peak_memory_stats(dev)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(x, y)[1]
        sync_read()
        row["peak_fwd"] = torch.cuda.max_memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        scaler.scale(loss).backward()
        sync_read()
        row["peak_bwd"] = torch.cuda.max_memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        scaler.step(opt)
        scaler.update()
        sync_read()
        row["peak_step"] = torch.cuda.max_memory_allocated(dev)
        opt.zero_grad(set_to_none=True)
        sync_read()
        row["reserved"] = torch.cuda.memory_reserved(dev)
        row["nvml_used_end"] = used()
        rows.append(row)
    props = torch.cuda.get_device_properties(dev)
    return {
        "device": torch.cuda.get_device_name(dev),
        "capability": [props.major, props.minor],
        "total_memory": props.total_memory,
        "torch": torch.__version__,
        "nvml_used_idle_before_process": idle,
        "nvml_used_after_cuda_init": after_init,
        "batch": batch,
        "seq": seq,
        "steps": rows,
    }


def gpu_points(batches: list[int], seq: int) -> list[dict]:
    """Each batch measured on this machine's GPU (a fresh process each) beside its projection for that card."""
    from profiler.results.calibration import load_calibration
    from profiler.results.gpu_projection import project_gpu

    points = []
    for batch in batches:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "gpu.json"
            cmd = [sys.executable, __file__, "--child-measure", str(batch), "--seq", str(seq), "--out", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            if proc.returncode != 0:
                points.append({"batch": batch, "error": proc.stderr[-2000:]})
                continue
            measured = json.loads(out.read_text())
        result, _ = project(batch, seq, steps=len(measured["steps"]))
        card = measured["device"]
        projection = project_gpu(result["memory"], load_calibration(), cards={card: measured["total_memory"] / 2**30})
        points.append(
            {
                "batch": batch,
                "measured": measured,
                "comparison": compare(measured, projection, result["memory"], card),
                "largest_batch_projected": projection["cards"][0].get("largest_batch"),
            }
        )
    return points


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="2,4,8,16,24,28,30,32,40", help="batch sizes for the T4 answer")
    parser.add_argument("--gpu-batches", default="", help="on a GPU machine: measure the step at these sizes too")
    parser.add_argument("--seq", type=int, default=512, help=argparse.SUPPRESS)
    parser.add_argument("--child-measure", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help="JSON path (default benchmarks/results/projection_calibration.json)")
    args = parser.parse_args()
    if args.child_measure:
        Path(args.out).write_text(json.dumps(measure_on_gpu(args.child_measure, args.seq)))
        return 0
    measured = calibration_file()
    batch, seq = measured["how"]["batch"], measured["how"]["seq"]
    result, seconds = project(batch, seq, steps=len(measured["steps"]))
    projection, memory = result["projection"], result["memory"]
    rows = compare(measured, projection, memory)
    # The first step is cold on the GPU: CUDA's lazy loading and cuBLAS handles appear during it.
    print(tabulate([[r["step"], r["figure"], f"{r['measured']:,}", f"{r['projected']:,}", f"{100 * r['error']:+.2f}%"]
                    for r in rows], headers=["step", "figure", "measured (H100)", "projected", "error"]))  # fmt: skip
    t4 = []
    for b in (int(x) for x in args.batches.split(",")):
        result, _ = project(b, seq, steps=3)
        card = next(c for c in result["projection"]["cards"] if c["card"] == "T4")
        t4.append({"batch": b, **{k: card[k] for k in ("allocated_peak", "reserved_peak", "device_used_peak", "fits")}})
    largest = max((r["batch"] for r in t4 if r["fits"]), default=None)
    gpu = []
    if args.gpu_batches:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu-batches: CUDA is not available on this machine")
        gpu = gpu_points([int(b) for b in args.gpu_batches.split(",")], seq)
        for point in gpu:
            for r in point.get("comparison", []):
                print(f"GPU batch {point['batch']} step {r['step']} {r['figure']}: {100 * r['error']:+.2f}%")
    table = [[r["batch"], f"{r['allocated_peak']:,}", f"{r['reserved_peak']:,}", f"{r['device_used_peak']:,}",
              r["fits"]] for r in t4]  # fmt: skip
    print(tabulate(table, headers=["batch", "allocated", "reserved", "device used", "fits a T4 (10% margin)"]))
    one_run = next(c for c in projection["cards"] if c["card"] == "T4")["largest_batch"]
    print(f"T4, largest batch from the batch-{batch} run alone: {one_run}; planned in {seconds:.1f} s")
    out = common.write_json(
        "projection_calibration",
        {
            "what": __doc__.split("\n\n")[0],
            "calibration": {
                "file": f"profiler/calibration/{BUILT_IN}",
                "device": measured["device"],
                "torch": measured["torch"],
                "batch": batch,
                "seq": seq,
            },  # fmt: skip
            "planning_seconds": round(seconds, 2),
            "comparison": rows,
            "steady_step_largest_abs_error": max(abs(r["error"]) for r in rows if r["step"] == len(measured["steps"])),
            "projection_at_calibration_batch": projection,
            "t4_by_batch": t4,
            "t4_largest_measured_batch_that_fits": largest,
            "t4_largest_batch_from_one_point": next(c for c in projection["cards"] if c["card"] == "T4")[
                "largest_batch"
            ],
            "gpu_points": gpu,
        },
        args.out,
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
