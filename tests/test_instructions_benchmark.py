"""benchmarks/instructions.py and its reference, bare_reads.py.

``BareReads`` must leave training as it was and read what it says it reads:
checked against a plain run of the same steps (losses and weights bit for bit)
and against the gradients' storages counted here. The instruction count's
arithmetic (a step is the difference of two runs over the difference in
steps) is checked with counts given by hand; each mode's child runs as the
benchmark starts it (without valgrind, which takes minutes); a machine without
valgrind gets one line and exit status 2. Each counterfactual
(``counterfactuals.py``) leaves out of ``profile()`` the reads it names and
nothing else (its steps are still found), and puts them back on leaving.
"""

from __future__ import annotations

import argparse
import gc
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


@pytest.fixture(scope="module")
def counterfactuals():
    return load_benchmark("counterfactuals")


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


@pytest.mark.parametrize(
    "mode",
    [
        "plain",
        "hooks_floor",
        "bare_reads",
        "ours",
        "ours_no_gradient_reads",
        "ours_no_state_reads",
        "ours_no_mode_reads",
        "ours_no_reads",
    ],
)
def test_each_child_runs_its_mode_and_exits_cleanly(mode) -> None:
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / "instructions.py"), "--child", mode, "--model", "tiny", "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]


def _profiled_steps(model: torch.nn.Module, eval_between: bool = False) -> list:
    """Three AdamW steps of ``model`` under profile(); the second and third in eval mode where asked."""
    from profiler import profile

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with profile(model, opt, sample_interval=None) as prof:
        mse_steps(model, opt, 1)
        if eval_between:
            model.eval()  # (no dropout or batch norm: the same graph, another mode)
        mse_steps(model, opt, 2)
    return prof.tracker.steps


def test_each_counterfactual_leaves_out_the_reads_it_names_and_puts_them_back(counterfactuals) -> None:
    measured = _profiled_steps(small_mlp())
    assert all(s.gradients > 0 and s.optimizer_state > 0 for s in measured)
    switched = _profiled_steps(small_mlp(), eval_between=True)
    assert switched[1].forwards_repeated == 0 and switched[2].forwards_repeated == 1  # (eval: a new signature)

    model = small_mlp()
    with counterfactuals.left_out("ours_no_state_reads", model):
        steps = _profiled_steps(model)
    assert [s.optimizer_state for s in steps] == [0, 0, 0]  # (the empty state, read once before the first)
    assert all(s.gradients > 0 for s in steps)

    model = small_mlp()
    with counterfactuals.left_out("ours_no_gradient_reads", model):
        steps = _profiled_steps(model)
    assert [s.gradients for s in steps] == [0, 0, 0]
    assert not [e for s in steps for e in s.events if e[1] == "gradients"]
    assert all(s.complete and s.optimizer_steps == 1 for s in steps)  # (the steps are still told apart)

    model = small_mlp()
    with counterfactuals.left_out("ours_no_mode_reads", model):
        steps = _profiled_steps(model, eval_between=True)
    assert steps[1].forwards_repeated == 1  # eval mode unseen: taken as a repeat

    model = small_mlp()
    with counterfactuals.left_out("ours_no_reads", model):
        steps = _profiled_steps(model, eval_between=True)
    assert [(s.gradients, s.optimizer_state) for s in steps] == [(0, 0)] * 3
    assert steps[1].forwards_repeated == 1

    after = _profiled_steps(small_mlp(), eval_between=True)  # all put back on leaving
    assert [(s.gradients, s.optimizer_state) for s in after] == [(s.gradients, s.optimizer_state) for s in measured]
    assert after[1].forwards_repeated == 0
    with pytest.raises(ValueError, match="unknown counterfactual"):
        counterfactuals.left_out("ours_no_such_reads", model).__enter__()


def test_a_childs_counterfactual_stays_in_force_while_the_child_runs(instructions) -> None:
    """The child enters its mode and counts steps with it: its reads stay left out until the mode is left."""
    from profiler.tracking import ledger, optimizers, repeats

    def reads():
        return (ledger.Ledger.count_gradients, optimizers.state_fingerprint, repeats.mode_signature)

    before = reads()
    step, _ = instructions.build_step("lbfgs")
    held = instructions.enter_mode("ours_no_reads", step)
    try:
        gc.collect()  # (nothing but the stack holds the counterfactual: it must not be put back by a collection)
        step()
        step()
        assert all(now is not then for now, then in zip(reads(), before))
    finally:
        held.close()
    assert reads() == before


def test_each_counterfactual_is_said_against_ours(instructions, monkeypatch) -> None:
    per_step = {
        "plain": 5_000,
        "ours": 5_600,
        "ours_no_gradient_reads": 5_400,
        "ours_no_state_reads": 5_500,
        "ours_no_mode_reads": 5_550,
    }
    monkeypatch.setattr(instructions, "count", lambda model, mode, n, workdir: 1_000 + per_step[mode] * n)
    args = argparse.Namespace(model="tiny", modes=list(per_step), short=4, long=24, jobs=1)
    modes = instructions.benchmark(args)["modes"]
    assert modes["ours_no_gradient_reads"]["saved_per_step"] == 200
    assert modes["ours_no_gradient_reads"]["share_of_ours_over_plain"] == pytest.approx(400 / 600, abs=1e-4)
    assert modes["ours_no_state_reads"]["saved_per_step"] == 100
    assert "optimizer state" in modes["ours_no_state_reads"]["left_out"]
    assert "saved_per_step" not in modes["ours"]


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
