"""Rank by rank under torchrun (2 processes, gloo, CPU): every data-parallel mode against an independent count.

Each launch costs a few seconds of start-up, so one launch measures every mode
(``tests/scripts/ranks_truth.py``), and the command-line tests use the
example script. The independent count (the driver's own walk of local shards,
optimizer state and saved storages) uses none of the profiler's code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch.distributed as dist
from support import ROOT
from support import env as child_env

from profiler.results.gather import rank_path
from profiler.results.ranks import merge_ranks

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

SCRIPTS = ROOT / "tests" / "scripts"
TINY = ["--n_layer", "2", "--n_embd", "64", "--n_head", "2", "--vocab_size", "100", "--block_size", "32"]
TINY += ["--seq-len", "16", "--steps", "3"]


def torchrun(*args: str, cwd=None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(child_env(), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    proc = torchrun(str(SCRIPTS / "ranks_truth.py"), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for mode in MODES:  # prof.to_json(path) under torchrun: path.rank{N}.json on every rank, the merged path on 0
        merged = json.loads((out / f"{mode}.json").read_text())
        assert merged["ranks"]["reported"] == [0, 1]
        for r in (0, 1):
            own = json.loads((out / f"{mode}.rank{r}.json").read_text())
            assert "ranks" not in own and own["models"][0]["parallel"]["rank"] == r
    return results


MODES = ("ddp", "ddp_view", "zero1", "fsdp", "fsdp2")


@pytest.mark.parametrize("mode", MODES)
def test_each_rank_matches_an_independent_count(truth, mode):
    for rank, results in enumerate(truth):
        res = results[mode]
        t, step, section = res["truth"], res["step"], res["section"]
        assert section["rank"] == rank and section["world_size"] == 2
        assert step["parameters"] == t["parameters"]
        assert step["gradients"] == t["gradients"]
        assert step["optimizer_state"] == t["optimizer_state"]
        assert step["activations"] == t["activations"]
        assert step["unsharded_parameters_saved"] == t["unsharded_saved"]
        assert step["unsharded_parameters_held"] == t["unsharded_held"]
        assert section["categories"]["parameters"]["global_bytes"] == t["global_parameters"]


def test_wrappers_found_by_type_with_their_placements(truth):
    sections = {mode: truth[0][mode]["section"] for mode in MODES}
    assert {m: (s["wrapper"], s["optimizer_sharding"]) for m, s in sections.items()} == {
        "ddp": ("DDP", None),
        "ddp_view": ("DDP", None),
        "zero1": ("DDP", "ZeRO-1"),
        "fsdp": ("FSDP", None),
        "fsdp2": ("FSDP2", None),
    }
    place = {m: {c: v["placement"] for c, v in s["categories"].items()} for m, s in sections.items()}
    assert place["ddp"]["parameters"] == place["ddp"]["optimizer_state"] == "replicated"
    assert place["zero1"]["optimizer_state"] == "partitioned"
    assert place["fsdp2"]["parameters"] == place["fsdp"]["gradients"] == place["fsdp2"]["optimizer_state"] == "sharded"
    assert place["fsdp"]["activations"] == "per-rank"
    # The sharded modes hold half the parameters: the global count is the whole model's.
    for mode in ("fsdp", "fsdp2"):
        params = sections[mode]["categories"]["parameters"]
        assert params["local_bytes"] * 2 == params["global_bytes"]
        assert "unsharded_parameters" in sections[mode]["categories"]
    # DDP's buckets hold every gradient; with gradient_as_bucket_view the gradients are them (counted once).
    grads = truth[0]["ddp"]["truth"]["grad_elements_bytes"]
    assert sections["ddp"]["categories"]["reducer_buckets"]["bytes"] == grads
    view = sections["ddp_view"]["categories"]["reducer_buckets"]
    assert view["bytes"] == 0 and view["bucket_bytes"] == grads and view["gradients_are_views"]
    # ZeRO-1's two partitions are this rank's state only, and add up to more than either.
    zero = [truth[r]["zero1"]["truth"]["optimizer_state"] for r in (0, 1)]
    assert 0 < zero[0] < sum(zero) and truth[0]["ddp"]["truth"]["optimizer_state"] <= sum(zero)


def test_rank_zero_gathers_every_rank(truth):
    assert truth[1]["fsdp2"]["ranks"] is None  # only rank 0 holds the merged view
    for mode in MODES:
        ranks = truth[0][mode]["ranks"]
        assert ranks["reported"] == [0, 1] and ranks["missing"] == []
        (entry,) = ranks["models"]
        for cat, row in entry["categories"].items():
            per_rank = [truth[r][mode]["section"]["categories"][cat]["bytes"] for r in (0, 1)]
            assert row["by_rank"] == per_rank and row["sum"] == sum(per_rank) and row["max"] == max(per_rank)
        projection = entry["projection"]
        assert projection["available"]
        measured = [s for s in projection["strategies"] if "measured" in s]
        assert len(measured) == 1 and measured[0]["measured"] == entry["total"]["max"]
    assert "Memory by rank" in truth[0]["fsdp2"]["rendered"]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """The example under ``torchrun -m profiler --json``, with DDP and with FSDP2."""
    runs = {}
    for mode in ("ddp", "fsdp2"):
        tmp = tmp_path_factory.mktemp(mode)
        out = tmp / "run.json"
        example = str(ROOT / "examples" / "nanogpt_distributed.py")
        proc = torchrun("-m", "profiler", "--json", str(out), example, "--mode", mode, *TINY, cwd=tmp)
        assert proc.returncode == 0, proc.stderr[-3000:]
        files = [json.loads(open(rank_path(str(out), r)).read()) for r in (0, 1)]
        runs[mode] = (proc, out, json.loads(out.read_text()), files)
    return runs


@pytest.mark.parametrize("mode", ["fsdp2", "ddp"])
def test_command_line_under_torchrun(cli_runs, mode):
    proc, out, merged, files = cli_runs[mode]
    assert proc.stderr.count("Memory by rank") == 1  # rank 0 prints it, once
    assert "rank 0 of 2" in proc.stderr and "rank 1 of 2" not in proc.stderr  # only rank 0 prints a report
    assert [f["models"][0]["parallel"]["rank"] for f in files] == [0, 1]
    (entry,) = merged["ranks"]["models"]
    assert entry["wrapper"] == {"fsdp2": "FSDP2", "ddp": "DDP"}[mode]
    for cat, row in entry["categories"].items():
        assert row["by_rank"] == [f["models"][0]["parallel"]["categories"][cat]["bytes"] for f in files]
    assert merged["ranks"]["files"] == {str(r): rank_path(str(out), r) for r in (0, 1)}


def test_a_ddp_run_projects_what_an_fsdp_run_holds(cli_runs):
    """The FSDP projection made from the DDP run, against the FSDP2 run's measured ranks (same model, batch)."""
    ddp = cli_runs["ddp"][2]["ranks"]["models"][0]["projection"]
    fsdp2 = cli_runs["fsdp2"][2]["ranks"]["models"][0]
    predicted = next(s for s in ddp["strategies"] if s["strategy"] == "FSDP")["per_rank"]["2"]
    assert predicted == pytest.approx(fsdp2["total"]["max"], rel=0.02)


