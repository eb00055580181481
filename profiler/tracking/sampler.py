"""Sample process and device memory in the background while a training step runs.

Why a sampler next to the caching allocator's counters: ``torch.cuda``'s
statistics only see memory that PyTorch's caching allocator handed out. What
``nvidia-smi`` shows for a process is larger: the CUDA context (often
300-600 MiB, created on first CUDA use), cuBLAS/cuDNN/NCCL workspaces and
handles, memory from other allocators (custom kernels, Triton, NCCL buffers)
and the allocator's own fragmentation. An out-of-memory error happens against
the device total, so the figure that matters is the one NVML reports. Host
memory (RSS) matters too: data loaders, pinned buffers and CPU copies of
checkpoints live there.

What this module reads, and where each figure comes from:

* ``host_rss``: the resident set size psutil reports (``memory_info().rss``),
  read on Linux from ``/proc/self/statm`` kept open (about 1 us, where psutil
  takes 15-50 us; see ``host_rss.py``).
  USS is never polled: it walks the page tables and takes milliseconds.
* ``nvml_device_used``: memory used on the whole device, from
  ``nvmlDeviceGetMemoryInfo`` (~8 us). The v2 structure is preferred because
  its ``used`` excludes memory the driver reserves for itself; v1's ``used``
  counts that reservation, so the two differ by a constant of a few hundred
  MiB. This is every process on the device, not only ours.
* ``nvml_process_used``: our process's entry in
  ``nvmlDeviceGetComputeRunningProcesses`` (~40 us). Inside a container the
  process list carries host PIDs, so ``os.getpid()`` is usually not there; the
  figure is then unavailable and the honest substitute is ``device used minus
  baseline`` (device used when the sampler started), provided nothing else
  runs on the device.

Anything that was not measured is ``None`` and ``sources`` says why; no
figure is ever estimated and reported as a measurement.

The sampler is a daemon thread that waits on a ``threading.Event`` between
ticks, so ``stop()`` wakes it at once instead of waiting out the interval.
NVML calls are ctypes calls that release the GIL, so sampling costs the
training thread little. ``mark(label)`` samples synchronously on the calling
thread, so a phase shorter than the interval still has at least one sample.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from .host_rss import HostRss, rss_source
from .nvml import find_handle

__all__ = ["Sample", "MemorySampler"]

# NVML's "not available" marker for usedGpuMemory (pynvml usually maps it to None).
_NVML_VALUE_NOT_AVAILABLE = (1 << 64) - 1

_SOURCE_DEVICE_V2 = "nvml memory_info v2"
_SOURCE_DEVICE_V1 = "nvml memory_info v1"
_SOURCE_PROCESS = "nvml compute processes"
_PID_NOT_VISIBLE = "unavailable: pid not visible to NVML (container?); use device used minus baseline"
_PROCESS_VALUE_NOT_AVAILABLE = (
    "unavailable: NVML lists this pid but its usedGpuMemory is not available (Windows WDDM or insufficient permissions)"
)

_FIELDS = ("host_rss", "nvml_device_used", "nvml_process_used")


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading. Device and process figures are None when not measured."""

    t: float  # seconds since the sampler started (time.perf_counter)
    host_rss: int  # bytes
    nvml_device_used: int | None  # bytes used on the whole device
    nvml_process_used: int | None  # bytes NVML charges to this process
    label: str | None  # phase label set by mark() when the sample was taken


class _Peaks:
    """Running maxima of the three figures; None until a figure is measured."""

    __slots__ = ("host_rss", "nvml_device_used", "nvml_process_used")

    def __init__(self) -> None:
        self.host_rss: int | None = None
        self.nvml_device_used: int | None = None
        self.nvml_process_used: int | None = None

    def update(self, s: Sample) -> None:
        for name in _FIELDS:
            value = getattr(s, name)
            if value is not None:
                current = getattr(self, name)
                if current is None or value > current:
                    setattr(self, name, value)

    def as_dict(self) -> dict[str, int | None]:
        return {name: getattr(self, name) for name in _FIELDS}


