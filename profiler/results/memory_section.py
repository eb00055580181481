"""Turn a StepTracker's measurements into the Report's ``memory`` section.

Kept apart from the tracker so the tracker only observes and this module only
arranges: the JSON shape (a public contract, typed in ``schema``) and the
notes that say what a figure means or why it is missing live here.
"""

from __future__ import annotations

from typing import Any

import torch

from ..model.buckets import BUCKETS, Buckets
from ..tracking import StepRecord, StepTracker
from ..tracking.phases import span_seconds
from .gpu_replay import WORKSPACE_SIZES, allocator_settings, replay_by_batch, replay_trace
from .schema import MemoryJSON, StepJSON
from .steps import batch_and_sequence, described_step

__all__ = ["memory_section", "categories_live_peak", "CPU_UNAVAILABLE"]

CPU_UNAVAILABLE = "allocator statistics unavailable on CPU (PyTorch's CPU allocator keeps no counters)"


def categories_live_peak(step: StepRecord) -> int:
    """The most bytes the measured categories held at one moment of the step.

    Backward frees activations while gradients grow, so the sum of every
    category's size is more than was ever alive at once; replaying the step's
    timeline from what was alive when it began gives the real maximum.
    """
    live = step.parameters + step.gradients_start + step.optimizer_state_before
    peak = live
    for _, _, delta in sorted(step.events, key=lambda e: e[0]):
        live += delta
        peak = max(peak, live)
    return peak


def _step_dict(step: StepRecord, tracker: StepTracker, by_label: dict[str, dict]) -> StepJSON:
    live_peak = categories_live_peak(step)
    # "other" is what the measured peak holds beyond the categories at their
    # largest simultaneous total: temporaries, workspace, allocator rounding.
    # Only against the allocator's peak: the live-tensor peak leaves out tensors
    # made before the step (the batch) that the categories may hold.
    other = None if step.peak_allocated is None else step.peak_allocated - live_peak
    out: StepJSON = {
        "index": step.index,
        "kind": "first" if step.first else "steady",
        "complete": step.complete,
        "seconds": step.seconds,
        "input_shape": list(step.input_shape) if step.input_shape is not None else None,
        "input_is_tokens": step.input_is_tokens,
        "batch_dim": step.batch_dim,
        "batch_source": step.batch_source,
        "trunk_input_shape": list(step.trunk_input_shape) if step.trunk_input_shape is not None else None,
        "forwards": step.forwards,
        # Forwards whose output no backward of the step reached (a probe the script kept): not part of it.
        "forwards_left_out": step.forwards_left_out,
        "activations_left_out": step.activations_left_out,
        "backwards": step.backwards,
        "optimizer_steps": step.optimizer_steps,
        "optimizer_skipped": step.optimizer_skipped,
        "optimizer_failed": step.optimizer_failed,
        "gradient_checkpointing": step.checkpointing,
        "saves_after_forward_unseen": step.saves_after_forward_unseen,
        "categories": {
            "parameters": step.parameters,
            "gradients": step.gradients,
            "optimizer_state": step.optimizer_state,
            "activations": step.activations,
            "autocast_copies": step.autocast_copies,
            "other": other,
        },
        "optimizer_state": {"by_name": step.optimizer_state_by_name, "by_group": step.optimizer_state_by_group},
        "saved_tensors": step.saved_tensors,
        "forwards_repeated": step.forwards_repeated,
        "repeats_unverified": step.repeats_unverified,
        "repeats_raised": step.repeats_raised,
        # Saved-tensor hooks see inside torch.compile'd graphs too: always measured (kept for readers of schema 1).
        "activations_measured": True,
        # Of 'activations', what a module compiled whole saved: measured, but no block is known for it.
        "activations_inside_compiled": step.activations_inside_compiled,
        "activations_offloaded": step.activations_offloaded,
        "unsharded_parameters_saved": step.unsharded_parameters_saved,
        "unsharded_parameters_held": step.unsharded_parameters_held,
        "activations_by_bucket": {b: step.activations_by_bucket.get(b, 0) for b in BUCKETS},
        "phases": {
            name: {
                "seconds": ph.seconds,
                "gpu_seconds": span_seconds(ph.device_spans),
                "peak_allocated": ph.peak_allocated,
                "allocated_end": ph.allocated_end,
                "reserved_end": ph.reserved_end,
                "live_tensor_peak": ph.live_tensor_peak,
            }
            for name, ph in step.phases.items()
        },
        "categories_live_peak": live_peak,
        "allocated_start": step.allocated_start,
        "peak_allocated": step.peak_allocated,
        "live_tensor_peak": step.live_tensor_peak,
        "reserved": step.reserved,
        "nvml_process_used_peak": None,
        "nvml_device_used_peak": None,
        "host_rss_peak": None,
    }
    t0 = step.started_at
    out["baseline"] = {
        "parameters": step.parameters,
        "gradients": step.gradients_start,
        "optimizer_state": step.optimizer_state_before,
    }
    out["timeline"] = {
        "t": [round(t - t0, 6) for t, _, _ in step.events],
        "category": [c for _, c, _ in step.events],
        "delta": [d for _, _, d in step.events],
    }
    out["phase_spans"] = {
        name: [[round(a - t0, 6), round(b - t0, 6)] for a, b in spans] for name, spans in step.phase_spans.items()
    }
    sampler = tracker.phases.sampler
    if sampler is not None:
        out["sampler_offset"] = round(t0 - sampler.started_at, 6)  # this step's start on the sampler's clock
        for name in out["phases"]:
            peaks = by_label.get(f"{step.index}:{name}", {})
            out["phases"][name].update(
                {
                    "host_rss_peak": peaks.get("host_rss"),
                    "nvml_process_used_peak": peaks.get("nvml_process_used"),
                    "nvml_device_used_peak": peaks.get("nvml_device_used"),
                }
            )
            for key in ("host_rss_peak", "nvml_process_used_peak", "nvml_device_used_peak"):
                value = out["phases"][name][key]
                if value is not None:
                    out[key] = max(out[key] or 0, value)
        baseline = sampler.baseline_nvml_device_used
        if out["nvml_device_used_peak"] is not None and baseline is not None:
            # What a container that hides our pid from NVML still allows: the
            # device's growth since sampling began (the CUDA context, created
            # before that, is not in it).
            out["nvml_device_used_above_baseline_peak"] = out["nvml_device_used_peak"] - baseline
    return out


