"""Tests for profiler.sampler: a real host-only run, and NVML through a fake module."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import types
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from profiler.tracking import nvml as nvml_mod
from profiler.tracking import sampler as sampler_mod
from profiler.tracking.host_rss import rss_source
from profiler.tracking.sampler import MemorySampler, Sample

MiB = 1 << 20
PID = os.getpid()
SLOW = 60.0  # an interval so long that the thread never ticks: only explicit samples
REAL_TORCH_UUID = nvml_mod.torch_device_uuid  # before the autouse fixture replaces it


# --------------------------------------------------------------------- fakes


class FakeNVMLError(Exception):
    pass


class FakeHandle:
    def __init__(
        self,
        uuid: str,
        used_v2: int | Callable[[], int] = 100 * MiB,
        used_v1: int = 400 * MiB,
        processes: list[tuple[int, int | None]] | None = None,
        migs: list[FakeHandle] | None = None,
    ) -> None:
        self.uuid = uuid
        self._used_v2 = used_v2
        self.used_v1 = used_v1
        self.processes = processes if processes is not None else []
        self.migs = migs or []

    def used_v2(self) -> int:
        return self._used_v2() if callable(self._used_v2) else self._used_v2


class FakeNVML:
    """Stands in for pynvml; counts init/shutdown and can fail in chosen ways."""

    nvmlMemory_v2 = 0x02000028

    def __init__(
        self,
        gpus: list[FakeHandle],
        v2: str = "ok",  # "ok", "nvml_error" (old driver), "type_error" (old pynvml)
        init_error: str | None = None,
        process_error: str | None = None,
    ) -> None:
        self.gpus = gpus
        self.v2 = v2
        self.init_error = init_error
        self.process_error = process_error
        self.inits = 0
        self.shutdowns = 0
        self.on_shutdown: Callable[[], None] | None = None

    def module(self) -> types.ModuleType:
        m = types.ModuleType("pynvml")
        m.NVMLError = FakeNVMLError
        m.nvmlMemory_v2 = self.nvmlMemory_v2
        for name in dir(self):
            if name.startswith("nvml") and callable(getattr(self, name)):
                setattr(m, name, getattr(self, name))
        return m

    def nvmlInit(self) -> None:
        if self.init_error:
            raise FakeNVMLError(self.init_error)
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1
        if self.on_shutdown is not None:
            self.on_shutdown()

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeHandle:
        return self.gpus[i]

    def nvmlDeviceGetUUID(self, h: FakeHandle) -> str:
        return h.uuid

    def nvmlDeviceGetMigMode(self, h: FakeHandle) -> list[int]:
        return [1 if h.migs else 0, 0]

    def nvmlDeviceGetMaxMigDeviceCount(self, h: FakeHandle) -> int:
        return len(h.migs) + 1  # one empty slot, which NVML reports as an error

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: FakeHandle, j: int) -> FakeHandle:
        if j >= len(h.migs):
            raise FakeNVMLError("Not Found")
        return h.migs[j]

    def nvmlDeviceGetMemoryInfo(self, h: FakeHandle, version: int | None = None) -> Any:
        if version is not None:
            if self.v2 == "nvml_error":
                raise FakeNVMLError("Function Not Found")
            if self.v2 == "type_error":
                raise TypeError("nvmlDeviceGetMemoryInfo() got an unexpected keyword 'version'")
            return SimpleNamespace(used=h.used_v2(), total=80 << 30)
        return SimpleNamespace(used=h.used_v1, total=80 << 30)

    def nvmlDeviceGetComputeRunningProcesses(self, h: FakeHandle) -> list[Any]:
        if self.process_error:
            raise FakeNVMLError(self.process_error)
        return [SimpleNamespace(pid=p, usedGpuMemory=u) for p, u in h.processes]


@pytest.fixture(autouse=True)
def _no_cuda_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests decide torch's UUID and CUDA_VISIBLE_DEVICES themselves."""
    monkeypatch.setattr(nvml_mod, "torch_device_uuid", lambda index: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def install(monkeypatch: pytest.MonkeyPatch, fake: FakeNVML) -> FakeNVML:
    monkeypatch.setitem(sys.modules, "pynvml", fake.module())
    return fake


# ------------------------------------------------------------ real, host only


def test_real_cpu_run_sees_host_rss_grow_and_joins_thread() -> None:
    with MemorySampler("cpu", interval=0.002) as s:
        start_rss = s.baseline_host_rss
        assert start_rss is not None and start_rss > 0
        s.mark("alloc")
        buf = np.ones(64 * MiB, dtype=np.uint8)  # written, so its pages are resident
        s.sample_now()
        # wait (bounded) for the background thread to see the buffer on its own
        deadline = time.perf_counter() + 1.0
        while time.perf_counter() < deadline:
            alloc = [x for x in s.timeline if x.label == "alloc"]
            if len(alloc) >= 3:
                break
            time.sleep(0.002)
        del buf
        s.mark("freed")
    assert s._thread is not None and not s._thread.is_alive()
    assert not s.running
    assert len([x for x in s.timeline if x.label == "alloc"]) >= 3  # mark, sample_now, tick
    peaks = s.peaks_by_label()
    assert peaks["alloc"]["host_rss"] - start_rss >= 48 * MiB
    assert peaks["freed"]["host_rss"] < peaks["alloc"]["host_rss"] - 32 * MiB
    assert s.peak_host_rss >= start_rss
    assert s.peak_host_rss == max(x.host_rss for x in s.timeline)
    ts = [x.t for x in s.timeline]
    assert ts == sorted(ts) and ts[0] >= 0
    assert s.peak_nvml_device_used is None and s.peak_nvml_process_used is None
    assert s.baseline_nvml_device_used is None
    src = s.sources
    assert src["host"] == rss_source()
    assert src["device"].startswith("unavailable: device is cpu")
    assert src["process"].startswith("unavailable: device is cpu")
    json.dumps(s.to_dict())


def test_no_device_and_cuda_not_initialised_is_host_only() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("CUDA is initialised here")
    with MemorySampler() as s:
        pass
    assert s.device is None
    assert s.sources["device"] == "unavailable: no device given and CUDA not initialised"
    assert s.peak_host_rss is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_real_nvml_unavailable_on_this_machine_has_a_reason() -> None:
    with MemorySampler("cuda:0", interval=0.005) as s:
        s.mark("step")
    assert s.peak_nvml_device_used is None
    assert s.peak_nvml_process_used is None
    assert s.baseline_nvml_device_used is None
    reason = s.sources["device"]
    assert reason.startswith("unavailable: ") and len(reason) > len("unavailable: ")
    assert s.sources["process"].startswith("unavailable: ")
    assert s.peaks_by_label()["step"]["nvml_device_used"] is None
    assert not s._thread.is_alive()


# ---------------------------------------------------------------- fake NVML


def test_memory_info_v2_is_preferred(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, FakeNVML([FakeHandle("GPU-aaaa", used_v2=100 * MiB, used_v1=400 * MiB)]))
    with MemorySampler("cuda:0", interval=SLOW) as s:
        pass
    assert s.sources["device"] == "nvml memory_info v2"
    assert s.peak_nvml_device_used == 100 * MiB
    assert s.baseline_nvml_device_used == 100 * MiB


@pytest.mark.parametrize("failure", ["nvml_error", "type_error"])
def test_memory_info_falls_back_to_v1(monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    fake = install(
        monkeypatch,
        FakeNVML([FakeHandle("GPU-aaaa", used_v2=100 * MiB, used_v1=400 * MiB)], v2=failure),
    )
    with MemorySampler("cuda:0", interval=SLOW) as s:
        s.sample_now()
    assert s.sources["device"] == "nvml memory_info v1"
    assert s.peak_nvml_device_used == 400 * MiB
    assert all(x.nvml_device_used == 400 * MiB for x in s.timeline)
    assert "read_errors" not in s.sources
    assert fake.inits == 1 and fake.shutdowns == 1


def test_process_figure_when_pid_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    procs = [(PID + 1, 999 * MiB), (PID, 300 * MiB)]
    install(monkeypatch, FakeNVML([FakeHandle("GPU-aaaa", processes=procs)]))
    with MemorySampler("cuda:0", interval=SLOW) as s:
        procs[1] = (PID, 350 * MiB)
        s.mark("fwd")
    assert s.sources["process"] == "nvml compute processes"
    assert s.peak_nvml_process_used == 350 * MiB  # ours, not the other process's 999
    assert s.timeline[0].nvml_process_used == 300 * MiB
    assert s.peaks_by_label()["fwd"]["nvml_process_used"] == 350 * MiB


def test_pid_not_visible_is_stated_not_guessed(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, FakeNVML([FakeHandle("GPU-aaaa", processes=[(PID + 7, 500 * MiB)])]))
    with MemorySampler("cuda:0", interval=SLOW) as s:
        s.sample_now()
    assert s.peak_nvml_process_used is None
    assert all(x.nvml_process_used is None for x in s.timeline)
    assert s.sources["process"] == ("unavailable: pid not visible to NVML (container?); use device used minus baseline")
    assert s.peak_nvml_device_used == 100 * MiB  # the device figure still works


def test_used_gpu_memory_none_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, FakeNVML([FakeHandle("GPU-aaaa", processes=[(PID, None)])]))
    with MemorySampler("cuda:0", interval=SLOW) as s:
        s.sample_now()
    assert s.peak_nvml_process_used is None
    assert s.sources["process"].startswith("unavailable: NVML lists this pid but")


def test_process_list_error_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, FakeNVML([FakeHandle("GPU-aaaa")], process_error="No Permission"))
    with MemorySampler("cuda:0", interval=SLOW) as s:
        pass
    assert s.peak_nvml_process_used is None
    assert s.sources["process"].startswith("unavailable: nvmlDeviceGetComputeRunningProcesses")
    assert "No Permission" in s.sources["process"]