class MemorySampler:
    """Background sampler of host RSS and NVML device/process memory.

    Use as a context manager or with ``start()``/``stop()``::

        with MemorySampler("cuda:0") as s:
            s.mark("forward"); loss = model(x)
            s.mark("backward"); loss.backward()
        s.peaks_by_label()["backward"]["nvml_device_used"]

    NVML is used only for a CUDA device: an explicit ``cuda`` device, or, with
    ``device=None``, the current CUDA device if CUDA is already initialised.
    The NVML handle is found by UUID, because ``CUDA_VISIBLE_DEVICES``
    renumbers devices and NVML indices are physical (see ``nvml.find_handle``);
    ``sources["device_handle"]`` says how the device was found.

    The process list is read on every tick, not every few ticks: at the
    default 10 ms interval it costs about 0.4% of one core, and a
    per-process peak that fell between polls would be too low with nothing
    to show it.

    Timeline: at most ``max_samples`` samples are kept. When the cap is
    passed, every other kept sample is dropped and from then on only every
    ``stride``-th sample is kept (stride doubles each time), so the kept
    samples stay evenly spread over the run. Peaks, overall and per label,
    are computed over every sample taken, kept or not, so they stay exact.

    Restarting: ``start()`` after ``stop()`` begins a fresh run (timeline,
    peaks, baseline and sources are reset); read the results of a run before
    starting the next. ``start()`` on a running sampler raises RuntimeError.
    """

    def __init__(
        self,
        device: torch.device | str | None = None,
        interval: float = 0.01,
        keep_timeline: bool = True,
        max_samples: int = 100_000,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval!r}")
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples!r}")
        self.interval = float(interval)
        self.keep_timeline = keep_timeline
        self.max_samples = int(max_samples)
        self.device: torch.device | None = self._resolve_device(device)
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._running = False
        self._nvml: ModuleType | None = None  # set only while we hold an nvmlInit
        self._reset()

    # ------------------------------------------------------------------ setup

    @staticmethod
    def _resolve_device(device: torch.device | str | None) -> torch.device | None:
        """The device to watch; None means host only.

        With no device given, the current CUDA device is used only if CUDA is
        already initialised: we never initialise CUDA just to pick a device.
        """
        if device is not None:
            return torch.device(device)
        try:
            if torch.cuda.is_initialized():
                return torch.device("cuda", torch.cuda.current_device())
        except Exception:
            pass
        return None

    def _reset(self) -> None:
        """Forget the previous run (fresh run on every start)."""
        if getattr(self, "_rss", None) is not None:
            self._rss.close()
        self._timeline: list[Sample] = []
        self._stride = 1
        self._n_samples = 0
        self._peaks = _Peaks()
        self._label_peaks: dict[str, _Peaks] = {}
        self._label: str | None = None
        self._baseline: Sample | None = None
        self._t0 = time.perf_counter()
        self._rss: HostRss | None = None
        self._pid = os.getpid()
        self._handle: Any = None
        self._mem_version: int | None = None  # 2, 1, or None (device figure unavailable)
        self._device_source = "unavailable: sampler not started"
        self._handle_source: str | None = None
        self._process_enabled = False
        self._processes_query: Any = None  # the pynvml function that lists compute processes
        self._process_reason: str | None = "unavailable: sampler not started"
        self._pid_measured = False
        self._pid_without_value = False
        self._read_errors: dict[str, tuple[int, str]] = {}

    def _open_nvml(self) -> None:
        """Initialise NVML and find our device; on failure record why and carry on."""
        dev = self.device
        if dev is None:
            reason = "unavailable: no device given and CUDA not initialised"
            self._device_source = self._process_reason = reason
            return
        if dev.type != "cuda":
            reason = f"unavailable: device is {dev.type}; NVML applies to CUDA devices only"
            self._device_source = self._process_reason = reason
            return
        try:
            import pynvml  # noqa: PLC0415  (optional at run time; tests inject a fake)
        except Exception as exc:
            reason = f"unavailable: import pynvml failed: {exc}"
            self._device_source = self._process_reason = reason
            return
        try:
            pynvml.nvmlInit()
        except Exception as exc:
            reason = f"unavailable: nvmlInit failed: {exc}"
            self._device_source = self._process_reason = reason
            return
        self._nvml = pynvml  # from here on stop() owes one nvmlShutdown

        index = dev.index if dev.index is not None else self._current_cuda_index()
        try:
            self._handle, self._handle_source = find_handle(pynvml, index)
        except Exception as exc:
            reason = f"unavailable: no NVML handle for {dev}: {exc}"
            self._device_source = self._process_reason = reason
            self._close_nvml()
            return
        self._probe_memory_info(pynvml)
        self._probe_processes(pynvml)

    @staticmethod
    def _current_cuda_index() -> int:
        try:
            if torch.cuda.is_initialized():
                return torch.cuda.current_device()
        except Exception:
            pass
        return 0

    def _probe_memory_info(self, nv: ModuleType) -> None:
        """Pick memory info v2 if the driver and pynvml support it, else v1."""
        nvml_error = getattr(nv, "NVMLError", Exception)
        try:
            nv.nvmlDeviceGetMemoryInfo(self._handle, version=nv.nvmlMemory_v2)
            self._mem_version, self._device_source = 2, _SOURCE_DEVICE_V2
            return
        except (nvml_error, TypeError, AttributeError):
            pass
        try:
            nv.nvmlDeviceGetMemoryInfo(self._handle)
            self._mem_version, self._device_source = 1, _SOURCE_DEVICE_V1
        except Exception as exc:
            self._device_source = f"unavailable: nvmlDeviceGetMemoryInfo failed: {exc}"

    def _probe_processes(self, nv: ModuleType) -> None:
        """Pick the process query: the newest, else ``_v2`` (drivers older than the binding's v3)."""
        failures = []
        for name in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetComputeRunningProcesses_v2"):
            query = getattr(nv, name, None)
            if query is None:
                continue
            try:
                query(self._handle)
            except Exception as exc:
                failures.append(f"{name} failed: {exc}")
                continue
            self._processes_query = query
            self._process_enabled = True
            self._process_reason = None
            return
        self._process_reason = "unavailable: " + "; ".join(failures or ["no process query in pynvml"])

    def _close_nvml(self) -> None:
        """Balance our nvmlInit exactly once (NVML counts init/shutdown pairs)."""
        nv, self._nvml = self._nvml, None
        if nv is not None:
            try:
                nv.nvmlShutdown()
            except Exception:  # nothing useful to do if the driver went away
                pass

    # -------------------------------------------------------------- lifecycle

    def start(self) -> MemorySampler:
        """Start a fresh run: take the baseline sample, then start the thread."""
        if self._running:
            raise RuntimeError("MemorySampler is already running; call stop() first")
        self._reset()
        try:
            self._rss = HostRss()
            self._open_nvml()
            self._t0 = time.perf_counter()
            self._running = True
            self._baseline = self._take()
            self._stop_event = threading.Event()
            self._thread = threading.Thread(target=self._run, name="profiler-memory-sampler", daemon=True)
            self._thread.start()
        except BaseException:
            self._running = False
            self._close_nvml()
            raise
        return self

    def stop(self) -> None:
        """Stop the thread, take a final sample, release NVML. Safe to call twice."""
        try:
            self._stop_event.set()
            thread = self._thread
            if thread is not None and thread is not threading.current_thread():
                thread.join()
            if self._running:
                self._running = False
                self._take()
        finally:
            self._running = False
            self._close_nvml()
            if self._rss is not None:
                self._rss.close()  # (its source stays readable)

    def __enter__(self) -> MemorySampler:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self._take()
            except Exception as exc:  # keep sampling; the error shows in sources
                self._note_error("sampler thread", exc)

    # --------------------------------------------------------------- sampling

    def mark(self, label: str) -> Sample | None:
        """Start phase ``label``: later samples carry it; the first time, one is taken right now.

        A phase shorter than the interval still gets a sample. A label marked
        again (the forward of each of an LBFGS step's twenty closure
        evaluations) has one already: it is only set, which keeps the marks of
        a step cheap however many micro-batches it has.
        """
        if not self._running:
            raise RuntimeError("MemorySampler is not running; call start() first")
        if label in self._label_peaks:
            # (One store, atomic under the GIL: a tick of the thread reads the old label or the new.)
            self._label = label
            return None
        with self._lock:
            self._label = label
            return self._take_locked()

    def sample_now(self) -> Sample:
        """Take one sample on the calling thread (it also goes into the timeline)."""
        if not self._running:
            raise RuntimeError("MemorySampler is not running; call start() first")
        return self._take()

    def _take(self) -> Sample:
        with self._lock:
            return self._take_locked()

    def _take_locked(self) -> Sample:
        t = time.perf_counter() - self._t0
        assert self._rss is not None
        rss = self._rss.read()
        sample = Sample(t, rss, self._read_device(), self._read_process(), self._label)
        self._record(sample)
        return sample

    def _note_error(self, what: str, exc: BaseException) -> None:
        count, _ = self._read_errors.get(what, (0, ""))
        self._read_errors[what] = (count + 1, f"{type(exc).__name__}: {exc}")

    def _read_device(self) -> int | None:
        nv = self._nvml
        if nv is None or self._mem_version is None:
            return None
        try:
            if self._mem_version == 2:
                info = nv.nvmlDeviceGetMemoryInfo(self._handle, version=nv.nvmlMemory_v2)
            else:
                info = nv.nvmlDeviceGetMemoryInfo(self._handle)
            return int(info.used)
        except Exception as exc:
            self._note_error("device", exc)
            return None

    def _read_process(self) -> int | None:
        nv = self._nvml
        if nv is None or not self._process_enabled:
            return None
        try:
            processes = self._processes_query(self._handle)
        except Exception as exc:
            self._note_error("process", exc)
            return None
        total: int | None = None
        for p in processes:
            if getattr(p, "pid", None) != self._pid:
                continue
            used = getattr(p, "usedGpuMemory", None)
            if used is None or used >= _NVML_VALUE_NOT_AVAILABLE:
                self._pid_without_value = True
                continue
            total = (total or 0) + int(used)  # one entry per context; MIG may list several
        if total is not None:
            self._pid_measured = True
        return total

    def _record(self, sample: Sample) -> None:
        """Update peaks with every sample; keep every ``stride``-th in the timeline."""
        index = self._n_samples
        self._n_samples += 1
        self._peaks.update(sample)
        if sample.label is not None:
            peaks = self._label_peaks.get(sample.label)
            if peaks is None:  # (not setdefault: that makes a _Peaks at every sample)
                peaks = self._label_peaks[sample.label] = _Peaks()
            peaks.update(sample)
        if not self.keep_timeline or index % self._stride:
            return
        self._timeline.append(sample)
        if len(self._timeline) > self.max_samples:
            # Kept indices are multiples of stride; [::2] leaves multiples of 2*stride.
            self._timeline = self._timeline[::2]
            self._stride *= 2

    # ---------------------------------------------------------------- results

    @property
    def started_at(self) -> float:
        """``time.perf_counter()`` at start: add it to a sample's ``t`` for a common clock."""
        return self._t0

    @property
    def running(self) -> bool:
        return self._running

    @property
    def timeline(self) -> list[Sample]:
        """Kept samples in time order (thinned evenly past ``max_samples``)."""
        with self._lock:
            return list(self._timeline)

    @property
    def n_samples(self) -> int:
        """Samples taken in this run, including those thinned out of the timeline."""
        return self._n_samples

    @property
    def stride(self) -> int:
        """Every ``stride``-th sample taken is kept in the timeline."""
        return self._stride

    @property
    def peak_host_rss(self) -> int | None:
        return self._peaks.host_rss

    @property
    def peak_nvml_device_used(self) -> int | None:
        return self._peaks.nvml_device_used

    @property
    def peak_nvml_process_used(self) -> int | None:
        return self._peaks.nvml_process_used

    @property
    def baseline_host_rss(self) -> int | None:
        """Host RSS when the sampler started."""
        return None if self._baseline is None else self._baseline.host_rss

    @property
    def baseline_nvml_device_used(self) -> int | None:
        """Device memory used when the sampler started (all processes).

        ``peak_nvml_device_used - baseline_nvml_device_used`` is what this run
        added, CUDA context included if it was created after start(), as long
        as nothing else ran on the device.
        """
        return None if self._baseline is None else self._baseline.nvml_device_used

    def peaks_by_label(self) -> dict[str, dict[str, int | None]]:
        """Peak of each figure over the samples taken under each ``mark()`` label.

        Samples taken before the first ``mark()`` have no label and appear only
        in the overall peaks.
        """
        with self._lock:
            return {label: p.as_dict() for label, p in self._label_peaks.items()}

    @property
    def sources(self) -> dict[str, str]:
        """Where each figure came from, or ``"unavailable: <reason>"``."""
        if self._process_reason is not None:
            process = self._process_reason
        elif self._pid_measured:
            process = _SOURCE_PROCESS
        elif self._pid_without_value:
            process = _PROCESS_VALUE_NOT_AVAILABLE
        else:
            process = _PID_NOT_VISIBLE
        host = self._rss.source if self._rss is not None else rss_source()
        out = {"host": host, "device": self._device_source, "process": process}
        if self._handle_source is not None:
            out["device_handle"] = self._handle_source
        if self._read_errors:
            out["read_errors"] = "; ".join(
                f"{what}: {count} failed (last: {last})" for what, (count, last) in sorted(self._read_errors.items())
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary; the timeline is stored as columns."""
        with self._lock:
            kept = list(self._timeline)
            label_peaks = {label: p.as_dict() for label, p in self._label_peaks.items()}
            peaks = self._peaks.as_dict()
            n_samples, stride = self._n_samples, self._stride
        out: dict[str, Any] = {
            "device": None if self.device is None else str(self.device),
            "interval": self.interval,
            "sources": self.sources,
            "peaks": peaks,
            "peaks_by_label": label_peaks,
            "baseline": {
                "host_rss": self.baseline_host_rss,
                "nvml_device_used": self.baseline_nvml_device_used,
            },
            "n_samples": n_samples,
            "n_kept": len(kept),
            "stride": stride,
            "timeline": {
                "t": [s.t for s in kept],
                "host_rss": [s.host_rss for s in kept],
                "nvml_device_used": [s.nvml_device_used for s in kept],
                "nvml_process_used": [s.nvml_process_used for s in kept],
                "label": [s.label for s in kept],
            },
        }
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())