def _per_block_module(by_module: list[dict[str, Any]], buckets: Buckets) -> list[dict[str, Any]]:
    """Activations of the same submodule summed over all blocks of a trunk ("h.*.attn").

    Twelve identical rows say less than one row with the total and the count.
    """
    blocks = [(t.path, b) for t in buckets.trunks for b in t.block_paths]
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    order: list[tuple[str, str]] = []
    for row in by_module:
        path = row["path"]
        key = path
        for trunk_path, block in blocks:
            if path == block or path.startswith(block + "."):
                key = (f"{trunk_path}." if trunk_path else "") + "*" + path[len(block) :]
                break
        group = (key, row["bucket"])
        if group not in groups:
            groups[group] = {"path": key, "bucket": row["bucket"], "bytes": 0, "modules": 0}
            order.append(group)
        groups[group]["bytes"] += row["bytes"]
        groups[group]["modules"] += 1
    return sorted((groups[k] for k in order), key=lambda g: -g["bytes"])


def memory_section(tracker: StepTracker, buckets: Buckets) -> MemoryJSON:
    """The JSON ``memory`` section for one model."""
    cuda = tracker.device.type == "cuda"
    sampler = tracker.phases.sampler
    by_label = sampler.peaks_by_label() if sampler is not None else {}  # (once: it lists every step's phases)
    steps = [_step_dict(s, tracker, by_label) for s in tracker.steps]
    chosen = described_step(steps)
    last = tracker.steps[steps.index(chosen)] if chosen is not None else None
    by_module = []
    if last is not None:
        for (path, bucket), nbytes in sorted(last.activations_by_module.items(), key=lambda kv: -kv[1]):
            by_module.append({"path": path, "bucket": bucket, "bytes": nbytes})
    section: MemoryJSON = {
        "device": str(tracker.device),
        "allocator": "cuda caching allocator" if cuda else "unavailable: " + CPU_UNAVAILABLE,
        "live_peak": tracker.phases.live_peak,
        "optimizer": tracker.optimizers.name,
        "steps": steps,
        "activations_by_module": by_module,
        "activations_by_block_module": _per_block_module(by_module, buckets),
        "activations_step": last.index if last is not None else None,
        "backward_passes_discarded": tracker.backward_passes_discarded,
        "notes": _measuring_notes(tracker) + _step_notes(tracker),
    }
    if tracker.phases.sampler is not None:
        section["sampler"] = tracker.phases.sampler.to_dict()
    if tracker.phases.trace is not None:
        try:
            section["gpu_replay"] = gpu_replay_section(tracker.phases, chosen)
        except Exception as exc:  # noqa: BLE001 - the measured figures stand without the replay
            section["notes"].append(f"the GPU replay failed ({type(exc).__name__}: {exc}): no projection")
    if cuda:
        try:  # the card, for a report fed back as a projection's calibration (--calibrate)
            section["device_name"] = torch.cuda.get_device_name(tracker.device)
            section["device_capability"] = list(torch.cuda.get_device_capability(tracker.device))
        except (RuntimeError, AssertionError):  # a stand-in device in tests; torch without CUDA
            pass
    return section