def test_a_rank_that_hangs_is_not_waited_for(tmp_path):
    out = tmp_path / "run.json"
    start = time.monotonic()
    proc = torchrun(
        "-m",
        "profiler",
        "--gather-timeout",
        "1",
        "--json",
        str(out),
        str(SCRIPTS / "ranks_fail.py"),
        "hang",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = json.loads(out.read_text())
    assert merged["ranks"]["missing"] == [1]
    assert any("rank 1 sent no figures within 1 s" in n for n in merged["ranks"]["notes"])
    assert os.path.exists(rank_path(str(out), 1))  # it wrote its own file when it ended
    assert time.monotonic() - start < 120


def test_a_rank_that_dies_leaves_the_others_files(tmp_path):
    out = tmp_path / "run.json"
    proc = torchrun(
        "-m", "profiler", "--json", str(out), str(SCRIPTS / "ranks_fail.py"), "die", cwd=tmp_path, timeout=180
    )
    assert proc.returncode != 0
    assert "rank 1 fails on purpose" in proc.stderr
    own = json.loads(open(rank_path(str(out), 1)).read())
    assert own["script"]["exit_code"] == 1 and own["models"][0]["parallel"]["rank"] == 1
    assert os.path.exists(rank_path(str(out), 0))


def test_merge_notes_missing_ranks_and_declines_a_projection_it_cannot_make():
    section = {
        "rank": 0,
        "world_size": 2,
        "wrapper": "DDP",
        "optimizer_sharding": "ZeRO-1",
        "strategy": "ZeRO-1",
        "step": 3,
        "categories": {
            "parameters": {"placement": "replicated", "bytes": 100, "global_bytes": 100},
            "gradients": {"placement": "replicated", "bytes": 100, "global_bytes": 100},
            "optimizer_state": {"placement": "partitioned", "bytes": 120, "global_bytes": None},
            "activations": {"placement": "per-rank", "bytes": 50},
        },
        "total": 370,
    }
    got = {0: {"rank": 0, "measured": True, "file": None, "models": [{"name": "m", "parallel": section}]}}
    ranks = merge_ranks(got, 2, ["rank 1 sent no figures within 1 s"])
    assert ranks["missing"] == [1] and ranks["reported"] == [0]
    (entry,) = ranks["models"]
    # ZeRO-1's state has no global view on one rank: with rank 1 missing, no projection is made up.
    assert entry["projection"] == {
        "available": False,
        "reason": "the optimizer state is split without a global view and some rank did not report",
    }
    # Both ranks: the state's global size is the partitions' sum; O/N halves it.
    other = json.loads(json.dumps(section)) | {"rank": 1}
    other["categories"]["optimizer_state"]["bytes"] = 80
    got[1] = {"rank": 1, "measured": True, "file": None, "models": [{"name": "m", "parallel": other}]}
    entry = merge_ranks(got, 2, [])["models"][0]
    rows = {s["strategy"]: s for s in entry["projection"]["strategies"]}
    assert entry["projection"]["inputs"]["O"] == 200
    assert rows["ZeRO-1"]["per_rank"]["2"] == 100 + 100 + 100 + 100 + 50  # P + G + B(=G) + O/2 + A
    assert rows["ZeRO-1"]["measured"] == 370 and rows["ZeRO-1"]["error"] == pytest.approx(80 / 370, abs=1e-4)
    assert rows["DDP"]["per_rank"]["8"] == 100 + 100 + 100 + 200 + 50


def test_rank_files_sit_beside_the_path():
    assert rank_path("/x/run.json", 3) == "/x/run.rank3.json"
    assert rank_path("/x/run", 0) == "/x/run.rank0.json"


def test_fit_batches_is_refused_under_torchrun(tmp_path):
    """Child runs would join the job's rendezvous: one clear line, before the script runs."""
    script = tmp_path / "train.py"
    script.write_text("print('ran')\n")
    env = dict(child_env(), RANK="1", WORLD_SIZE="2")
    proc = subprocess.run(
        [sys.executable, "-m", "profiler", "--fit-batches", "2,4", str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode != 0 and "ran" not in proc.stdout
    assert proc.stderr.strip().count("\n") == 0 and "torchrun" in proc.stderr


def test_a_rank_that_measured_nothing_is_named(tmp_path):
    out = tmp_path / "run.json"
    proc = torchrun("-m", "profiler", "--json", str(out), str(SCRIPTS / "ranks_fail.py"), "idle", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads(out.read_text())["ranks"]
    assert ranks["reported"] == [0, 1] and ranks["measured_nothing"] == [1] and ranks["missing"] == []
    assert [m["ranks"] for m in ranks["models"]] == [[0]]


def test_a_json_path_no_rank_can_use_stops_every_rank_at_once(tmp_path):
    """A directory given as --json: every rank refuses it before the script runs (none waits for the others)."""
    (tmp_path / "out").mkdir()
    start = time.monotonic()
    proc = torchrun(
        # torchrun stops the other ranks once it sees one fail (polling every 0.1 s by default): a rank
        # still importing torch on a loaded machine would be stopped before it could say it refuses.
        "--monitor-interval",
        "5",
        "-m",
        "profiler",
        "--json",
        str(tmp_path / "out"),
        str(SCRIPTS / "ranks_fail.py"),
        "hang",
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank}: error: --json {tmp_path / 'out'}: is a directory" in proc.stderr
    assert "SIGKILL" not in proc.stderr and time.monotonic() - start < 60


def test_gather_timeouts_that_mean_nothing_are_refused(tmp_path):
    import torch

    from profiler import ProfilerError, profile

    for bad in (0, -1, "abc", float("nan")):
        with pytest.raises(ProfilerError, match="gather_timeout"):
            profile(torch.nn.Linear(2, 2), gather_timeout=bad)
    script = tmp_path / "train.py"
    script.write_text("print('ran')\n")
    proc = subprocess.run(
        [sys.executable, "-m", "profiler", "--gather-timeout", "inf", str(script)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
    )
    assert proc.returncode == 2 and "finite" in proc.stderr and "ran" not in proc.stdout
