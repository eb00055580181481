"""One script to run on a machine with a CUDA GPU: the checks that cannot run on CPU.

    python benchmarks/gpu_check.py            # ~1-3 minutes on an H100; budget 6 minutes

Sections (each in its own try/except; a failure is recorded, the rest still runs;
the JSON is rewritten after every section, so a killed run keeps what it had):

  amp_batches  the seed nanoGPT (12 x 768, vocab 32000) with fp16 autocast + AdamW
               + GradScaler at batch 4, 8, 16 x seq 512 under profile(): categories,
               phase peaks, peak_allocated, reserved, NVML peaks; reconciled with
               max_memory_allocated measured independently (an identical unprofiled
               step, reset_peak_memory_stats before it) and with an allocator trace of
               the profiled step itself. Target: profile()'s peak within 2%.
  loss_outside the same reconciliation at batch 8 with the loss computed outside the
               model (logits = model(x); F.cross_entropy(...)), the common script shape:
               the forward phase runs until backward begins, so that loss must be inside it.
  nvml_vs_smi  NVML's per-process figure (the profiler's sampler, and pynvml direct)
               against `nvidia-smi --query-compute-apps=pid,used_memory`.
  overhead     plain vs profile() step time, seed model at batch 8, interleaved, medians.
               Target: <= 1.05x per step (set-up and exit reported apart).
  gpt2         GPT-2 small (transformers' class built from its config if installed,
               else the same architecture from examples/nanogpt.py; no download):
               one fp16 AMP step under profile().
  fit          the fit planner: peak at batch 16 and 24 predicted from batches 4 and 8, then measured (3% target).
  projection   the GPU projection (planned on fake tensors) against the same fp16 step measured on this
               GPU at batch 4 and 16 x 512, each in a fresh process, figure by figure
               (projection_check.py); targets: allocated peak 5%, reserved 10%, device used 10%.

Writes $OUT/gpu_check.json when the environment variable OUT is set, else
benchmarks/results/gpu_check.json (or --out). Exits with code 2 and a message
when CUDA is not available.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

import profiler  # noqa: E402

PEAK_TARGET = 0.02  # |profile() peak - independent max_memory_allocated| / independent
OVERHEAD_TARGET = 1.05
KNOWN = ("parameters", "gradients", "optimizer_state", "activations", "autocast_copies")


class Ctx:
    """What every section needs: device, sizes (smaller with --quick), the time budget."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args = args
        self.device = device
        self.cuda = device.type == "cuda"
        self.amp = "fp16" if self.cuda else None  # fp16 autocast on a CPU is impractically slow
        self.t0 = time.perf_counter()
        self.cleanup_errors: list[str] = []
        quick = args.quick
        self.preset = "small" if quick else "seed"
        self.batches = [1, 2] if quick else [4, 8, 16]
        self.seq = 64 if quick else 512
        self.overhead_batch = 2 if quick else 8
        self.overhead_repeats = 2 if quick else 7
        # ~30 ms a step on an H100: 30 steps make profile()'s one-time set-up
        # (NVML start, inventory) and report small beside them; both are kept apart too.
        self.overhead_k = 1 if quick else 30
        self.gpt2_batch, self.gpt2_seq = (1, 32) if quick else (8, 512)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def cleanup(self) -> None:
        """Free what a section left (never raises: after a sticky CUDA error the next section still reports)."""
        gc.collect()
        if self.cuda:
            try:
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()
            except Exception as exc:  # noqa: BLE001
                self.cleanup_errors.append(f"{type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- allocator helpers


def cuda_read(dev: torch.device) -> dict[str, int | None]:
    if dev.type != "cuda":
        return {"allocated": None, "reserved": None, "max_allocated": None}
    return {
        "allocated": torch.cuda.memory_allocated(dev),
        "reserved": torch.cuda.memory_reserved(dev),
        "max_allocated": torch.cuda.max_memory_allocated(dev),
    }


class AllocTrace:
    """The caching allocator's own alloc/free trace over a span: a second, same-step peak.

    Trace sizes are requested sizes, while the allocator's statistics count
    whole blocks: rounded up to 512 B, and a large block whose remainder was
    1 MiB or less is not split, so it can be up to 1 MiB bigger than asked
    for. This peak is therefore a lower bound on the allocator's, and
    ``end_check`` drifts as blocks allocated before the trace are freed. The
    2% target is judged against the independent ``max_memory_allocated``.
    """

    def __init__(self, dev: torch.device) -> None:
        self.dev = dev
        self.ok = dev.type == "cuda"
        self.start_allocated = 0

    def __enter__(self) -> AllocTrace:
        if self.ok:
            torch.cuda.synchronize(self.dev)
            try:
                torch.cuda.memory._record_memory_history(
                    enabled="all",
                    context=None,
                    stacks="python",
                    max_entries=4_000_000,
                    device=self.dev,
                    clear_history=True,
                )
            except TypeError:  # older torch: no clear_history
                torch.cuda.memory._record_memory_history(enabled="all", context=None, max_entries=4_000_000)
            self.start_allocated = torch.cuda.memory_allocated(self.dev)
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.ok:
            return
        torch.cuda.synchronize(self.dev)
        self.end_allocated = torch.cuda.memory_allocated(self.dev)
        try:
            self.snapshot = torch.cuda.memory._snapshot(self.dev)
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)

    def result(self) -> dict[str, Any]:
        if not self.ok:
            return {"available": False, "reason": "not CUDA"}
        index = self.dev.index if self.dev.index is not None else torch.cuda.current_device()
        traces = self.snapshot.get("device_traces", [])
        events = traces[index] if index < len(traces) else []
        if not events:
            return {"available": False, "reason": "the allocator trace came back empty"}
        cur_req = cur_rnd = self.start_allocated
        peak_req = peak_rnd = cur_req
        counts: dict[str, int] = {}
        for e in events:
            action = e.get("action")
            counts[action] = counts.get(action, 0) + 1
            size = int(e.get("size", 0))
            rounded = (size + 511) // 512 * 512
            if action == "alloc":
                cur_req += size
                cur_rnd += rounded
                peak_req, peak_rnd = max(peak_req, cur_req), max(peak_rnd, cur_rnd)
            elif action == "free_requested":  # allocated_bytes drops here, not at free_completed
                cur_req -= size
                cur_rnd -= rounded
        return {
            "available": True,
            "events": len(events),
            "actions": counts,
            "start_allocated": self.start_allocated,
            "peak_requested_sizes": peak_req,
            "peak_rounded_512": peak_rnd,
            "end_allocated_actual": self.end_allocated,
            "end_check_rounded_512": cur_rnd - self.end_allocated,  # 0 when the trace accounts for every byte
            "truncated": len(events) >= 4_000_000,
        }


