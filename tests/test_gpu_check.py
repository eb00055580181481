"""benchmarks/gpu_check.py, the one script run on a GPU: what can be checked without one."""

from __future__ import annotations

import json

import pytest
import torch
from support import load_benchmark


@pytest.fixture(scope="module")
def gpu_check():
    return load_benchmark("gpu_check")


def test_nvml_and_smi_rows_are_compared_by_the_pids_both_list(gpu_check):
    # In a container both tools give host PIDs: ours is not os.getpid(), and
    # the two are still compared row by row.
    nvml = {"4242": 1_572_864_000, "77": None, "9": 10 * 2**20}
    smi = {"4242": 1500, "77": 12, "5": 3}
    cmp = gpu_check.compare_by_pid(nvml, smi)
    assert cmp["compared"] == 2
    assert cmp["rows"]["4242"] == {"nvml_bytes": 1_572_864_000, "smi_mib": 1500, "diff_bytes": 0}
    assert cmp["rows"]["77"]["diff_bytes"] is None
    assert cmp["all_within_1_mib"] is True
    assert gpu_check.compare_by_pid({"1": 5 * 2**20}, {"1": 3})["all_within_1_mib"] is False
    assert gpu_check.compare_by_pid(None, smi) == {"compared": 0}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_without_cuda_it_says_so_and_exits_2(gpu_check, capsys):
    assert gpu_check.main([]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_a_cpu_dry_run_writes_valid_json_where_told(gpu_check, tmp_path):
    out = tmp_path / "dry.json"
    assert gpu_check.main(["--allow-cpu", "--quick", "--sections", "nvml_vs_smi", "--out", str(out)]) == 0
    result = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert result["settings"]["dry_run_on_cpu"] == (not torch.cuda.is_available())
    assert "error" not in result["nvml_vs_smi"]
    assert set(result["target_met"]) == {
        "peak_within_2pct",
        "peak_within_2pct_loss_outside",
        "overhead_le_1.05x",
        "fit_within_3pct",
        "projection_within_targets",
    }