def test_nvml_init_failure_is_reported_and_not_shut_down(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install(monkeypatch, FakeNVML([], init_error="Driver Not Loaded"))
    with MemorySampler("cuda:0", interval=SLOW) as s:
        s.mark("x")
    assert s.sources["device"] == "unavailable: nvmlInit failed: Driver Not Loaded"
    assert s.sources["process"] == "unavailable: nvmlInit failed: Driver Not Loaded"
    assert s.peak_nvml_device_used is None
    assert fake.shutdowns == 0
    assert s.peak_host_rss is not None


def test_import_failure_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise
    with MemorySampler("cuda:0", interval=SLOW) as s:
        pass
    assert s.sources["device"].startswith("unavailable: import pynvml failed")


def test_shutdown_once_after_join_even_when_the_block_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = install(monkeypatch, FakeNVML([FakeHandle("GPU-aaaa")]))
    s = MemorySampler("cuda:0", interval=0.001)
    alive_at_shutdown: list[bool] = []
    samples_at_shutdown: list[int] = []

    def on_shutdown() -> None:
        alive_at_shutdown.append(s._thread is not None and s._thread.is_alive())
        samples_at_shutdown.append(s.n_samples)

    fake.on_shutdown = on_shutdown
    with pytest.raises(ZeroDivisionError):
        with s:
            s.mark("boom")
            time.sleep(0.01)
            1 / 0  # noqa: B018
    assert fake.inits == 1
    assert fake.shutdowns == 1
    assert alive_at_shutdown == [False]
    assert samples_at_shutdown == [s.n_samples]  # final sample was taken before shutdown
    assert s.timeline[-1].label == "boom"
    s.stop()  # idempotent
    s.stop()
    assert fake.shutdowns == 1
    assert s.n_samples == samples_at_shutdown[0]


def test_stop_without_start_and_after_failed_start(monkeypatch: pytest.MonkeyPatch) -> None:
    MemorySampler("cpu").stop()  # never started: nothing to do, no error

    fake = install(monkeypatch, FakeNVML([FakeHandle("GPU-aaaa")]))
    s = MemorySampler("cuda:0", interval=SLOW)

    def broken_thread(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(sampler_mod.threading, "Thread", broken_thread)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        s.start()
    assert fake.inits == 1 and fake.shutdowns == 1  # start released what it took
    assert not s.running
    s.stop()
    assert fake.shutdowns == 1


def test_restart_is_a_fresh_run_and_double_start_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install(monkeypatch, FakeNVML([FakeHandle("GPU-aaaa")]))
    s = MemorySampler("cuda:0", interval=SLOW)
    with pytest.raises(RuntimeError, match="not running"):
        s.mark("too early")
    s.start()
    with pytest.raises(RuntimeError, match="already running"):
        s.start()
    s.mark("first")
    for _ in range(5):
        s.sample_now()
    s.stop()
    assert s.n_samples == 8  # baseline + mark + 5 + final
    first_thread = s._thread
    s.start()
    assert s.n_samples == 1 and s.peaks_by_label() == {}
    assert s._thread is not first_thread and s._thread.is_alive()
    s.stop()
    assert s.n_samples == 2
    assert fake.inits == 2 and fake.shutdowns == 2


# ------------------------------------------------------------- UUID mapping


def two_gpus() -> list[FakeHandle]:
    return [
        FakeHandle("GPU-aaaaaaaa-1111-2222-3333-444444444444", used_v2=10 * MiB),
        FakeHandle("GPU-bbbbbbbb-1111-2222-3333-444444444444", used_v2=20 * MiB),
    ]


def test_uuid_maps_torch_index_to_the_right_nvml_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # As with CUDA_VISIBLE_DEVICES=1: torch's cuda:0 is NVML's device 1.
    install(monkeypatch, FakeNVML(two_gpus()))
    monkeypatch.setattr(
        nvml_mod,
        "torch_device_uuid",
        lambda index: {0: "BBBBBBBB-1111-2222-3333-444444444444"}.get(index),
    )
    with MemorySampler(torch.device("cuda", 0), interval=SLOW) as s:
        pass
    assert s.peak_nvml_device_used == 20 * MiB
    assert s.sources["device_handle"] == ("uuid GPU-bbbbbbbb-1111-2222-3333-444444444444 (torch device properties)")


def test_a_gpu_we_may_not_query_is_skipped_in_the_uuid_search(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install(monkeypatch, FakeNVML(two_gpus()))
    by_index = fake.nvmlDeviceGetHandleByIndex

    def refuse_the_first(i: int) -> FakeHandle:
        if i == 0:
            raise FakeNVMLError("No Permission")
        return by_index(i)

    monkeypatch.setattr(sys.modules["pynvml"], "nvmlDeviceGetHandleByIndex", refuse_the_first)
    monkeypatch.setattr(
        nvml_mod,
        "torch_device_uuid",
        lambda index: {0: "BBBBBBBB-1111-2222-3333-444444444444"}.get(index),
    )
    with MemorySampler(torch.device("cuda", 0), interval=SLOW) as s:
        pass
    assert s.peak_nvml_device_used == 20 * MiB
    assert s.sources["device_handle"].startswith("uuid GPU-bbbbbbbb")


def test_process_query_falls_back_to_v2_for_an_older_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    # nvidia-ml-py's default query is v3; a driver without it fails the call.
    fake = install(
        monkeypatch,
        FakeNVML([FakeHandle("GPU-aaaa", processes=[(PID, 300 * MiB)])], process_error="Function Not Found"),
    )
    module = sys.modules["pynvml"]
    module.nvmlDeviceGetComputeRunningProcesses_v2 = lambda h: [
        SimpleNamespace(pid=p, usedGpuMemory=u) for p, u in h.processes
    ]
    with MemorySampler("cuda:0", interval=SLOW) as s:
        pass
    assert s.sources["process"] == "nvml compute processes"
    assert s.peak_nvml_process_used == 300 * MiB
    assert fake.inits == fake.shutdowns == 1


def test_uuid_maps_to_a_mig_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    mig = FakeHandle("MIG-cccccccc-1111-2222-3333-444444444444", used_v2=5 * MiB)
    gpus = [FakeHandle("GPU-aaaaaaaa-1111-2222-3333-444444444444", used_v2=70 * MiB, migs=[mig])]
    install(monkeypatch, FakeNVML(gpus))
    monkeypatch.setattr(nvml_mod, "torch_device_uuid", lambda index: "cccccccc-1111-2222-3333-444444444444")
    with MemorySampler("cuda:0", interval=SLOW) as s:
        pass
    assert s.peak_nvml_device_used == 5 * MiB
    assert s.sources["device_handle"].startswith("uuid MIG-cccccccc")


def test_no_uuid_match_falls_back_to_index_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, FakeNVML(two_gpus()))
    monkeypatch.setattr(nvml_mod, "torch_device_uuid", lambda index: "dddddddd-0000")
    with MemorySampler("cuda:1", interval=SLOW) as s:
        pass
    assert s.peak_nvml_device_used == 20 * MiB
    note = s.sources["device_handle"]
    assert note.startswith("index 1 (")
    assert "no NVML UUID matched torch's 'dddddddd-0000'" in note
    assert "CUDA_VISIBLE_DEVICES" in note


def test_no_nvml_handle_is_unavailable_and_releases_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install(monkeypatch, FakeNVML(two_gpus()))
    with MemorySampler("cuda:5", interval=SLOW) as s:
        assert fake.shutdowns == 1  # released at once: nothing to sample
    assert s.sources["device"].startswith("unavailable: no NVML handle for cuda:5")
    assert s.peak_nvml_device_used is None and s.peak_nvml_process_used is None
    assert fake.inits == 1 and fake.shutdowns == 1


def test_visible_devices_uuid_prefix_used_when_cuda_not_initialised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    install(monkeypatch, FakeNVML(two_gpus()))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbbbbbb")
    with MemorySampler("cuda:0", interval=SLOW) as s:
        pass
    assert s.peak_nvml_device_used == 20 * MiB
    assert s.sources["device_handle"].endswith("(CUDA_VISIBLE_DEVICES)")


def test_visible_devices_integer_entry_maps_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, FakeNVML(two_gpus()))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    with MemorySampler("cuda:0", interval=SLOW) as s:
        pass
    assert s.peak_nvml_device_used == 20 * MiB
    assert s.sources["device_handle"].startswith("index 1 (")
    assert "assumes CUDA and NVML order agree" in s.sources["device_handle"]


def test_real_torch_uuid_helper_does_not_initialise_cuda() -> None:
    if torch.cuda.is_initialized():
        pytest.skip("CUDA already initialised")
    assert REAL_TORCH_UUID(0) is None
    assert not torch.cuda.is_initialized()


# ------------------------------------------------ decimation, labels, to_dict


def test_decimation_keeps_exact_peaks_and_even_spacing(monkeypatch: pytest.MonkeyPatch) -> None:
    box = {"v": 0}
    install(monkeypatch, FakeNVML([FakeHandle("GPU-aaaa", used_v2=lambda: box["v"])]))
    value_of = {}  # sample index -> device value it read

    def value(i: int) -> int:
        return {37: 10**9, 71: 5 * 10**8}.get(i, 1000 + i)

    s = MemorySampler("cuda:0", interval=SLOW, max_samples=8)
    box["v"] = value(0)
    s.start()
    value_of[0] = value(0)
    for i in range(1, 100):
        box["v"] = value(i)
        value_of[i] = value(i)
        if i == 1:
            s.mark("a")
        elif i == 60:
            s.mark("b")
        else:
            s.sample_now()
    box["v"] = value(100)
    value_of[100] = value(100)
    s.stop()

    assert s.n_samples == 101
    kept = s.timeline
    assert 1 <= len(kept) <= 8
    assert s.stride == 16
    # every stride-th sample is kept, in order, so spacing stays even
    assert [x.nvml_device_used for x in kept] == [value_of[i] for i in range(0, 101, s.stride)]
    assert 10**9 not in [x.nvml_device_used for x in kept]  # the spike was thinned out...
    assert s.peak_nvml_device_used == 10**9  # ...but the peak is exact
    by_label = s.peaks_by_label()
    assert by_label["a"]["nvml_device_used"] == 10**9
    assert by_label["b"]["nvml_device_used"] == 5 * 10**8
    assert set(by_label) == {"a", "b"}


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.integers(min_value=0, max_value=2**40), min_size=1, max_size=300),
    max_samples=st.integers(min_value=1, max_value=20),
)
def test_decimation_property(values: list[int], max_samples: int) -> None:
    s = MemorySampler("cpu", max_samples=max_samples)
    for i, v in enumerate(values):
        s._record(Sample(float(i), v, None, None, "x" if i % 3 else None))
    kept = s.timeline
    assert len(kept) <= max_samples
    assert [x.t for x in kept] == [float(i) for i in range(0, len(values), s.stride)]
    assert s.peak_host_rss == max(values)
    labelled = [v for i, v in enumerate(values) if i % 3]
    assert s.peaks_by_label().get("x", {}).get("host_rss") == (max(labelled) if labelled else None)