def step_summary(step: dict[str, Any]) -> dict[str, Any]:
    cats = step["categories"]
    known = sum(cats.get(k) or 0 for k in KNOWN)
    return {
        "index": step["index"],
        "kind": step["kind"],
        "complete": step["complete"],
        "forwards": step["forwards"],
        "backwards": step["backwards"],
        "optimizer_steps": step["optimizer_steps"],
        "categories": cats,
        "known_sum": known,
        "phase_peaks": {k: v.get("peak_allocated") for k, v in step["phases"].items()},
        "phase_seconds": {k: v.get("seconds") for k, v in step["phases"].items()},
        "phase_gpu_seconds": {k: v.get("gpu_seconds") for k, v in step["phases"].items()},
        "phase_nvml_process_peaks": {k: v.get("nvml_process_used_peak") for k, v in step["phases"].items()},
        "allocated_start": step.get("allocated_start"),
        "peak_allocated": step.get("peak_allocated"),
        "reserved": step.get("reserved"),
        "nvml_process_used_peak": step.get("nvml_process_used_peak"),
        "nvml_device_used_peak": step.get("nvml_device_used_peak"),
        "nvml_device_used_above_baseline_peak": step.get("nvml_device_used_above_baseline_peak"),
        "categories_live_peak": step.get("categories_live_peak"),
        "host_rss_peak": step.get("host_rss_peak"),
        "activations_by_bucket": step.get("activations_by_bucket"),
    }


# --------------------------------------------------------------------------- sections


