"""CUDA-only figures: their arithmetic on synthetic data here, the real thing where a GPU exists."""

from __future__ import annotations

import pytest
import torch

from profiler.results.fit import fit_points, plan_fit, predict_required
from profiler.results.render import render_memory

MiB = 1024**2


def cuda_step(index: int, batch: int, peak: int) -> dict:
    """A step as memory_section() writes it on CUDA (allocator and NVML figures present)."""
    return {
        "index": index,
        "kind": "steady",
        "complete": True,
        "input_shape": [batch, 512],
        "input_is_tokens": True,
        "categories": {
            "parameters": 400 * MiB,
            "gradients": 400 * MiB,
            "optimizer_state": 800 * MiB,
            "activations": 100 * MiB * batch,
            "autocast_copies": 200 * MiB,
            "other": peak - (1800 * MiB + 100 * MiB * batch),
        },
        "optimizer_state": {"by_name": {"exp_avg": 400 * MiB, "exp_avg_sq": 400 * MiB}, "by_group": [800 * MiB]},
        "activations_by_bucket": {"embedding": 0, "block": 80 * MiB * batch, "head": 20 * MiB * batch, "other": 0},
        "phases": {
            p: {
                "seconds": 0.1,
                "peak_allocated": peak,
                "host_rss_peak": 3 * 1024 * MiB,
                "nvml_process_used_peak": peak + 900 * MiB,
            }
            for p in ("forward", "backward", "optimizer")
        },
        "peak_allocated": peak,
        "reserved": peak + 300 * MiB,
        "nvml_process_used_peak": peak + 900 * MiB,
        "nvml_device_used_peak": peak + 1000 * MiB,
        "host_rss_peak": 3 * 1024 * MiB,
    }


def test_fit_uses_the_allocator_peak_and_the_measured_context():
    memory = {"device": "cuda:0", "steps": [cuda_step(1, 4, 3000 * MiB)]}
    fit = plan_fit(memory, extra_points=fit_points({"steps": [cuda_step(1, 8, 3400 * MiB)]}))
    assert fit["source"] == "allocator peak"
    assert fit["bytes_per_sample"] == pytest.approx(100 * MiB)
    assert fit["context_bytes"] == 600 * MiB  # NVML process peak minus allocator reserved
    assert predict_required(fit, 16, include_context=False) == 4200 * MiB
    assert predict_required(fit, 16) == 4800 * MiB
    assert not any("CUDA context" in n for n in fit["notes"])


def test_memory_table_names_the_cuda_context():
    text = "\n".join(
        render_memory(
            {
                "device": "cuda:0",
                "optimizer": "AdamW",
                "steps": [cuda_step(1, 4, 3000 * MiB)],
                "activations_step": 1,
                "notes": [],
            }
        )
    )
    assert "CUDA context + library workspaces (NVML process - reserved)" in text
    assert "600.00 MiB" in text
    assert "n/a" not in text.split("Phases")[0]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_real_cuda_step_reconciles_with_the_allocator():
    from support import tiny_gpt

    from profiler import profile

    model = tiny_gpt(n_layer=2, n_embd=64, block_size=64).cuda()
    opt = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randint(0, 64, (8, 64), device="cuda")
    with profile(model, opt) as prof:
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.float16):
                _, loss = model(x, x)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
    step = prof.to_dict()["models"][0]["memory"]["steps"][-1]
    assert step["peak_allocated"] is not None and step["reserved"] >= step["peak_allocated"]
    assert step["categories"]["autocast_copies"] > 0
    assert step["categories"]["other"] is not None