def test_keep_timeline_false_still_has_peaks(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, FakeNVML([FakeHandle("GPU-aaaa")]))
    with MemorySampler("cuda:0", interval=SLOW, keep_timeline=False) as s:
        s.mark("fwd")
    assert s.timeline == []
    assert s.n_samples == 3
    assert s.peak_nvml_device_used == 100 * MiB
    assert s.peaks_by_label()["fwd"]["host_rss"] is not None


def test_to_dict_is_json_and_columnar(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, FakeNVML([FakeHandle("GPU-aaaa", processes=[(PID, 64 * MiB)])]))
    with MemorySampler("cuda:0", interval=SLOW) as s:
        s.mark("forward")
        s.mark("backward")
    d = json.loads(json.dumps(s.to_dict()))
    assert d["interval"] == SLOW
    assert d["device"] == "cuda:0"
    assert d["sources"]["device"] == "nvml memory_info v2"
    assert d["sources"]["process"] == "nvml compute processes"
    assert d["peaks"] == {
        "host_rss": s.peak_host_rss,
        "nvml_device_used": 100 * MiB,
        "nvml_process_used": 64 * MiB,
    }
    assert d["baseline"]["nvml_device_used"] == 100 * MiB
    assert d["n_samples"] == 4 and d["n_kept"] == 4
    cols = d["timeline"]
    assert set(cols) == {"t", "host_rss", "nvml_device_used", "nvml_process_used", "label"}
    assert all(len(c) == 4 for c in cols.values())
    assert cols["label"] == [None, "forward", "backward", "backward"]
    assert set(d["peaks_by_label"]) == {"forward", "backward"}


def test_thread_is_a_daemon_waiting_on_an_event() -> None:
    s = MemorySampler("cpu", interval=SLOW).start()
    try:
        assert s._thread is not None and s._thread.daemon and s._thread.is_alive()
        t0 = time.perf_counter()
    finally:
        s.stop()
    assert time.perf_counter() - t0 < 1.0  # stop woke the 60 s wait at once
    assert not s._thread.is_alive()
    assert threading.active_count() >= 1


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        MemorySampler("cpu", interval=0)
    with pytest.raises(ValueError):
        MemorySampler("cpu", max_samples=0)
