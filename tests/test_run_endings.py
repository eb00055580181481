"""How a run under ``python -m profiler`` ends, and what it runs: a signal from a scheduler,
Ctrl-C during ``--fit-batches``, and a module run with ``-m`` as ``python -m`` runs it.

Real processes, real signals: each test starts ``python -m profiler`` and
talks to it as a shell or a scheduler would.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time

import pytest
from support import run_both, run_profiler_text, start

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

# Trains a Linear(8, 1); with --batch-size (the --fit-batches child runs) and
# CHILD_PID_FILE set it writes its pid and sleeps, so the parent can be
# interrupted while it waits.
SLOW_CHILD = """
    import os, sys, time
    import torch
    batch = 4
    if "--batch-size" in sys.argv:
        batch = int(sys.argv[sys.argv.index("--batch-size") + 1])
        if "CHILD_PID_FILE" in os.environ:
            with open(os.environ["CHILD_PID_FILE"], "a") as fh:
                fh.write(f"{os.getpid()}\\n")
            time.sleep(120)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(3):
        model(torch.randn(batch, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
    print("trained", flush=True)
"""

# Measures two steps, says so, then waits for a signal.
WAITS = """
    import signal, sys, time
    import torch
    if len(sys.argv) > 1:
        signal.signal(signal.SIGTERM, lambda *_: (print("the script's own handler", flush=True), sys.exit(3)))
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(2):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
    print("measured", flush=True)
    time.sleep(120)
"""


def _write(path, source):
    path.write_text(textwrap.dedent(source).lstrip())
    return path


def _wait_for(stream, text: str, timeout: float = 120) -> str:
    """Read lines from ``stream`` until one contains ``text``; what was read."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        seen.append(line.decode())
        if text in seen[-1]:
            return "".join(seen)
    raise AssertionError(f"{text!r} never came; read: {''.join(seen)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_writes_the_report_and_ends_by_the_signal(tmp_path):
    script = _write(tmp_path / "waits.py", WAITS)
    out = tmp_path / "r.json"
    proc = start(["-m", "profiler", "--no-sampler", "--json", out, script], tmp_path)
    _wait_for(proc.stdout, "measured")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    err = stderr.decode()
    assert proc.returncode == -signal.SIGTERM, err  # as plain Python dies of it (143 in a shell)
    assert "Traceback" not in err and "Memory of a training step" in err
    report = json.loads(out.read_text())
    assert any("terminated by SIGTERM" in n for n in report["notes"])
    assert report["script"]["exit_code"] == 143 and report["script"]["interrupted_by"] == "SIGTERM"
    assert len(report["models"][0]["memory"]["steps"]) == 2


def test_a_scripts_own_sigterm_handler_still_runs(tmp_path):
    script = _write(tmp_path / "waits.py", WAITS)
    proc = start(["-m", "profiler", "--no-sampler", "-q", script, "own-handler"], tmp_path)
    _wait_for(proc.stdout, "measured")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr.decode()
    assert stdout.decode().strip().endswith("the script's own handler")


def test_ctrl_c_during_fit_batches_keeps_the_report_and_says_the_fit_is_partial(tmp_path, monkeypatch):
    script = _write(tmp_path / "slow.py", SLOW_CHILD)
    pids = tmp_path / "child.pids"
    monkeypatch.setenv("CHILD_PID_FILE", str(pids))
    out = tmp_path / "r.json"
    proc = start(["-m", "profiler", "--no-sampler", "--json", out, "--fit-batches", "8,16", script], tmp_path)
    said = _wait_for(proc.stderr, "--fit-batches: run 1 of 2, the script at --batch-size 8")
    deadline = time.monotonic() + 60
    while not (pids.exists() and pids.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # to the parent only, as a scheduler or `kill -INT` would
    stdout, stderr = proc.communicate(timeout=120)
    err = said + stderr.decode()
    assert stdout.decode().splitlines() == ["trained"]
    assert proc.returncode == -signal.SIGINT, err  # ends as an interrupted Python does (130 in a shell)
    assert "Traceback" not in err, err
    assert "Will it fit?" in err  # the report is printed, with what the main run measured
    report = json.loads(out.read_text())
    assert any("interrupted (Ctrl-C)" in n and "partial" in n for n in report["notes"])
    # The script itself ended well (its status), the run did not: both are said.
    assert report["script"]["exit_code"] == 0 and report["script"]["interrupted_by"] == "SIGINT (Ctrl-C)"
    assert report["models"][0]["fit"]["measured_batches"] == [4]
    child = int(pids.read_text().split()[0])
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the child run outlived the interrupted sweep"


def test_fit_batches_says_which_run_is_going_and_how_long_it_took(tmp_path):
    script = _write(tmp_path / "quick.py", SLOW_CHILD)
    proc = run_profiler_text(["--no-sampler", "--fit-batches", "8", script], tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("python -m profiler: --fit-batches")]
    assert lines[0].startswith("python -m profiler: --fit-batches: run 1 of 1, the script at --batch-size 8")
    assert lines[1].startswith("python -m profiler: --fit-batches: --batch-size 8 done in ")


# --------------------------------------------------------------------------- -m MODULE

PACKAGE_MODULE = """
    import sys
    import torch
    print(__name__, __spec__.name, __package__, sys.argv[1:], sys.argv[0].endswith("train.py"))
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
"""


def test_a_module_runs_as_under_python_dash_m(tmp_path):
    pkg = tmp_path / "proj" / "trainer"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    _write(pkg / "train.py", PACKAGE_MODULE)
    _write(pkg / "__main__.py", "from trainer import train  # noqa: F401\n")
    cwd = tmp_path / "proj"
    out = cwd / "r.json"
    got, expected = run_both(
        ["--no-sampler", "--json", out, "-m", "trainer.train", "a", "--b"], ["-m", "trainer.train", "a", "--b"], cwd
    )
    assert expected.returncode == 0, expected.stderr.decode()
    assert got.returncode == 0, got.stderr.decode()
    assert got.stdout == expected.stdout  # "__main__ trainer.train trainer ['a', '--b'] True"
    report = json.loads(out.read_text())
    assert report["script"] == {"path": "trainer.train", "args": ["a", "--b"], "exit_code": 0, "module": True}
    (model,) = report["models"]
    assert model["class"] == "Linear" and len(model["memory"]["steps"]) == 2
    # A package runs its __main__, as `python -m trainer` does.
    pkg_run = run_profiler_text(["--no-sampler", "-q", "--json", out, "-m", "trainer"], cwd)
    assert pkg_run.returncode == 0, pkg_run.stderr
    assert pkg_run.stdout.startswith("trainer.train trainer.train trainer")