def gpu_replay_section(phases: Any, described: StepJSON | None) -> dict[str, Any]:
    """The recorded steps replayed through the caching-allocator model, and how they were run.

    With the described step's batch size known, also that step replayed at other batch sizes.
    """
    settings = allocator_settings()
    expandable = settings["expandable_segments"]
    replay = replay_trace(phases.trace_initial, phases.trace, expandable=expandable)
    batch = batch_and_sequence(described)[0] if described is not None else None
    replay["by_batch"] = (
        replay_by_batch(phases.trace_initial, phases.trace, batch, described["index"], expandable) if batch else []
    )
    replay["allocator_settings"] = settings
    # The same with cuBLAS's workspaces allocated where the trace first ran a cuBLAS operator in
    # forward and in backward, one replay per workspace size a card can have.
    replay["with_workspaces"] = {
        str(ws): {
            "steps": replay_trace(phases.trace_initial, phases.trace, expandable=expandable, workspace=ws)["steps"],
            "by_batch": replay_by_batch(phases.trace_initial, phases.trace, batch, described["index"], expandable, ws)
            if batch
            else [],
        }
        for ws in WORKSPACE_SIZES
    }
    replay["autocast_dtypes"] = sorted(str(d).removeprefix("torch.") for d in phases.autocast_dtypes)
    replay["run_as_on_cuda"] = [
        "CUDA's autocast policy in autocast regions",
        "dropout through native_dropout (a bool mask, as CUDA's fused kernel keeps)",
        "attention with dropout through the flash kernel (CUDA's memory; no dropout in the measured steps)",
    ]
    swaps = phases.kernel_swaps
    replay["kernel_swaps"] = (
        {"dropout": swaps.dropout, "attention_without_dropout": swaps.attention_without_dropout} if swaps else {}
    )
    return replay


def _measuring_notes(tracker: StepTracker) -> list[str]:
    """What the tracker noted, and what this device and these options could not measure."""
    notes = list(tracker.notes)
    if tracker.forwards_without_backward:
        notes.append(
            f"{tracker.forwards_without_backward} forward(s) with gradients on but no backward (a shape check, a "
            "summary, a loss only printed, a model evaluated with gradients on) were left out of the steps"
        )
    if tracker.backward_passes_discarded:
        notes.append(
            f"{tracker.backward_passes_discarded} backward pass(es) whose gradients were cleared without an optimizer "
            "step (a GAN's discriminator, backpropagated through by the generator's loss) were left out of the "
            "steps: they train nothing (backward_passes_discarded)"
        )
    if tracker.phases.project:
        notes.append(
            "autocast regions ran CUDA's autocast policy, and dropout CUDA's fused kernel, while measuring (for the "
            "GPU projection): the categories are those of a CUDA step"
        )
        swaps = tracker.phases.kernel_swaps
        if swaps is not None and swaps.attention_without_dropout:
            notes.append(
                f"{swaps.attention_without_dropout} attention call(s) with dropout ran without it in the measured "
                "steps: CUDA's flash kernel keeps no attention weights, the CPU's math path would (the steps after "
                "are the script's own)"
            )
    if tracker.device.type != "cuda":
        if tracker.phases.live_peak:
            notes.append(CPU_UNAVAILABLE + "; the peak is the live-tensor counter's (opt-in dispatch tracking)")
        else:
            notes.append(
                CPU_UNAVAILABLE + "; 'other' and the phase peaks are null (--live-peak measures a live-tensor peak)"
            )
    else:
        notes.append(
            "phase 'seconds' are host time (CUDA runs kernels asynchronously, so the host sees launches); "
            "'gpu_seconds' is the device's time between CUDA events recorded at the phase boundaries"
        )
    if tracker.phases.device_clock.error:
        notes.append(tracker.phases.device_clock.error)
    if not tracker.phases.sample_interval:
        notes.append(
            "no sampler thread (--no-sampler, or sample_interval=None): "
            "host RSS and NVML were not sampled, so their peaks are null"
        )
    return notes


def _indices(steps: list[StepRecord]) -> str:
    """The steps' numbers, as a note lists them."""
    return ", ".join(str(s.index) for s in steps)