def reconcile_step(ctx: Ctx, step: common.TrainStep, entry: dict[str, Any]) -> None:
    """Warm up, then one unprofiled step and one profiled step of ``step``; fill ``entry``."""
    dev = ctx.device
    prof = None
    for _ in range(2):  # optimizer state exists, scaler calibrated, kernels chosen
        step()
    # (1) independent: an identical unprofiled step, peak counter reset before it
    common.sync(dev)
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    before = cuda_read(dev)
    step()
    after = cuda_read(dev)
    entry["unprofiled_step"] = {
        "allocated_start": before["allocated"],
        "max_memory_allocated": after["max_allocated"],
        "allocated_end": after["allocated"],
        "reserved": after["reserved"],
    }
    # (2) the profiled step, with the allocator's trace recorded over it
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    skipped_before = step.skipped_steps
    with AllocTrace(dev) as trace:
        with profiler.profile(step.model, step.optimizer) as prof:
            step()
    after_prof = cuda_read(dev)
    entry["grad_scaler_skipped_in_profiled_step"] = step.skipped_steps - skipped_before
    mem = prof.to_dict()["models"][0]["memory"]
    steps = mem["steps"]
    entry["profiled_steps_seen"] = len(steps)
    s = step_summary(steps[-1]) if steps else None
    entry["profile"] = s
    entry["sampler_sources"] = mem.get("sampler", {}).get("sources")
    entry["sampler_baseline"] = mem.get("sampler", {}).get("baseline")
    entry["profiler_notes"] = mem.get("notes")
    entry["trace"] = trace.result()
    entry["max_memory_allocated_after_profiled_step"] = after_prof["max_allocated"]
    entry["max_memory_allocated_after_profiled_step_note"] = (
        "reset_peak_memory_stats was called before the profiled step, but profile() resets the peak "
        "counter itself at every phase start, so this covers only the last phase(s) of the step"
    )
    # (3) reconciliation
    if s is not None and ctx.cuda:
        ind = entry["unprofiled_step"]["max_memory_allocated"]
        tr = entry["trace"].get("peak_rounded_512")
        peak = s["peak_allocated"]
        rel = common.rel_err(peak, ind)
        entry["reconciliation"] = {
            "profile_peak_allocated": peak,
            "independent_max_memory_allocated": ind,
            "trace_peak_same_step": tr,
            "rel_err_vs_independent": rel,
            "rel_err_vs_trace": common.rel_err(peak, tr),
            "trace_note": "the trace peak sums requested sizes: a lower bound on the allocator's block-size peak",
            "known_sum": s["known_sum"],
            "known_sum_note": "every category's own figure added up: some are never alive together "
            "(activations are freed as gradients grow), so this can exceed the peak",
            "categories_live_peak": s["categories_live_peak"],
            "live_peak_over_independent_peak": common.ratio(s["categories_live_peak"], ind),
            "other": s["categories"].get("other"),
            "target_rel_err": PEAK_TARGET,
            "target_met": (abs(rel) <= PEAK_TARGET) if rel is not None else None,
        }


def section_amp_batches(ctx: Ctx) -> dict[str, Any]:
    out: dict[str, Any] = {"preset": ctx.preset, "seq": ctx.seq, "amp": ctx.amp or "fp32", "by_batch": {}}
    for batch in ctx.batches:
        entry: dict[str, Any] = {}
        out["by_batch"][str(batch)] = entry
        step = None
        try:
            ctx.cleanup()
            step, desc = common.nanogpt_step(ctx.preset, ctx.device, amp=ctx.amp, batch=batch, seq=ctx.seq)
            entry["model"] = desc
            reconcile_step(ctx, step, entry)
        except Exception as exc:  # noqa: BLE001
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc(limit=6)
        finally:
            step = None  # let the model go before the next size
            ctx.cleanup()
    rec = [b.get("reconciliation", {}).get("target_met") for b in out["by_batch"].values()]
    out["target_met"] = all(rec) if rec and all(r is not None for r in rec) else None
    return out


