"""What only a GPU has, read from one real GPU step: the calibration of a projection.

A CPU run cannot see the CUDA context, the kernels and library handles a
process loads, or what the driver holds on the device before the process
starts. NVML sees all of it, and the allocator's counters see the rest, so one
GPU step measured with both gives the device memory beyond the allocator's
reserved memory: ``nvml used - memory_reserved``.

The package ships one such step (``profiler/calibration/gpu_h100_seed_fp16_b8.json``:
the seed model's fp16 AMP step at batch 8 x 512 on an H100, measured with
PyTorch's own counters and NVML, without this tool). ``--calibrate REPORT``
replaces it with a JSON report of this tool from the user's own GPU, or a file
in the same format as the shipped one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from ..errors import ProfilerError
from .fit import CARD_CAPABILITY
from .steps import described_step

__all__ = ["BUILT_IN", "Calibration", "load_calibration"]

BUILT_IN = "gpu_h100_seed_fp16_b8.json"

# Compute capability of GPUs outside the fit table, by the names they report
# (torch.cuda.get_device_name); the table's own cards are in fit.CARD_CAPABILITY.
_OTHER_CAPABILITY = {"A10": (8, 6), "L40": (8, 9), "B200": (10, 0)}


@dataclass(frozen=True)
class Calibration:
    """The device memory a GPU step used beyond the allocator's reserved memory, and where it was measured."""

    source: str
    device: str
    capability: tuple[int, int] | None
    non_allocator: int  # NVML device used - memory_reserved, at the same point of a steady step
    figures: dict[str, Any] = field(default_factory=dict)  # what it was computed from

    @property
    def card(self) -> str | None:
        """The fit table's card it was measured on, if it is one of them."""
        return card_of(self.device)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "device": self.device,
            "card": self.card,
            "compute_capability": list(self.capability) if self.capability else None,
            "non_allocator_bytes": self.non_allocator,
            "figures": self.figures,
        }


def card_of(name: str) -> str | None:
    """The fit table's card a GPU's reported name is (``NVIDIA H100 80GB HBM3`` is ``H100-80GB``), if any."""
    upper = name.upper()
    for key, card in (("H200", "H200"), ("H100", "H100-80GB"), ("A10G", "A10G"), ("L4", "L4"), ("T4", "T4")):
        if key in upper and not (key == "L4" and "L40" in upper):
            return card
    if "A100" in upper:
        return "A100-40GB" if "40GB" in upper else "A100-80GB"
    if "V100" in upper:
        return "V100-32GB" if "32GB" in upper else "V100-16GB"
    return None


def capability_of(name: str) -> tuple[int, int] | None:
    """The compute capability of a card of the fit table or of a GPU's reported name, if known."""
    card = name if name in CARD_CAPABILITY else card_of(name)
    if card is not None:
        return CARD_CAPABILITY[card]
    upper = name.upper()
    return next((cap for key, cap in _OTHER_CAPABILITY.items() if key in upper), None)


def load_calibration(path: str | None = None, option: str = "--calibrate") -> Calibration:
    """The shipped calibration point, or the one in ``path``; a one-line error for a file that is not one.

    ``option``: how the caller names the path in errors (``--calibrate``, or ``calibrate=`` for the API).
    """
    if path is None:
        text = resources.files("profiler.calibration").joinpath(BUILT_IN).read_text(encoding="utf-8")
        return _from_step_file(json.loads(text), f"built in: profiler/calibration/{BUILT_IN}")
    where = f"{option}{path!r}" if option.endswith("=") else f"{option} {path}"
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise ProfilerError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise ProfilerError(f"{where}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, dict) and isinstance(data.get("steps"), list) and "device" in data:
        calibration = _from_step_file(data, path, where)
    elif isinstance(data, dict) and isinstance(data.get("models"), list):
        calibration = _from_report(data, path, where)
    else:
        raise ProfilerError(f"{where}: neither a report of this tool nor a calibration file")
    if calibration.non_allocator < 0:
        raise ProfilerError(
            f"{where}: its NVML device figure is below the allocator's reserved memory "
            f"({calibration.non_allocator:,} B beyond it): not a measurement a projection can use"
        )
    return calibration


def _from_step_file(data: dict, source: str, where: str = "") -> Calibration:
    """A file like the shipped one: per step, ``reserved`` and NVML's ``nvml_used_end`` (device-wide)."""
    try:
        last = data["steps"][-1]
        non_allocator = int(last["nvml_used_end"]) - int(last["reserved"])
        device = str(data["device"])
    except (KeyError, IndexError, TypeError, ValueError):
        raise ProfilerError(
            f"{where or source}: a calibration file needs steps with 'reserved' and 'nvml_used_end', and 'device'"
        ) from None
    figures = {
        "nvml_used_end": last["nvml_used_end"],
        "reserved": last["reserved"],
        "nvml_used_idle_before_process": data.get("nvml_used_idle_before_process"),
        "nvml_used_after_cuda_init": data.get("nvml_used_after_cuda_init"),
        "torch": data.get("torch"),
    }
    return Calibration(source, device, capability_of(device), non_allocator, figures)


def _from_report(data: dict, source: str, where: str) -> Calibration:
    """A JSON report of this tool from a GPU run: NVML's device-wide peak beside the allocator's reserved peak."""
    for model in data["models"]:
        memory = model.get("memory") or {}
        step = described_step(memory.get("steps") or [])
        if step is None or not str(memory.get("device", "")).startswith("cuda"):
            continue
        used, reserved = step.get("nvml_device_used_peak"), step.get("reserved")
        if used is None or reserved is None:
            raise ProfilerError(
                f"{where}: its step has no NVML device figure (run it with the sampler on, on a GPU whose NVML works)"
            )
        cap = memory.get("device_capability")
        device = memory.get("device_name") or memory.get("device", "cuda")
        capability = tuple(cap) if cap else capability_of(device)
        figures = {"nvml_device_used_peak": used, "reserved": reserved, "model": model.get("name")}
        return Calibration(source, device, capability, int(used) - int(reserved), figures)  # type: ignore[arg-type]
    raise ProfilerError(f"{where}: no model in it was measured on a GPU")
