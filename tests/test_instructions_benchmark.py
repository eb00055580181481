"""benchmarks/instructions.py and its reference, bare_reads.py.

``BareReads`` must leave training as it was and read what it says it reads:
checked against a plain run of the same steps (losses and weights bit for bit)
and against the gradients' storages counted here. The instruction count's
arithmetic (a step is the difference of two runs over the difference in
steps) is checked with counts given by hand; each mode's child runs as the
benchmark starts it (without valgrind, which takes minutes); a machine without
valgrind gets one line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch
from support import BENCHMARKS, assert_no_hooks, hook_state, load_benchmark, mse_steps, small_mlp


@pytest.fixture(scope="module")
def instructions():
    return load_benchmark("instructions")


@pytest.fixture(scope="module")
def bare_reads():
    return load_benchmark("bare_reads")


def test_bare_reads_change_nothing_and_read_each_steps_gradients(bare_reads) -> None:
    plain, read = small_mlp(), small_mlp()
    read.load_state_dict(plain.state_dict())
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    read_opt = torch.optim.AdamW(read.parameters(), lr=1e-2)
    before = hook_state(read)
    with bare_reads.BareReads(read, read_opt) as reads:
        read_losses = mse_steps(read, read_opt, 3)
        grads = {p.grad.untyped_storage().data_ptr(): p.grad.untyped_storage().nbytes() for p in read.parameters()}
    assert read_losses == mse_steps(plain, plain_opt, 3)
    for a, b in zip(plain.parameters(), read.parameters()):
        assert torch.equal(a, b)
    assert_no_hooks(read, before)
    assert not read_opt._optimizer_step_pre_hooks and not read_opt._optimizer_step_post_hooks
    assert len(reads.records) == 3
    for record in reads.records:
        assert record["gradients"] == sum(grads.values())  # four storages, (16x8 + 16 + 4x16 + 4) x 4 bytes
        assert sum(n for _, n in record["gradient_events"]) == sum(grads.values())
        assert record["optimizer_state_after"]  # AdamW's state exists after each step
    assert reads.records[0]["optimizer_state_before"] == ()  # none before the first
    assert len(reads.signatures) == 1  # three forwards of one signature


def test_a_step_is_the_difference_of_two_runs(instructions, monkeypatch, tmp_path) -> None:
    startup, per_step = {"plain": 1_000_000, "ours": 1_200_000}, {"plain": 5_000, "ours": 5_600}
    monkeypatch.setattr(instructions, "count", lambda model, mode, n, workdir: startup[mode] + per_step[mode] * n)
    args = argparse.Namespace(model="tiny", modes=["plain", "ours"], short=4, long=24, jobs=1)
    result = instructions.benchmark(args)
    assert result["modes"]["plain"]["instructions_per_step"] == 5_000
    assert result["modes"]["ours"]["instructions_per_step"] == 5_600
    assert result["modes"]["ours"]["over_plain_per_step"] == 600
    assert result["modes"]["ours"]["ratio"] == pytest.approx(1.12)
    assert result["modes"]["ours"]["runs"] == {"4": 1_222_400, "24": 1_334_400}


def test_the_cachegrind_summary_is_read(instructions, tmp_path) -> None:
    out = tmp_path / "cg.out"
    out.write_text("desc: I1 cache:\ncmd: python x.py\nevents: Ir\nfl=a.c\nfn=f\n3 7\nsummary: 123456789\n")
    assert instructions.cachegrind_total(out) == 123456789
    out.write_text("events: Ir\n")
    with pytest.raises(ValueError, match="no summary"):
        instructions.cachegrind_total(out)


@pytest.mark.parametrize("mode", ["plain", "hooks_floor", "bare_reads", "ours"])
def test_each_child_runs_its_mode_and_exits_cleanly(mode) -> None:
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / "instructions.py"), "--child", mode, "--model", "tiny", "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]


def test_without_valgrind_one_line_and_status_2(instructions, monkeypatch, capsys) -> None:
    monkeypatch.setattr(instructions.shutil, "which", lambda name: None)
    assert instructions.main(["--model", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "valgrind" in err[0]


def test_the_readme_table_reads_each_mode(monkeypatch, tmp_path) -> None:
    summarize = load_benchmark("summarize")
    result = {
        "settings": {"model": {"preset": "tiny"}},
        "modes": {
            "plain": {"instructions_per_step": 14_860_000},
            "ours": {"instructions_per_step": 16_218_000, "over_plain_per_step": 1_358_000, "ratio": 1.0914},
            "hooks_floor": {
                "instructions_per_step": 14_941_000,
                "over_plain_per_step": 81_000,
                "ratio": 1.0055,
                "share_of_ours_over_plain": 0.0596,
            },
        },
    }
    (tmp_path / "instructions_tiny.json").write_text(json.dumps(result))
    monkeypatch.setattr(summarize, "RESULTS", tmp_path)
    table = summarize.instructions_table().splitlines()
    assert len(table) == 2 + 3
    assert "14.860 M" in table[2] and "+1,358 k" in table[3] and "1.0914x" in table[3]
    assert "6%" in table[4]