def section_loss_outside(ctx: Ctx) -> dict[str, Any]:
    """The common script shape: ``logits = model(x)``, then the loss computed outside the model.

    The fp32 upcast and log-softmax of the logits happen after the model's
    forward returns; profile()'s forward phase lasts until backward begins, so
    the step's peak must still be found. This checks it against the allocator.
    """
    import torch.nn.functional as F  # noqa: PLC0415

    entry: dict[str, Any] = {}
    step = None
    try:
        ctx.cleanup()
        batch = ctx.overhead_batch
        step, desc = common.nanogpt_step(ctx.preset, ctx.device, amp=ctx.amp, batch=batch, seq=ctx.seq)

        def loss_outside(m: torch.nn.Module, b: Any) -> torch.Tensor:
            logits, _ = m(b[0])  # no targets: the model returns logits only
            return F.cross_entropy(logits.view(-1, logits.size(-1)), b[1].reshape(-1))

        step.loss_fn = loss_outside
        desc["loss"] = "F.cross_entropy(model(x)[0], y) computed outside the model, inside autocast"
        entry["model"] = desc
        reconcile_step(ctx, step, entry)
    finally:
        step = None
        ctx.cleanup()
    return entry


def section_nvml_vs_smi(ctx: Ctx) -> dict[str, Any]:
    from profiler.tracking.sampler import MemorySampler  # noqa: PLC0415

    dev = ctx.device
    out: dict[str, Any] = {}
    # hold some memory so the process figure is not just the context
    hold = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)
    uuid = f"GPU-{torch.cuda.get_device_properties(dev).uuid}" if ctx.cuda else None
    out["gpu_uuid"] = uuid
    try:
        common.sync(dev)
        s = MemorySampler(device=dev, interval=0.05)
        s.start()
        try:
            sample = s.sample_now()
            smi = common.nvidia_smi_apps(uuid)
            sample2 = s.sample_now()
        finally:
            s.stop()
        out["sampler"] = {
            "process_used": sample.nvml_process_used,
            "process_used_after_smi": sample2.nvml_process_used,
            "device_used": sample.nvml_device_used,
            "host_rss": sample.host_rss,
            "sources": s.sources,
        }
        out["nvidia_smi"] = smi
        smi_b = None if smi.get("ours_mib") is None else smi["ours_mib"] * 2**20
        out["nvidia_smi_ours_bytes"] = smi_b
        out["abs_diff_bytes"] = (
            None if smi_b is None or sample.nvml_process_used is None else sample.nvml_process_used - smi_b
        )
        out["agree_within_1_mib"] = None if out["abs_diff_bytes"] is None else abs(out["abs_diff_bytes"]) < 2**20
        out["torch"] = cuda_read(dev)
        if ctx.cuda and sample.nvml_process_used is not None:
            out["process_minus_reserved"] = sample.nvml_process_used - torch.cuda.memory_reserved(dev)
            out["process_minus_reserved_note"] = (
                "CUDA context, cuBLAS workspaces and other non-PyTorch-allocator memory"
            )
        try:
            import pynvml  # noqa: PLC0415

            pynvml.nvmlInit()
            try:
                # By UUID: with CUDA_VISIBLE_DEVICES, torch's index is not NVML's.
                h = pynvml.nvmlDeviceGetHandleByUUID(uuid) if uuid else pynvml.nvmlDeviceGetHandleByIndex(0)
                try:
                    procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
                except pynvml.NVMLError:  # an older driver: the v2 query, as the sampler falls back
                    procs = pynvml.nvmlDeviceGetComputeRunningProcesses_v2(h)
                out["pynvml_direct"] = {str(p.pid): p.usedGpuMemory for p in procs}
            finally:
                pynvml.nvmlShutdown()
        except Exception as exc:  # noqa: BLE001
            out["pynvml_direct_error"] = f"{type(exc).__name__}: {exc}"
        out["pynvml_vs_smi_by_pid"] = compare_by_pid(out.get("pynvml_direct"), smi.get("apps_mib"))
    finally:
        del hold
        ctx.cleanup()
    return out


def compare_by_pid(nvml_bytes: dict[str, int | None] | None, smi_mib: dict[str, int | None] | None) -> dict[str, Any]:
    """NVML's and nvidia-smi's figure for every process both list on this GPU.

    In a container both give host PIDs, so ours is not found by ``os.getpid()``;
    the two tools are still compared row by row (the same PIDs).
    """
    if not nvml_bytes or not smi_mib:
        return {"compared": 0}
    rows = {}
    for pid in sorted(set(nvml_bytes) & set(smi_mib)):
        a, b = nvml_bytes[pid], smi_mib[pid]
        diff = None if a is None or b is None else a - b * 2**20
        rows[pid] = {"nvml_bytes": a, "smi_mib": b, "diff_bytes": diff}
    diffs = [r["diff_bytes"] for r in rows.values() if r["diff_bytes"] is not None]
    return {
        "compared": len(rows),
        "rows": rows,
        "all_within_1_mib": all(abs(d) < 2**20 for d in diffs) if diffs else None,
    }


