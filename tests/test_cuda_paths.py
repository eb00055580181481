"""CUDA-only figures: their arithmetic on synthetic data here, the real thing where a GPU exists."""

from __future__ import annotations

import pytest
import torch

from profiler.estimates import fit_points, plan_fit, predict_required
from profiler.report import render_memory

MiB = 1024**2


def cuda_step(index: int, batch: int, peak: int) -> dict:
    """A step as memory_section() writes it on CUDA (allocator and NVML figures present)."""
    return {
        "index": index, "kind": "steady", "complete": True, "input_shape": [batch, 512], "input_is_tokens": True,
        "categories": {"parameters": 400 * MiB, "gradients": 400 * MiB, "optimizer_state": 800 * MiB,
                       "activations": 100 * MiB * batch, "autocast_copies": 200 * MiB,
                       "other": peak - (1800 * MiB + 100 * MiB * batch)},
        "optimizer_state": {"by_name": {"exp_avg": 400 * MiB, "exp_avg_sq": 400 * MiB}, "by_group": [800 * MiB]},
        "activations_by_bucket": {"embedding": 0, "block": 80 * MiB * batch, "head": 20 * MiB * batch, "other": 0},
        "phases": {p: {"seconds": 0.1, "peak_allocated": peak, "host_rss_peak": 3 * 1024 * MiB,
                       "nvml_process_used_peak": peak + 900 * MiB} for p in ("forward", "backward", "optimizer")},
        "peak_allocated": peak, "reserved": peak + 300 * MiB,
        "nvml_process_used_peak": peak + 900 * MiB, "nvml_device_used_peak": peak + 1000 * MiB,
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
    text = "\n".join(render_memory({"device": "cuda:0", "optimizer": "AdamW", "steps": [cuda_step(1, 4, 3000 * MiB)],
                                    "activations_step": 1, "notes": []}))
    assert "CUDA context + library workspaces (NVML process - reserved)" in text
    assert "600.00 MiB" in text
    assert "n/a" not in text.split("Phases")[0]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_real_cuda_step_reconciles_with_the_allocator():
    from profiler import profile
    from test_tracking import tiny_gpt

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
