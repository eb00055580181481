"""Accuracy of ``profiler.profile()``'s memory categories against independent truth.

For each nanoGPT config (tiny, small), a few training steps run inside one
``profile()`` block. In every step, next to the profiler, this script measures
on its own:

* gradients: after the step, the bytes of the unique storages of ``p.grad``;
* optimizer state: a walk of ``optimizer.state`` (every tensor value, unique
  storages);
* activations: a walk of the autograd graph between forward and backward, from
  the loss's ``grad_fn`` through ``next_functions``, reading every ``_saved_*``
  attribute that is a tensor or a tuple/list of tensors, deduplicated by
  ``untyped_storage().data_ptr()``, parameter storages left out. On CUDA with
  fp16 autocast, saved tensors whose values equal a parameter cast to their
  dtype are split out as the truth for ``autocast_copies``.

On CUDA it also compares with the caching allocator (activations ~
``memory_allocated`` after forward minus before; the step's peak against
``max_memory_allocated`` of an identical unprofiled step) and NVML's
per-process figure with ``nvidia-smi --query-compute-apps``.

    python benchmarks/accuracy.py
    python benchmarks/accuracy.py --device cuda --models tiny small seed

Writes benchmarks/results/accuracy_<device>.json (or --out).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

import profiler  # noqa: E402

CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "autocast_copies")


# --------------------------------------------------------------------------- fit planner


def fit_accuracy() -> dict[str, Any]:
    """The fit planner's predictions at larger batches against real measurements (CPU).

    Fit on batches 2 and 4 of the small preset, predict 8 and 16, measure them:
    once with the default quantity (the sum of the measured categories) and once
    with the opt-in live-tensor peak, which includes temporaries.
    """
    cpu = torch.device("cpu")
    out = common.fit_check("small", cpu, amp=None, fit_batches=[2, 4], check_batches=[8, 16])
    out["live_peak"] = common.fit_check(
        "small", cpu, amp=None, fit_batches=[2, 4], check_batches=[8, 16], live_peak=True
    )
    return out


# --------------------------------------------------------------------------- independent truth


def _storage(t: torch.Tensor) -> tuple[int, int] | None:
    try:
        s = t.untyped_storage()
        return (s.data_ptr(), s.nbytes()) if s.data_ptr() else None
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):
        return None


def unique_storage_bytes(tensors: list[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        key = _storage(t)
        if key is not None:
            seen[key[0]] = key[1]
    return sum(seen.values())


def truth_gradients(model: torch.nn.Module) -> int:
    return unique_storage_bytes([p.grad for p in model.parameters() if p.grad is not None])


def truth_optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    seen: dict[int, int] = {}
    by_device: dict[str, int] = {}
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                key = _storage(value)
                if key is not None and key[0] not in seen:
                    seen[key[0]] = key[1]
                    by_device[str(value.device)] = by_device.get(str(value.device), 0) + key[1]
    return {"bytes": sum(seen.values()), "by_device": by_device}


def _saved_tensors_of(node: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for name in dir(node):
        if not name.startswith("_saved_"):
            continue
        try:
            value = getattr(node, name)
        except Exception:  # noqa: BLE001 - freed or not a readable attribute
            continue
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, (tuple, list)):
            out.extend(v for v in value if isinstance(v, torch.Tensor))
    return out


def _is_param_cast(t: torch.Tensor, params: list[torch.Tensor]) -> bool:
    """True when ``t`` holds the values of a parameter cast to ``t``'s dtype (autocast's weight copy)."""
    base = t._base if t._base is not None else t
    for p in params:
        if p.dtype == base.dtype or p.numel() != base.numel():
            continue
        for cand in (base, base.t() if base.dim() == 2 else None):
            if cand is not None and cand.shape == p.shape and torch.equal(cand, p.detach().to(base.dtype)):
                return True
    return False


def truth_saved(loss: torch.Tensor, model: torch.nn.Module, split_casts: bool) -> dict[str, Any]:
    """Walk the autograd graph from ``loss``: unique saved storages, parameters left out."""
    params = list({id(p): p for p in model.parameters()}.values())
    param_ptrs = {k[0] for p in params if (k := _storage(p)) is not None}
    seen_nodes: set[int] = set()
    stack = [loss.grad_fn] if loss.grad_fn is not None else []
    saved: dict[int, int] = {}
    casts: dict[int, int] = {}
    n_nodes = n_saved = 0
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        n_nodes += 1
        for t in _saved_tensors_of(node):
            n_saved += 1
            key = _storage(t)
            if key is None or key[0] in param_ptrs or key[0] in saved or key[0] in casts:
                continue
            if split_casts and t.is_floating_point() and _is_param_cast(t, params):
                casts[key[0]] = key[1]
            else:
                saved[key[0]] = key[1]
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)
    return {
        "activations": sum(saved.values()),
        "autocast_copies": sum(casts.values()),
        "nodes": n_nodes,
        "saved_tensors": n_saved,
        "unique_storages": len(saved) + len(casts),
    }


# --------------------------------------------------------------------------- one model


def measure(
    preset: str, device: torch.device, steps: int, amp: str | None, sample_interval: float | None
) -> dict[str, Any]:
    step, desc = common.nanogpt_step(preset, device, amp=amp)
    model, opt = step.model, step.optimizer
    cuda = device.type == "cuda"
    truths: list[dict[str, Any]] = []
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
    with profiler.profile(model, opt, sample_interval=sample_interval) as prof:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            t: dict[str, Any] = {}
            if cuda:
                torch.cuda.synchronize(device)
                t["allocated_before_forward"] = torch.cuda.memory_allocated(device)
            loss = step.forward()
            if cuda:
                torch.cuda.synchronize(device)
                t["allocated_after_forward"] = torch.cuda.memory_allocated(device)
                t["forward_alloc_delta"] = t["allocated_after_forward"] - t["allocated_before_forward"]
            t0 = time.perf_counter()
            t["graph"] = truth_saved(loss, model, split_casts=amp is not None)
            t["graph_walk_s"] = round(time.perf_counter() - t0, 4)
            step.backward_and_step(loss)
            common.sync(device)
            t["parameters"] = unique_storage_bytes(list(model.parameters()))
            t["gradients"] = truth_gradients(model)
            t["optimizer_state"] = truth_optimizer_state(opt)
            truths.append(t)
            del loss
    mem = prof.to_dict()["models"][0]["memory"]
    rows = []
    for t, s in zip(truths, mem["steps"]):
        cats = s["categories"]
        truth = {
            "parameters": t["parameters"],
            "gradients": t["gradients"],
            "optimizer_state": t["optimizer_state"]["bytes"],
            "activations": t["graph"]["activations"],
            "autocast_copies": t["graph"]["autocast_copies"],
        }
        cmp = {}
        for c in CATEGORIES:
            m, tr = cats.get(c), truth[c]
            cmp[c] = {
                "measured": m,
                "truth": tr,
                "abs_err": None if m is None else m - tr,
                "rel_err": common.rel_err(m, tr),
            }
        # activations + copies against the whole graph walk: robust to how a copy is classified
        total_m = (cats.get("activations") or 0) + (cats.get("autocast_copies") or 0)
        total_t = truth["activations"] + truth["autocast_copies"]
        cmp["saved_total"] = {
            "measured": total_m,
            "truth": total_t,
            "abs_err": total_m - total_t,
            "rel_err": common.rel_err(total_m, total_t),
        }
        row: dict[str, Any] = {
            "index": s["index"],
            "kind": s["kind"],
            "complete": s["complete"],
            "compare": cmp,
            "truth_detail": {k: v for k, v in t.items() if k not in ("parameters", "gradients")},
            "profiler_saved_tensors": s.get("saved_tensors"),
        }
        if cuda:
            row["cuda"] = {
                "forward_alloc_delta": t["forward_alloc_delta"],
                "activations_plus_copies_over_forward_delta": common.ratio(total_m, t["forward_alloc_delta"]),
                "profiler_peak_allocated": s.get("peak_allocated"),
                "profiler_phase_peaks": {k: v.get("peak_allocated") for k, v in s["phases"].items()},
                "profiler_other": cats.get("other"),
                "nvml_process_used_peak": s.get("nvml_process_used_peak"),
                "nvml_device_used_peak": s.get("nvml_device_used_peak"),
            }
        rows.append(row)
    out: dict[str, Any] = {
        "model": desc,
        "steps": rows,
        "grad_scaler_skipped_steps": step.skipped_steps,  # a skipped optimizer step merges two iterations in profile()
        "profiler_notes": mem.get("notes"),
        "sampler_sources": mem.get("sampler", {}).get("sources"),
    }
    steady = [r for r in rows if r["kind"] == "steady" and r["complete"]] or rows
    out["summary_steady"] = {
        c: {
            "max_abs_err": max(
                (abs(r["compare"][c]["abs_err"]) for r in steady if r["compare"][c]["abs_err"] is not None),
                default=None,
            ),
            "max_abs_rel_err": max(
                (abs(r["compare"][c]["rel_err"]) for r in steady if r["compare"][c]["rel_err"] is not None),
                default=None,
            ),
        }
        for c in (*CATEGORIES, "saved_total")
    }
    if cuda:
        out["cuda_independent"] = cuda_independent(step, rows[-1] if rows else None)
    return out


def cuda_independent(step: common.TrainStep, last_row: dict[str, Any] | None) -> dict[str, Any]:
    """An identical step without the profiler: its max_memory_allocated, and NVML vs nvidia-smi."""
    dev = step.device
    out: dict[str, Any] = {}
    try:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        start = torch.cuda.memory_allocated(dev)
        step()
        peak = torch.cuda.max_memory_allocated(dev)
        out["unprofiled_step"] = {
            "allocated_start": start,
            "max_memory_allocated": peak,
            "reserved": torch.cuda.memory_reserved(dev),
        }
        if last_row is not None:
            prof_peak = last_row["cuda"]["profiler_peak_allocated"]
            out["profiler_peak_vs_unprofiled_max"] = {
                "profiler": prof_peak,
                "unprofiled": peak,
                "abs_err": None if prof_peak is None else prof_peak - peak,
                "rel_err": common.rel_err(prof_peak, peak),
            }
    except Exception as exc:  # noqa: BLE001
        out["unprofiled_step_error"] = f"{type(exc).__name__}: {exc}"
    try:
        from profiler.tracking.sampler import MemorySampler  # noqa: PLC0415

        s = MemorySampler(device=dev, interval=0.05)
        s.start()
        sample = s.sample_now()
        smi = common.nvidia_smi_apps()
        s.stop()
        ours = sample.nvml_process_used
        smi_bytes = None if smi.get("ours_mib") is None else smi["ours_mib"] * 2**20
        out["nvml_vs_nvidia_smi"] = {
            "sampler_process_used": ours,
            "sampler_sources": s.sources,
            "nvidia_smi": smi,
            "nvidia_smi_ours_bytes": smi_bytes,
            "abs_err": None if ours is None or smi_bytes is None else ours - smi_bytes,
            "note": "nvidia-smi reports MiB (rounded); a difference under 1 MiB is agreement",
        }
    except Exception as exc:  # noqa: BLE001
        out["nvml_error"] = f"{type(exc).__name__}: {exc}"
    return out


# --------------------------------------------------------------------------- driver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--models", nargs="+", choices=list(common.PRESETS), default=["tiny", "small"])
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--steps", type=int, default=3, help="steps per model in one profile() block (first + steady)")
    p.add_argument(
        "--amp",
        nargs="+",
        choices=["auto", "fp32", "fp16", "bf16"],
        default=["auto"],
        help="one run per value; auto: fp16 autocast + GradScaler on CUDA, fp32 and bf16 autocast on CPU",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: os.cpu_count())")
    p.add_argument("--sample-interval", type=float, default=0.01)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/accuracy_<device>.json)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    threads = common.set_threads(args.threads)
    amps: list[str | None] = []
    for a in args.amp:
        for x in {"auto": ["fp16"] if device.type == "cuda" else ["fp32", "bf16"]}.get(a, [a]):
            x = None if x == "fp32" else x
            if x not in amps:
                amps.append(x)
    load_before = common.loadavg()
    results = {
        f"{name}/{amp or 'fp32'}": measure(name, device, args.steps, amp, args.sample_interval)
        for name in args.models
        for amp in amps
    }
    load_after = common.loadavg()
    data = {
        "benchmark": "accuracy",
        "machine": common.machine_info(),
        "settings": {
            "models": args.models,
            "device": str(device),
            "steps": args.steps,
            "amp": [a or "fp32" for a in amps],
            "torch_num_threads": threads,
            "sample_interval": args.sample_interval,
            "truth": {
                "gradients": "unique untyped storages of p.grad after the step",
                "optimizer_state": "walk of optimizer.state, tensor values, unique storages",
                "activations": "autograd graph walk from loss.grad_fn via next_functions; every _saved_* "
                "tensor (or tuple/list of tensors); dedup by storage data_ptr; parameter "
                "storages left out; with autocast, saved tensors equal to a parameter cast "
                "to their dtype are counted as autocast_copies",
            },
        },
        "load": {"loadavg_before": load_before, "loadavg_after": load_after},
        "models": results,
        "summary_steady": {name: r["summary_steady"] for name, r in results.items()},
        "fit": fit_accuracy(),
    }
    # Other models than the default pair get their own file: the committed run stays as it is.
    suffix = "" if args.models == ["tiny", "small"] else "_" + "_".join(args.models)
    path = common.write_json(f"accuracy_{device.type}{suffix}", data, args.out)

    rows = []
    for name, r in results.items():
        last = r["steps"][-1]["compare"]
        for c in (*CATEGORIES, "saved_total"):
            x = last[c]
            rel = x["rel_err"]
            rows.append([name, c, x["measured"], x["truth"], x["abs_err"], "" if rel is None else f"{rel * 100:+.3f}%"])
    print(tabulate(rows, headers=["model", "category (last step)", "profile()", "truth", "abs err (B)", "rel err"]))
    for name, r in results.items():
        if "cuda_independent" in r:
            ci = r["cuda_independent"]
            print(name, "peak vs unprofiled max_memory_allocated:", ci.get("profiler_peak_vs_unprofiled_max"))
    for fit in (data["fit"], data["fit"]["live_peak"]):
        rows = [[c["batch"], c["predicted"], c["measured"], f"{100 * c['rel_err']:+.3f}%"] for c in fit["checks"]]
        print(f"fit planner ({fit['method']}; {fit['quantity']}):")
        print(tabulate(rows, headers=["batch", "predicted B", "measured B", "error"]))
    print(f"load average before {load_before} after {load_after}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