def section_overhead(ctx: Ctx) -> dict[str, Any]:
    import overhead  # noqa: PLC0415  (benchmarks/overhead.py: the same run_block as the overhead benchmark)

    dev = ctx.device
    step, desc = common.nanogpt_step(ctx.preset, dev, amp=ctx.amp, batch=ctx.overhead_batch, seq=ctx.seq)
    try:
        for _ in range(3):
            step()
        overhead.run_block("ours", step, 1)  # untimed: first-use costs (NVML init, imports)
        raw: dict[str, list[dict[str, float]]] = {"plain": [], "ours": []}
        for _ in range(ctx.overhead_repeats):
            for mode in ("plain", "ours"):
                r = overhead.run_block(mode, step, ctx.overhead_k)
                r.pop("prof", None)
                raw[mode].append({k: round(v, 6) for k, v in r.items()})
        per = {m: [x["per_step_s"] for x in rows] for m, rows in raw.items()}
        steps_only = {m: [x["per_step_steps_only_s"] for x in rows] for m, rows in raw.items()}
        med = {m: common.median(v) for m, v in per.items()}
        med_steps = {m: common.median(v) for m, v in steps_only.items()}
        paired = [a / b for a, b in zip(per["ours"], per["plain"])]
        ratio = common.ratio(med["ours"], med["plain"])
        ratio_steps = common.ratio(med_steps["ours"], med_steps["plain"])
        return {
            "model": desc,
            "repeats": ctx.overhead_repeats,
            "steps_per_repeat": ctx.overhead_k,
            "timed_span": "whole with-block (profile() construction + K steps + exit) / K; plain: K steps / K",
            "raw": raw,
            "medians": {
                m: {
                    "per_step_s": med[m],
                    "per_step_steps_only_s": med_steps[m],
                    "setup_s": common.median(x["setup_s"] for x in raw[m]),
                    "teardown_s": common.median(x["teardown_s"] for x in raw[m]),
                }
                for m in raw
            },
            "ratio_of_medians": ratio,
            "ratio_of_medians_steps_only": ratio_steps,
            "median_paired_ratio": common.median(paired),
            "target_max_ratio": OVERHEAD_TARGET,
            "target_judged_on": "per step: the K steps inside the block / K (ratio_of_medians_steps_only); "
            "profile()'s one-time set-up (NVML start, inventory) and exit (report) are "
            "medians_*.setup_s / teardown_s, and the whole block / K is ratio_of_medians",
            "target_met": (ratio_steps <= OVERHEAD_TARGET) if ratio_steps is not None else None,
            "target_met_whole_block": (ratio <= OVERHEAD_TARGET) if ratio is not None else None,
        }
    finally:
        del step
        ctx.cleanup()


def gpt2_small(dev: torch.device) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """GPT-2 small (124M) from its config: transformers' class if installed, else the repo's nanoGPT.

    nanoGPT is GPT-2's architecture (vocab 50257, 1024 positions, 12 x 768, 12
    heads, tied head); the device machine need not have transformers.
    """
    try:
        from transformers import GPT2Config, GPT2LMHeadModel  # noqa: PLC0415
    except ImportError:
        nanogpt = common.load_nanogpt()
        cfg = nanogpt.GPTConfig(
            vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, dropout=0.0, bias=True
        )
        model = nanogpt.GPT(cfg)
        return model, (lambda m, b: m(b, b)[1]), {"implementation": "examples/nanogpt.py (transformers not installed)"}
    model = GPT2LMHeadModel(GPT2Config())
    info = {
        "implementation": "transformers GPT2LMHeadModel",
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }
    return model, (lambda m, b: m(input_ids=b, labels=b).loss), info