class StandInAllocator:
    """The CUDA allocator's counters, played on the CPU by a live-tensor counter.

    ``memory_allocated`` is what was alive before (weights, optimizer state)
    plus every tensor created since and still alive; ``max_memory_allocated``
    its peak since the last reset. Enough to drive the tracker's CUDA code:
    reads at phase boundaries, peak resets, CUDA-event phase timing.
    """

    def __init__(self, baseline: int) -> None:
        from profiler.tracking.live_tensors import LiveTensorCounter

        self.baseline = baseline
        self.counter = LiveTensorCounter()
        self.resets = 0

    def install(self, monkeypatch) -> None:
        import time

        class Event:
            def __init__(self, enable_timing: bool = False) -> None:
                self.t = None

            def record(self, stream=None) -> None:
                self.t = time.perf_counter()

            def synchronize(self) -> None:
                pass

            def elapsed_time(self, end: Event) -> float:
                return (end.t - self.t) * 1000.0

        cuda = torch.cuda
        monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: self.baseline + self.counter.live)
        monkeypatch.setattr(cuda, "max_memory_allocated", lambda device=None: self.baseline + self.counter.peak)
        monkeypatch.setattr(cuda, "memory_reserved", lambda device=None: self.baseline + self.counter.peak + 2 * MiB)
        monkeypatch.setattr(cuda, "reset_peak_memory_stats", self._reset)
        monkeypatch.setattr(cuda, "Event", Event)
        monkeypatch.setattr(cuda, "current_stream", lambda device=None: None)
        monkeypatch.setattr(cuda, "is_current_stream_capturing", lambda: False)
        monkeypatch.setattr(cuda, "current_device", lambda: 0)

    def _reset(self, device=None) -> None:
        self.resets += 1
        self.counter.restart_peak()


def test_tracker_cuda_code_paths_with_a_stand_in_allocator(monkeypatch):
    from support import tiny_gpt, train

    import profiler.tracking.tracker as tracker_module
    from profiler import profile

    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    train(model, opt, steps=1)  # optimizer state exists: what is alive before is weights + state
    alive_before = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    alive_before += sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values())
    allocator = StandInAllocator(alive_before)
    allocator.install(monkeypatch)
    monkeypatch.setattr(tracker_module, "model_device", lambda parameters: torch.device("cuda", 0))
    with allocator.counter:
        with profile(model, opt) as prof:
            train(model, opt, steps=2)
    mem = prof.to_dict()["models"][0]["memory"]
    assert mem["device"] == "cuda:0" and mem["allocator"] == "cuda caching allocator"
    assert allocator.resets == 6  # one per phase start, never an empty_cache
    for s in mem["steps"]:
        phases = s["phases"].values()
        assert all(p["peak_allocated"] is not None and p["gpu_seconds"] > 0 for p in phases)
        assert s["peak_allocated"] == max(p["peak_allocated"] for p in phases)
        # The categories alive together fit under the peak; the rest is temporaries.
        assert s["categories_live_peak"] <= s["peak_allocated"]
        assert s["categories"]["other"] == s["peak_allocated"] - s["categories_live_peak"] > 0
        assert s["reserved"] >= s["peak_allocated"]
    assert any("host time" in n for n in mem["notes"])
    text = prof.render()
    assert "GPU seconds" in text and "peak allocated (allocator)" in text
    # The estimates and the fit use the allocator's peak.
    assert prof.report.models[0].fit["source"] == "allocator peak"


def test_capture_is_checked_on_the_models_device_not_the_current_one(monkeypatch):
    # A model on cuda:1 captured into a CUDA graph while cuda:0 is current:
    # recording a timing event there would break the capture.
    import contextlib

    from profiler.tracking.phases import DeviceClock

    current = [0]

    @contextlib.contextmanager
    def device(index):
        before, current[0] = current[0], index
        try:
            yield
        finally:
            current[0] = before

    recorded = []
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(cuda, "device", device)
    monkeypatch.setattr(cuda, "is_current_stream_capturing", lambda: current[0] == 1)
    monkeypatch.setattr(cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(
        cuda, "Event", lambda enable_timing=False: type("E", (), {"record": lambda self, s=None: recorded.append(1)})()
    )
    assert DeviceClock(torch.device("cuda", 1)).mark() is None and not recorded
    assert DeviceClock(torch.device("cuda", 0)).mark() is not None and recorded == [1]
    assert current == [0]


def test_span_seconds_waits_for_both_events():
    # Phases begun and ended on different streams complete in any order: the
    # start event is waited for too, not only the end.
    from profiler.tracking.phases import span_seconds

    waited = []

    class Event:
        def __init__(self, name: str, t: float) -> None:
            self.name, self.t = name, t

        def synchronize(self) -> None:
            waited.append(self.name)

        def elapsed_time(self, end: Event) -> float:
            assert {self.name, end.name} <= set(waited)
            return end.t - self.t

    assert span_seconds([[Event("a", 0.0), Event("b", 250.0)], [Event("c", 300.0), Event("d", 800.0)]]) == 0.75
    assert waited == ["a", "b", "c", "d"]
    assert span_seconds([[Event("e", 0.0), None]]) is None
