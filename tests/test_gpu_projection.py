"""The GPU projection's parts, each against its own truth.

- CUDA's autocast policy on the CPU: the table equals the operators the
  installed torch gives an ``AutocastCUDA`` kernel, and a step run under it
  saves what CUDA's lists say (the extra fp16 log-softmax a CUDA
  cross-entropy keeps), with the weight-cast cache per autocast region.
- The caching-allocator model: its documented rules one by one, and, for any
  sequence of allocations and frees (hypothesis), the counters' invariants.
- The replay: the same on real and on fake tensors, byte for byte.
- The command line: ``--fit CARD`` answers with a projection, ``--fit-batches``
  fits a line through replays, bad input is one line.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from support import EXAMPLES, run_in_process, tiny_gpt

from profiler import ProfilerError, fake_tensors, profile
from profiler.results.caching_allocator import (
    K_LARGE_BUFFER,
    K_MIN_BLOCK,
    K_SMALL_BUFFER,
    K_SMALL_SIZE,
    CachingAllocator,
    allocation_size,
    round_size,
)
from profiler.results.calibration import load_calibration
from profiler.results.gpu_projection import cublas_workspace
from profiler.tracking.cuda_autocast import CUDA_AUTOCAST_POLICY, _op, cuda_autocast_ops, cuda_autocast_policy
from profiler.tracking.cuda_kernels import cuda_kernels

MIB = 1 << 20


# --------------------------------------------------------------------------- CUDA's autocast policy
def test_policy_table_is_the_operators_cuda_autocast_wraps():
    present = {name for name in CUDA_AUTOCAST_POLICY if _op(name) is not None}
    assert cuda_autocast_ops() == present


def _saved(run) -> list[tuple[str, tuple, int]]:
    seen: dict[int, tuple[str, tuple, int]] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s._cdata] = (str(t.dtype), tuple(t.shape), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kept = run()  # noqa: F841 - what it returns keeps its graph (and storages) alive while counted
    return sorted(seen.values())


def _loss_step():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 16)
    ln, head = torch.nn.LayerNorm(16), torch.nn.Linear(16, 50, bias=False)
    target = torch.randint(0, 50, (32,))

    def run():
        with torch.autocast("cpu", dtype=torch.float16):
            logits = head(ln(x))
            loss = F.cross_entropy(logits.view(-1, 50), target)
        loss.backward()

    return run


def test_cuda_policy_keeps_the_fp16_log_softmax_cuda_saves():
    run = _loss_step()
    cpu = _saved(run)
    with cuda_autocast_policy():
        cuda = _saved(run)
    after = _saved(run)
    assert after == cpu  # the CPU's kernels are back
    # CPU autocast casts cross_entropy_loss to fp32 as a whole; CUDA's lets it decompose, keeps the
    # fp16 dtype cross_entropy passes to log_softmax, and casts for nll_loss: one more fp16 (N, V).
    extra = list(cuda)
    for item in cpu:
        extra.remove(item)
    assert extra == [("torch.float16", (32, 50), 32 * 50 * 2)]


def test_cuda_policy_runs_layer_norm_and_softmax_in_fp32():
    x = torch.randn(4, 16, dtype=torch.float16)
    with cuda_autocast_policy(), torch.autocast("cpu", dtype=torch.float16):
        assert F.layer_norm(x, (16,)).dtype == torch.float32
        assert torch.softmax(x, -1).dtype == torch.float32
        assert torch.softmax(x, -1, dtype=torch.float16).dtype == torch.float16  # a dtype set is kept
        assert (x @ x.float().t()).dtype == torch.float16
        assert torch.addcmul(x, x.float(), x).dtype == torch.float32  # promote: widest
    with torch.autocast("cpu", dtype=torch.float16):
        assert F.layer_norm(x, (16,)).dtype == torch.float16  # the CPU's own policy again


def test_weight_casts_are_cached_per_autocast_region():
    w = torch.nn.Parameter(torch.randn(8, 8))
    x = torch.randn(2, 8, requires_grad=True)  # so mm saves the (cast) weight

    def fp16_weights(regions: int) -> int:
        stores = set()

        def pack(t):
            if t.dtype == torch.float16 and tuple(t.shape) == (8, 8):
                stores.add(t.untyped_storage()._cdata)
            return t

        keep = []
        with cuda_autocast_policy(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            for _ in range(regions):
                with torch.autocast("cpu", dtype=torch.float16):
                    keep += [F.linear(x, w), F.linear(x, w)]
        return len(stores)

    assert fp16_weights(1) == 1
    assert fp16_weights(2) == 2


# --------------------------------------------------------------------------- CUDA's fused kernels
def test_dropout_and_attention_with_dropout_keep_what_cuda_keeps():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 64, 16, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)

    def step():  # forwards only: every graph stays alive while its saves are counted
        y = F.scaled_dot_product_attention(q, q, q, dropout_p=0.1, is_causal=True)
        z = F.dropout(x, 0.1, True)
        assert F.dropout(x, 0.0, True) is x and F.dropout(x, 0.1, False) is x
        return y, z

    cpu = _saved(step)
    with cuda_kernels() as swaps:
        cuda = _saved(step)
    assert _saved(step) == cpu  # the CPU's paths are back
    assert (swaps.dropout, swaps.attention_without_dropout) == (1, 1)
    # the CPU: a float dropout mask and the math path's (2, 4, 64, 64) attention weights and mask
    assert ("torch.float32", (4, 8), 128) in cpu and any(shape == (2, 4, 64, 64) for _, shape, _ in cpu)
    # CUDA: a bool mask, and flash attention's output and log-sum-exp, no seq x seq tensor
    assert ("torch.bool", (4, 8), 32) in cuda and ("torch.float32", (2, 4, 64), 2048) in cuda
    assert not any(len(shape) == 4 and shape[-1] == shape[-2] == 64 for _, shape, _ in cuda)


# --------------------------------------------------------------------------- the caching allocator's rules
def test_sizes_round_to_512_bytes_and_segments_follow_the_request():
    assert [round_size(n) for n in (1, 511, 512, 513, 4096)] == [512, 512, 512, 1024, 4096]
    assert allocation_size(K_SMALL_SIZE) == K_SMALL_BUFFER
    assert allocation_size(K_SMALL_SIZE + 512) == K_LARGE_BUFFER
    assert allocation_size(10 * MIB - 512) == K_LARGE_BUFFER
    assert allocation_size(10 * MIB) == 10 * MIB
    assert allocation_size(10 * MIB + 512) == 12 * MIB


def test_small_requests_share_a_2_mib_segment():
    a = CachingAllocator()
    a.malloc(100_000)
    a.malloc(200_000)
    assert a.reserved == K_SMALL_BUFFER and a.segments == 1
    assert a.allocated == round_size(100_000) + round_size(200_000)


def test_a_large_block_is_split_only_when_more_than_1_mib_remains():
    a = CachingAllocator()
    a.malloc(2 * MIB)  # a 20 MiB segment, split: 18 MiB cached
    assert (a.allocated, a.reserved) == (2 * MIB, K_LARGE_BUFFER)
    assert a.cached_blocks == [(18 * MIB, False)]
    b = CachingAllocator()
    b.malloc(K_LARGE_BUFFER - MIB)  # 1 MiB would remain: not split, the whole block is allocated
    assert b.allocated == K_LARGE_BUFFER and b.cached_blocks == []


def test_best_fit_takes_the_smallest_cached_block_that_fits():
    a = CachingAllocator()
    big, small = a.malloc(12 * MIB), a.malloc(12 * MIB)
    a.free(big)
    a.free(small)
    blocks = [a.malloc(4 * MIB), a.malloc(3 * MIB)]
    assert a.segments == 2 and a.reserved == 24 * MIB
    assert sum(b.size for b in blocks) == 7 * MIB
    # 4 MiB split one 12 MiB segment; 3 MiB then took the 8 MiB remainder, not the untouched 12 MiB one
    assert a.cached_blocks == [(5 * MIB, False), (12 * MIB, False)]


def test_freed_neighbours_merge_into_one_cached_block():
    a = CachingAllocator()
    blocks = [a.malloc(5 * MIB) for _ in range(3)]  # 15 of one 20 MiB segment (2 MiB left, merged at the end)
    assert a.segments == 1
    for i in (0, 2, 1):
        a.free(blocks[i])
    assert a.cached_blocks == [(K_LARGE_BUFFER, False)]
    a.malloc(K_LARGE_BUFFER)  # reused whole: no new segment
    assert a.segments == 1 and a.allocated == K_LARGE_BUFFER


def test_expandable_segments_grow_the_pool_s_one_segment_by_pages():
    a = CachingAllocator(expandable=True)
    first = a.malloc(2 * MIB)  # one 20 MiB page mapped, split even with less than 1 MiB left over
    assert (a.allocated, a.reserved, a.segments) == (2 * MIB, K_LARGE_BUFFER, 1)
    a.malloc(19 * MIB)  # the 18 MiB free tail grows by one page: 38 MiB, 19 MiB of it cached
    assert (a.reserved, a.segments) == (2 * K_LARGE_BUFFER, 1)
    assert a.cached_blocks == [(19 * MIB, False)]
    a.free(first)
    a.malloc(300_000)  # the small pool: its own segment, mapped by 2 MiB
    assert a.reserved == 2 * K_LARGE_BUFFER + K_SMALL_BUFFER and a.segments == 2


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(1, 30 * MIB)), min_size=1, max_size=60),
    st.booleans(),
)
def test_counters_hold_for_any_sequence(ops, expandable):
    a = CachingAllocator(expandable=expandable)
    live = []
    for do_free, size in ops:
        if do_free and live:
            a.free(live.pop(size % len(live)))
        else:
            block = a.malloc(size)
            assert block.size >= round_size(size) and block.size % K_MIN_BLOCK == 0
            live.append(block)
        assert a.allocated == sum(b.size for b in live)
        assert a.allocated + sum(s for s, _ in a.cached_blocks) == a.reserved
        assert a.peak_allocated >= a.allocated and a.peak_reserved == a.reserved
    reserved = a.reserved
    for block in live:
        a.free(block)
    assert a.allocated == 0 and a.reserved == reserved
    assert len(a.cached_blocks) == a.segments  # every segment merged back whole


def test_cublas_workspace_follows_pytorch_defaults():
    assert cublas_workspace((9, 0)) == 32 * MIB
    assert cublas_workspace((7, 5)) == 4096 * 1024 * 2 + 16 * 1024 * 8
    assert cublas_workspace(None) == cublas_workspace((8, 0))


# --------------------------------------------------------------------------- the replay
def _projected(fake: bool, amp: torch.dtype | None = torch.float16, batch: int = 4, **config) -> dict:
    torch.manual_seed(0)
    with fake_tensors() if fake else contextlib.nullcontext():
        model = tiny_gpt(**config)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with profile(model, opt, project=True, sample_interval=None) as prof:
            for _ in range(3):
                x = torch.randint(0, 64, (batch, 8))
                with torch.autocast("cpu", dtype=amp) if amp else contextlib.nullcontext():
                    _, loss = model(x, torch.roll(x, -1, 1))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
    return prof.to_dict()["models"][0]


def test_replay_is_the_same_on_fake_and_real_tensors():
    real, fake = _projected(False, dropout=0.1), _projected(True, dropout=0.1)
    assert real["memory"]["gpu_replay"] == fake["memory"]["gpu_replay"]
    assert real["projection"]["cards"] == fake["projection"]["cards"]


def test_trace_scaled_to_another_batch_replays_as_a_run_at_that_batch():
    """The one-run answer for other batch sizes against runs at those sizes (fake: a larger model is cheap)."""
    config = {"n_embd": 256, "n_head": 4, "block_size": 64, "vocab_size": 2048}
    from_four = {r["batch"]: r for r in _projected(True, batch=4, **config)["memory"]["gpu_replay"]["by_batch"]}
    for batch in (2, 16):
        run = _projected(True, batch=batch, **config)["projection"]["replay"]
        scaled = from_four[batch]
        assert scaled["peak_allocated"] == pytest.approx(run["peak_allocated"], rel=0.01)
        assert scaled["reserved"] == pytest.approx(run["reserved"], rel=0.05)


def test_projection_section_per_card():
    entry = _projected(True)
    proj = entry["projection"]
    assert proj["available"] and proj["autocast_dtypes"] == ["float16"] and proj["batch"] == 4
    replay = proj["replay"]
    assert replay["peak_allocated"] >= max(replay["phases"].values()) > replay["allocated_start"] > 0
    non_allocator = load_calibration().non_allocator
    variants = entry["memory"]["gpu_replay"]["with_workspaces"]
    for card in proj["cards"]:
        ws = cublas_workspace(tuple(card["compute_capability"]))
        steps = variants[str(ws)]["steps"]
        # the first step starts before any cuBLAS handle exists; later ones start with both workspaces
        assert steps[0]["allocated_start"] == replay_steps(entry)[0]["allocated_start"]
        assert steps[1]["allocated_start"] == replay_steps(entry)[1]["allocated_start"] + 2 * ws
        assert card["allocated_peak"] == steps[-1]["peak_allocated"] >= replay["peak_allocated"] + 2 * ws
        assert card["device_used_peak"] == card["reserved_peak"] + non_allocator
        assert card["fits"] == (card["device_used_peak"] <= card["usable"])
        assert card["largest_batch"] >= proj["batch"]


def replay_steps(entry: dict) -> list[dict]:
    return entry["memory"]["gpu_replay"]["steps"]


def test_the_trace_marks_where_each_thread_first_runs_cublas():
    torch.manual_seed(0)
    with fake_tensors():
        model = tiny_gpt()
        opt = torch.optim.AdamW(model.parameters())
        with profile(model, opt, project=True, sample_interval=None) as prof:
            for _ in range(2):
                x = torch.randint(0, 64, (4, 8))
                model(x, x)[1].backward()
                opt.step()
                opt.zero_grad()
    trace = prof.tracker.phases.trace
    marks = [(i, e[1]) for i, e in enumerate(trace) if e[0] in ("mark", "workspace")]
    labels = [label for _, label in marks]
    # once each, the script's in the first forward, autograd's in the first backward
    assert labels[:4] == ["1:forward", "script", "1:backward", "autograd"]
    assert labels.count("script") == labels.count("autograd") == 1


def test_bf16_is_not_projected_on_cards_without_it():
    proj = _projected(True, torch.bfloat16)["projection"]
    t4 = next(c for c in proj["cards"] if c["card"] == "T4")
    assert not t4["projected"] and "compute capability 8.0" in t4["reason"] and "allocated_peak" not in t4
    assert next(c for c in proj["cards"] if c["card"] == "A100-80GB")["projected"]


# --------------------------------------------------------------------------- the command line
SMALL = ["--n_layer", "2", "--n_embd", "64", "--n_head", "2", "--vocab_size", "512", "--block_size", "64"]


def test_fit_card_answers_with_a_projection(tmp_path, capfd):
    out = tmp_path / "r.json"
    args = ["--fake", "--fit", "T4", "--json", out, "--steps", "2", "--stop-after-steps"]
    proc = run_in_process(
        [*args, EXAMPLES / "nanogpt.py", *SMALL, "--dtype", "fp16", "--batch-size", "4", "--seq-len", "32"],
        tmp_path,
        capfd,
    )
    assert proc.returncode == 0, proc.stderr
    assert "GPU projection of step 2 (batch 4, seq 32; float16" in proc.stderr
    assert "calibration: built in: profiler/calibration/gpu_h100_seed_fp16_b8.json" in proc.stderr
    (entry,) = json.loads(out.read_text())["models"]
    assert [c["card"] for c in entry["projection"]["cards"]] == ["T4"]
    assert "fit" in entry  # the CPU's fit section stays in the JSON


def test_fit_batches_runs_replace_the_scaled_points(tmp_path, capfd):
    out = tmp_path / "r.json"
    args = ["--fake", "--project", "--fit-batches", "2,8", "--json", out, "--steps", "2", "--stop-after-steps"]
    proc = run_in_process(
        [*args, EXAMPLES / "nanogpt.py", *SMALL, "--dtype", "fp16", "--batch-size", "4", "--seq-len", "32"],
        tmp_path,
        capfd,
    )
    assert proc.returncode == 0, proc.stderr
    (entry,) = json.loads(out.read_text())["models"]
    scaling = entry["projection"]["scaling"]
    assert "at batch sizes [2, 4, 8], the replays of the runs measured there" in scaling["method"]
    assert scaling["measured_batches"] == [2, 4, 8]
    points = {p["batch"]: p for p in scaling["points"]}
    assert points[4]["reserved"] == entry["projection"]["replay"]["reserved"]
    assert {1, 2, 3, 4, 6, 8, 12, 16} <= set(points)  # the trace replayed around the runs' own points


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "cannot read it"),
        ("{not json", "not JSON"),
        ('{"models": [{"name": "m", "memory": {"device": "cpu"}}]}', "no model in it was measured on a GPU"),
        ('{"a": 1}', "neither a report of this tool nor a calibration file"),
    ],
)
def test_bad_calibration_is_one_line(tmp_path, capfd, content, message):
    path = tmp_path / "cal.json"
    if content is not None:
        path.write_text(content)
    proc = run_in_process(["--calibrate", path, EXAMPLES / "nanogpt.py"], tmp_path, capfd)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr


def test_a_calibration_below_the_reserved_memory_is_refused(tmp_path):
    step = {"index": 1, "complete": True, "optimizer_steps": 1, "reserved": 4_000_000_000}
    step["nvml_device_used_peak"] = 3_000_000_000
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"models": [{"name": "m", "memory": {"device": "cuda:0", "steps": [step]}}]}))
    with pytest.raises(ProfilerError, match="below the allocator's reserved memory"):
        load_calibration(str(path))
    with pytest.raises(ProfilerError, match="^calibrate='"):  # the API names its own argument
        profile(tiny_gpt(), calibrate=str(path))


def test_an_empty_card_name_is_refused_before_the_script(tmp_path, capfd):
    proc = run_in_process(["--fit", "", EXAMPLES / "nanogpt.py"], tmp_path, capfd)
    assert proc.returncode == 2 and "unknown card ''" in proc.stderr and "nanogpt:" not in proc.stdout


def test_a_small_model_gets_a_largest_batch_and_names_the_cards_not_calibrated():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters())
    with profile(model, opt, calibrate=None, project=True, sample_interval=None) as prof:
        for _ in range(3):
            model(torch.randn(8, 16)).sum().backward()
            opt.step()
            opt.zero_grad()
    proj = prof.report.models[0].extra["projection"]
    rows = {c["card"]: c for c in proj["cards"]}
    assert all(c["largest_batch"] and c["largest_batch"] > 1_000_000 for c in rows.values())
    assert rows["T4"]["largest_batch"] < rows["H200"]["largest_batch"]
    assert rows["H100-80GB"]["non_allocator_measured_here"] and not rows["H200"]["non_allocator_measured_here"]
    assert any(n.endswith("reused for T4, L4, A10G, V100-16GB, V100-32GB, A100-40GB, A100-80GB, H200")
               for n in proj["notes"])  # fmt: skip


def test_calibration_from_a_gpu_report_of_this_tool(tmp_path):
    step = {"index": 3, "complete": True, "optimizer_steps": 1, "reserved": 4_000_000_000}
    step["nvml_device_used_peak"] = 5_500_000_000
    report = {"models": [{"name": "GPT", "memory": {"device": "cuda:0", "device_name": "NVIDIA L4",
                                                    "device_capability": [8, 9], "steps": [step]}}]}  # fmt: skip
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(report))
    cal = load_calibration(str(path))
    assert (cal.non_allocator, cal.device, cal.capability) == (1_500_000_000, "NVIDIA L4", (8, 9))