def section_gpt2(ctx: Ctx) -> dict[str, Any]:
    dev = ctx.device
    torch.manual_seed(0)
    model, loss_fn, info = gpt2_small(dev)
    model = model.to(dev)
    model.train()
    ids = torch.randint(0, 50257, (ctx.gpt2_batch, ctx.gpt2_seq), device=dev)
    step = common.TrainStep(model, ids, device=dev, amp=ctx.amp, loss_fn=loss_fn)
    try:
        ctx.cleanup()
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        before = cuda_read(dev)
        with AllocTrace(dev) as trace:
            with profiler.profile(model, step.optimizer) as prof:
                step()
        mem = prof.to_dict()["models"][0]["memory"]
        s = step_summary(mem["steps"][-1]) if mem["steps"] else None
        tr = trace.result()
        out = {
            **info,
            "params": common.unique_param_count(model),
            "batch": ctx.gpt2_batch,
            "seq": ctx.gpt2_seq,
            "amp": ctx.amp or "fp32",
            "allocated_before": before["allocated"],
            "profile": s,
            "steps_seen": len(mem["steps"]),
            "grad_scaler_skipped": step.skipped_steps,
            "trace": tr,
            "profiler_notes": mem.get("notes"),
            "loss": float(step.last_loss) if step.last_loss is not None else None,
        }
        if s is not None and tr.get("available"):
            out["rel_err_peak_vs_trace"] = common.rel_err(s["peak_allocated"], tr["peak_rounded_512"])
        return out
    finally:
        del step, model
        ctx.cleanup()


def section_fit(ctx: Ctx) -> dict[str, Any]:
    """Predict the allocator peak at batch 16 and 24 from batches 4 and 8 (fp16 AMP on CUDA), then measure."""
    try:
        return common.fit_check(
            ctx.preset, ctx.device, amp=ctx.amp, fit_batches=[4, 8], check_batches=[16, 24], seq=ctx.seq
        )
    finally:
        ctx.cleanup()


def section_projection(ctx: Ctx) -> dict[str, Any]:
    """Projected allocated / reserved / device-used figures against this GPU's own, at two batch sizes."""
    if not ctx.cuda:
        return {"skipped": "needs CUDA"}
    import projection_check  # noqa: PLC0415

    points = projection_check.gpu_points([4, 16], ctx.seq)
    limits = {"backward peak": 0.05, "reserved": 0.10, "device used (NVML, end of step)": 0.10}
    last = [r for p in points for r in p.get("comparison", []) if r["step"] == 3 and r["figure"] in limits]
    met = bool(last) and all(abs(r["error"]) <= limits[r["figure"]] for r in last)
    return {"points": points, "targets": limits, "target_met": met}


SECTIONS = [
    ("amp_batches", section_amp_batches),
    ("loss_outside", section_loss_outside),
    ("nvml_vs_smi", section_nvml_vs_smi),
    ("overhead", section_overhead),
    ("gpt2", section_gpt2),
    ("fit", section_fit),
    ("projection", section_projection),
]


# --------------------------------------------------------------------------- driver


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "device": str(device)}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        info["total_memory"] = props.total_memory
        info["capability"] = f"{props.major}.{props.minor}"
    else:
        info["name"] = None
    try:
        import pynvml  # noqa: PLC0415

        pynvml.nvmlInit()
        try:
            v = pynvml.nvmlSystemGetDriverVersion()
            info["driver_version"] = v.decode() if isinstance(v, bytes) else v
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001
        info["driver_version"] = None
        info["driver_version_error"] = f"{type(exc).__name__}: {exc}"
    return info