def _step_notes(tracker: StepTracker) -> list[str]:
    """What the measured steps were, where they are not plain training steps."""
    notes: list[str] = []
    steps = tracker.steps
    if not steps:
        if tracker.forwards_without_backward:
            notes.append("no training step was seen (no backward went through any of its forwards)")
        elif (params := tracker.parameters.shaped()) and not any(p.requires_grad for p in params):
            notes.append("no training step was seen (every parameter is frozen: requires_grad is False)")
        else:
            notes.append("no training step was seen (no forward with gradients enabled)")
    elif not any(s.complete for s in steps):
        notes.append(
            "no complete step (a forward and a backward that finished) was seen: did the script's forward or "
            "backward raise, or was its loss computed from other tensors than the model's output (a hook's "
            "features)?"
            if any(s.forwards for s in steps)
            else "no complete step (a forward and a backward that finished) was seen"
        )
    repeated = sum(s.forwards_repeated for s in steps)
    if repeated:
        notes.append(
            f"{repeated} of {sum(s.forwards for s in steps) + sum(s.forwards_left_out for s in steps)} forwards "
            "were taken as repeats of a forward measured in full before (the same input shapes, dtypes and "
            "arguments, training and autocast modes and trainable parameters, checked by the number of autograd "
            "nodes they and their loss made): their figures are that forward's, not read again tensor by tensor, "
            "which keeps measuring every step cheap (docs/limits.md, 'Repeated forwards'; --measure-every-forward "
            "or profile(reuse_repeats=False) measures each in full)"
        )
    unverified = [s for s in steps if s.repeats_unverified]
    if unverified:
        notes.append(
            f"a forward taken as a repeat made another autograd graph than the one measured (step(s) "
            f"{_indices(unverified)}: control flow that follows the data): its figures are "
            "the measured forward's, unverified, and the next forward of that kind was measured in full"
        )
    raised = [s for s in steps if s.repeats_raised]
    if raised:
        notes.append(
            f"{sum(s.repeats_raised for s in raised)} forward(s) begun as a repeat raised (step(s) "
            f"{_indices(raised)}): what they saved before the error is not known and is not "
            "counted (--measure-every-forward measures such a forward tensor by tensor)"
        )
    left_out = [s for s in steps if s.forwards_left_out]
    if left_out:
        notes.append(
            f"{sum(s.forwards_left_out for s in left_out)} forward(s) with gradients on whose output no backward "
            f"reached (step(s) {_indices(left_out)}: a probe such as `out = model(x)`, or a "
            "metric, whose output the script kept) were left out of those steps: what they saved "
            f"(up to {max(s.activations_left_out for s in left_out):,} bytes) stayed alive while the script held "
            "their output, and is not in 'activations' (activations_left_out)"
        )
    if any(s.checkpointing for s in steps):
        notes.append(
            "gradient checkpointing (of the trunk's blocks, or of the whole model): what is checkpointed keeps only "
            "its inputs and recomputes the rest in backward, so activations are far below a full forward's"
        )
    skipped = sum(s.optimizer_skipped for s in steps)
    if skipped:
        updated = any(s.optimizer_steps for s in steps)
        notes.append(
            f"{skipped} iteration(s) ended without an optimizer step after their gradients were cleared "
            "(what a GradScaler does when fp16 gradients overflow): measured, marked optimizer_skipped, "
            + (
                "and left out of the tables, estimates and fit"
                if updated
                else "and shown as they are, since no measured step updated the weights (more --steps may reach one)"
            )
        )
    if any(s.saves_after_forward_unseen for s in steps):
        notes.append(
            "saved-tensor hooks of the script's (save_on_cpu, a compressor, a checkpoint of the whole model) "
            "were active around the model: what "
            "was saved after its forward (a loss computed outside the model) went to them unseen and is not in "
            "'activations' (saves_after_forward_unseen); call the loss inside the model to have it counted"
        )
    history = tracker.optimizers.history
    if len(history) > 1:
        notes.append(
            "the script replaced the optimizer while steps were measured ("
            + ", then ".join(history)
            + "): each step counts the state of the one that stepped it"
        )
    failed = [s.index for s in steps if s.optimizer_failed]
    if failed:
        notes.append(
            f"optimizer.step() raised in step(s) {', '.join(map(str, failed))} (an out-of-memory error the script "
            "caught?): marked optimizer_failed, not counted toward the steps asked for, and left out of the "
            "tables, estimates and fit"
        )
    offloaded = max((s.activations_offloaded for s in steps), default=0)
    if offloaded:
        notes.append(
            f"the script's own saved-tensor hooks (save_on_cpu?) moved up to {offloaded:,} bytes of saved tensors "
            f"off {tracker.device}: they are in 'activations_offloaded', not in 'activations', which counts what "
            "backward holds on the device"
        )
    if any(s.complete for s in steps) and not any(s.optimizer_steps or s.optimizer_skipped for s in steps):
        name = tracker.optimizers.name
        held = "not measured" if name is None else f"{name}'s, counted as it stood"
        notes.append(
            "no optimizer step was seen (weights updated by hand, or the script ended before its first optimizer "
            f"step?): optimizer state {held}"
        )
    return notes