def output_path(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_check.json"
    if args.allow_cpu:  # a CPU dry run must not look like a GPU result
        return Path(tempfile.gettempdir()) / "gpu_check_cpu_dryrun.json"
    return common.RESULTS / "gpu_check.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--sections", nargs="+", choices=[n for n, _ in SECTIONS], default=[n for n, _ in SECTIONS])
    p.add_argument("--budget-s", type=float, default=360.0, help="skip the remaining sections past this many seconds")
    p.add_argument(
        "--out", default=None, help="JSON path (default $OUT/gpu_check.json or benchmarks/results/gpu_check.json)"
    )
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    # testing only: run the sections on the CPU with small sizes (no CUDA figures)
    p.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print(
            "gpu_check: CUDA is not available on this machine (torch "
            f"{torch.__version__}, torch.version.cuda={torch.version.cuda}); nothing was run. "
            "Run this script on a machine with an NVIDIA GPU.",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if args.allow_cpu and device.type == "cpu":
        args.quick = True
    common.set_threads(args.threads)
    ctx = Ctx(args, device)
    path = output_path(args)
    result: dict[str, Any] = {
        "benchmark": "gpu_check",
        "machine": common.machine_info(),
        "device": device_info(device),
        "settings": {
            "sections": args.sections,
            "budget_s": args.budget_s,
            "quick": ctx.args.quick,
            "dry_run_on_cpu": device.type == "cpu",
            "preset": ctx.preset,
            "batches": ctx.batches,
            "seq": ctx.seq,
            "amp": ctx.amp or "fp32",
        },
        "load": {"loadavg_before": common.loadavg()},
        "section_seconds": {},
        "targets": {"peak_rel_err": PEAK_TARGET, "overhead_max_ratio": OVERHEAD_TARGET},
    }
    for name, fn in SECTIONS:
        if name not in args.sections:
            continue
        if ctx.elapsed() > args.budget_s:
            result[name] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
            continue
        t0 = time.perf_counter()
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        try:
            result[name] = fn(ctx)
        except Exception as exc:  # noqa: BLE001
            result[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)}
            ctx.cleanup()
        result["section_seconds"][name] = round(time.perf_counter() - t0, 2)
        result["load"]["loadavg_after"] = common.loadavg()
        common.write_json("gpu_check", result, path)  # after every section: a killed run keeps what it had

    result["target_met"] = {
        "peak_within_2pct": (result.get("amp_batches") or {}).get("target_met"),
        "peak_within_2pct_loss_outside": ((result.get("loss_outside") or {}).get("reconciliation") or {}).get(
            "target_met"
        ),
        "overhead_le_1.05x": (result.get("overhead") or {}).get("target_met"),
        "fit_within_3pct": (result.get("fit") or {}).get("target_met"),
        "projection_within_targets": (result.get("projection") or {}).get("target_met"),
    }
    result["cleanup_errors"] = ctx.cleanup_errors
    result["total_s"] = round(ctx.elapsed(), 1)
    common.write_json("gpu_check", result, path)
    print_summary(result)
    print(f"wrote {path}")
    return 0


def print_summary(result: dict[str, Any]) -> None:
    rows = []
    amp = result.get("amp_batches") or {}
    for b, e in (amp.get("by_batch") or {}).items():
        if "error" in e:
            rows.append([f"batch {b}", "error", e["error"][:60], "", ""])
            continue
        rc = e.get("reconciliation") or {}
        s = e.get("profile") or {}
        rel = rc.get("rel_err_vs_independent")
        rows.append(
            [
                f"batch {b}",
                s.get("peak_allocated"),
                rc.get("independent_max_memory_allocated"),
                "" if rel is None else f"{rel * 100:+.2f}%",
                s.get("known_sum"),
            ]
        )
    if rows:
        print(tabulate(rows, headers=["amp step", "profile() peak", "independent max_alloc", "rel err", "known sum"]))
    ov = result.get("overhead") or {}
    if ov.get("ratio_of_medians_steps_only") is not None and ov.get("ratio_of_medians") is not None:
        print(
            f"overhead: profile() / plain = {ov['ratio_of_medians_steps_only']:.3f}x per step "
            f"({ov['ratio_of_medians']:.3f}x with setup and teardown; "
            f"target <= {OVERHEAD_TARGET}x, met={ov['target_met']})"
        )
    lo = (result.get("loss_outside") or {}).get("reconciliation") or {}
    if lo.get("rel_err_vs_independent") is not None:
        print(
            f"loss outside the model: profile() peak rel err {lo['rel_err_vs_independent'] * 100:+.2f}% "
            f"(target_met={lo['target_met']})"
        )
    for name in ("amp_batches", "loss_outside", "nvml_vs_smi", "overhead", "gpt2", "fit"):
        sec = result.get(name)
        if isinstance(sec, dict) and ("error" in sec or "skipped" in sec):
            print(f"{name}: {sec.get('error') or sec.get('skipped')}")
    print("target_met:", result.get("target_met"))


if __name__ == "__main__":
    sys.exit(main())
