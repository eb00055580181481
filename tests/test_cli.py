"""``python -m profiler SCRIPT``, run for real in a subprocess: the script must
behave as under plain ``python`` (stdout, exit code, argv, sys.path, tracebacks,
multiprocessing), our own errors are one line with exit status 2, and the
report finds and names the models the script calls."""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path

import pytest
from support import EXAMPLES, ROOT, run_both, run_profiler

PROFILER_DIR = ROOT / "profiler"
PREFIX = "python -m profiler: error:"


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source).lstrip(), encoding="utf-8")
    return path


def write_sgd_script(path: Path, iterations: int, *, setup: str = "", after_step: str = "") -> Path:
    """A script that trains a Linear(8, 1) with SGD on batches of 4, whatever its arguments.

    ``setup`` is one line run once ``opt`` exists; ``after_step`` one line run after
    each ``opt.step()`` (``i`` is the iteration).
    """
    return write(
        path,
        f"""
        import torch
        model = torch.nn.Linear(8, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        {setup}
        for i in range({iterations}):
            model(torch.randn(4, 8)).sum().backward()
            opt.step()
            {after_step}
            opt.zero_grad()
    """,
    )


def models_of(json_path: Path) -> dict[str, dict]:
    data = json.loads(json_path.read_text(encoding="utf-8"))
    assert data["schema"] == "profiler.report/1"
    return {m["name"]: m for m in data["models"]}


def _frames(stderr: str) -> list[tuple[str, int, str]]:
    found = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', stderr)
    return [(os.path.basename(f), int(line), fn) for f, line, fn in found]


def _user_frames(stderr: str, script: str) -> list[tuple[str, int, str]]:
    # torch's own frames differ once any global module hook exists (_call_impl leaves its fast
    # path), so only the script's frames are compared.
    return [f for f in _frames(stderr) if f[0] == script]


def _frame_files(stderr: str) -> list[str]:
    return re.findall(r'File "([^"]+)", line \d+', stderr)


# --------------------------------------------------------------------------- the script runs as under python

MAIN = """
    import os
    import sys

    import helper  # a sibling module: found only if sys.path[0] is the script's folder

    print("hello from the script")
    print("argv", sys.argv[1:])
    print("argv0", sys.argv[0])
    print("name", __name__)
    print("path0", os.path.basename(sys.path[0]))
    print("main module", sys.modules["__main__"].__dict__ is globals())
    print("helper", helper.VALUE)
    print("to stderr", file=sys.stderr)
    sys.stdout.write("no newline at the end")
    sys.exit(3)
"""


@pytest.fixture
def project(tmp_path):
    write(tmp_path / "proj" / "main.py", MAIN)
    write(tmp_path / "proj" / "helper.py", "VALUE = 42\n")
    return tmp_path


SCRIPT_ARGS = ["a b", "-b", "--c=1", "--json", "x.json", "-q", "--depth", "7", "--", "tail"]


@pytest.mark.parametrize("options", [[], ["--json", "out.json", "--"]], ids=["plain", "json-and-dashdash"])
def test_stdout_and_exit_code_identical_to_python(project, options):
    got, expected = run_both([*options, "proj/main.py", *SCRIPT_ARGS], ["proj/main.py", *SCRIPT_ARGS], cwd=project)
    assert expected.returncode == 3, expected.stderr
    assert got.returncode == 3, got.stderr.decode()
    assert got.stdout == expected.stdout  # byte for byte: the report goes to stderr
    out = got.stdout.decode()
    assert f"argv {SCRIPT_ARGS!r}" in out
    assert "argv0 proj/main.py" in out
    assert "name __main__" in out
    assert "path0 proj" in out
    assert "main module True" in out
    assert "helper 42" in out
    assert out.endswith("no newline at the end")
    assert "to stderr" in got.stderr.decode()
    assert "Traceback" not in got.stderr.decode()
    # The script's own "--json x.json" went to the script, not to us.
    assert not (project / "x.json").exists()
    if "--json" in options:
        data = json.loads((project / "out.json").read_text())
        assert data["schema"] == "profiler.report/1"
        assert data["models"] == []


def test_dunder_file_is_absolute_like_python(tmp_path):
    write(tmp_path / "proj" / "show.py", "import os\nprint(__file__)\nprint(os.path.isabs(__file__))\n")
    got, expected = run_both(["proj/show.py"], ["proj/show.py"], cwd=tmp_path)
    assert got.returncode == expected.returncode == 0
    assert got.stdout == expected.stdout


def test_json_path_is_relative_to_the_launch_directory(tmp_path):
    (tmp_path / "sub").mkdir()
    write(
        tmp_path / "moves.py",
        """
        import os

        import torch

        model = torch.nn.Linear(2, 2)
        model(torch.zeros(1, 2))
        os.chdir("sub")
        print("moved")
        """,
    )
    got = run_profiler(["--json", "out.json", "moves.py"], cwd=tmp_path)
    assert got.returncode == 0, got.stderr.decode()
    assert got.stdout == b"moved\n"
    assert not (tmp_path / "sub" / "out.json").exists()
    assert models_of(tmp_path / "out.json")["model"]["parameters"]["total"] == 6


# --------------------------------------------------------------------------- a script that raises

RAISES_AT_TOP = """
    import torch

    model = torch.nn.Linear(3, 4)
    model(torch.zeros(2, 3))
    print("before the error")


    def fail():
        raise ValueError("boom from the script")


    fail()
"""

RAISES_IN_FORWARD = """
    import torch
    from torch import nn


    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 4)

        def forward(self, x):
            y = self.proj(x)
            raise RuntimeError("boom in forward")


    model = Broken()
    print("before the error")
    model(torch.zeros(2, 3))
"""


@pytest.mark.parametrize(
    "source, error, model_class, total",
    [
        (RAISES_AT_TOP, "ValueError: boom from the script", "Linear", 16),
        (RAISES_IN_FORWARD, "RuntimeError: boom in forward", "Broken", 16),
    ],
    ids=["top-level", "in-forward"],
)
def test_script_that_raises_keeps_its_traceback(tmp_path, source, error, model_class, total):
    script = write(tmp_path / "train.py", source)
    got, expected = run_both(["--json", "out.json", script.name], [script.name], cwd=tmp_path)
    assert expected.returncode == 1
    assert got.returncode == 1
    assert got.stdout == expected.stdout == b"before the error\n"

    err = got.stderr.decode()
    assert "Traceback (most recent call last):" in err
    assert error in err
    # The same frames of the script as under plain python, and none of ours.
    user = _user_frames(err, "train.py")
    assert user == _user_frames(expected.stderr.decode(), "train.py")
    assert len(user) == 2
    assert user[0][:2] == ("train.py", len(textwrap.dedent(source).lstrip().splitlines()))
    assert _frames(err)[0] == user[0]  # the first frame shown is the script's, not the runner's
    assert not [f for f in _frame_files(err) if str(PROFILER_DIR) in os.path.abspath(os.path.join(tmp_path, f))]
    assert err.count("Traceback") == 1

    # The report is still printed after the traceback, and the JSON still written.
    assert model_class in err[err.index(error) :]
    models = models_of(tmp_path / "out.json")
    assert [(m["class"], m["parameters"]["total"]) for m in models.values()] == [(model_class, total)]
    assert "model" in models


# --------------------------------------------------------------------------- our own errors: one line, exit 2


def _error_case(tmp_path: Path, case: str) -> list[str]:
    write(tmp_path / "ok.py", "print('the script ran')\n")
    if case == "missing script":
        return ["missing.py"]
    if case == "directory":
        (tmp_path / "scripts").mkdir()
        return ["scripts"]
    if case == "syntax error":
        write(tmp_path / "bad.py", "x = 1\ndef broken(:\n    pass\n")
        return ["bad.py"]
    if case == "null bytes":
        (tmp_path / "nul.py").write_bytes(b"x = 1\x00\n")
        return ["nul.py"]
    if case == "json dir missing":
        return ["--json", "no/such/dir/out.json", "ok.py"]
    if case == "json parent is a file":
        (tmp_path / "afile.txt").write_text("x")
        return ["--json", "afile.txt/out.json", "ok.py"]
    if case == "json is a directory":
        return ["--json", ".", "ok.py"]
    if case == "bad option value":
        return ["--margin", "abc", "ok.py"]
    if case == "unknown option":
        return ["--no-such-option", "ok.py"]
    if case == "no script":
        return []
    if case == "plot not png":
        return ["--plot", "out.txt", "ok.py"]
    if case == "unknown card":
        return ["--fit", "NOSUCHCARD", "ok.py"]
    if case == "bad batches":
        return ["--fit-batches", "0,x", "ok.py"]
    if case == "json empty path":
        return ["--json", "", "ok.py"]
    if case == "json where nobody may write":  # /proc refuses new files even to root
        return ["--json", "/proc/out.json", "ok.py"]
    if case == "plot with no steps":
        return ["--plot", "p.png", "--steps", "0", "ok.py"]
    if case == "fit with no steps":
        return ["--fit", "T4", "--steps", "0", "ok.py"]
    if case == "stop after no steps":
        return ["--stop-after-steps", "--steps", "0", "ok.py"]
    if case == "unknown module":
        return ["-m", "no_such_module_here"]
    if case == "package without __main__":
        write(tmp_path / "pkg_without_main" / "__init__.py", "")
        return ["-m", "pkg_without_main"]
    if case == "batch flag the script lacks":
        write(
            tmp_path / "bs.py",
            """
            import argparse
            parser = argparse.ArgumentParser()
            parser.add_argument("--bs", type=int, default=4)
            parser.add_argument("--lr", type=float, default=0.1)
            print("the script ran", parser.parse_args())
        """,
        )
        return ["--fit-batches", "8", "bs.py"]
    if case == "json dir unwritable":
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        return ["--json", "ro/out.json", "ok.py"]
    raise AssertionError(case)


ERROR_CASES = [
    "missing script",
    "directory",
    "syntax error",
    "null bytes",
    "json dir missing",
    "json parent is a file",
    "json is a directory",
    "bad option value",
    "unknown option",
    "no script",
    "plot not png",
    "unknown card",
    "bad batches",
    "json empty path",
    pytest.param(
        "json where nobody may write", marks=pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="no /proc")
    ),
    "plot with no steps",
    "fit with no steps",
    "stop after no steps",
    "unknown module",
    "package without __main__",
    "batch flag the script lacks",
    pytest.param(
        "json dir unwritable",
        marks=pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere"),
    ),
]


def run_in_process(argv, cwd, monkeypatch, capsys) -> tuple[int, str, str]:
    """``cli.main(argv)`` in this interpreter, from ``cwd``: (exit status, stdout, stderr)."""
    from profiler import cli

    monkeypatch.chdir(cwd)
    monkeypatch.syspath_prepend(str(cwd))  # as `python -m` puts the working directory first
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("case", ERROR_CASES)
def test_user_errors_are_one_line_exit_2(tmp_path, monkeypatch, capsys, case):
    code, out, err = run_in_process(_error_case(tmp_path, case), tmp_path, monkeypatch, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(PREFIX), err
    assert "Traceback" not in err
    assert out == ""  # found before the script ran
    assert not list(tmp_path.rglob("out.json"))


@pytest.mark.parametrize("case", ["missing script", "unknown option"])
def test_user_errors_in_a_fresh_interpreter(tmp_path, case):
    # Smoke test of the real command: the same one line and status from `python -m profiler`.
    got = run_profiler(_error_case(tmp_path, case), tmp_path)
    err = got.stderr.decode()
    assert got.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith(PREFIX), err
    assert got.stdout == b""


def test_syntax_error_names_file_and_line(tmp_path, monkeypatch, capsys):
    _, _, err = run_in_process(_error_case(tmp_path, "syntax error"), tmp_path, monkeypatch, capsys)
    assert "bad.py" in err and ":2" in err


def test_a_batch_flag_the_script_lacks_names_the_ones_it_has(tmp_path, monkeypatch, capsys):
    _, _, err = run_in_process(_error_case(tmp_path, "batch flag the script lacks"), tmp_path, monkeypatch, capsys)
    assert "--batch-size" in err and "--bs" in err and "--batch-arg" in err


def test_a_batch_flag_is_not_judged_where_the_script_does_not_define_its_options(tmp_path):
    from profiler.script.batch_sweep import check_batch_flag

    check_batch_flag("from config import parser\nargs = parser.parse_args()\n", "--batch-size", [])  # defined elsewhere
    check_batch_flag("p = argparse.ArgumentParser(parents=[base])\np.add_argument('--lr')\n", "--batch-size", [])
    check_batch_flag("p.add_argument(*names)\np.add_argument('--lr')\n", "--batch-size", [])
    check_batch_flag("p.add_argument('--batch-size-per-device')\n", "--batch-size", [])  # a unique prefix
    check_batch_flag("p.add_argument('--lr')\n", "--batch-size", ["--batch-size", "8"])  # the user passes it


# --------------------------------------------------------------------------- which models are found


DISCOVERY = """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 3)

        def forward(self, x):
            return self.body(x)


    encoder = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    critic = nn.Linear(4, 1)
    unused = nn.Linear(100, 100)  # never called: not a model while others are
    x = torch.zeros(2, 4)
    encoder[0](x)  # a submodule called on its own, before its model
    critic(encoder(x))
    encoder[2](torch.zeros(2, 8))  # and after


    def train():
        net = Net()  # a local variable: no global name to give it
        return net(x)


    train()
    print("ok")
"""


@pytest.fixture(scope="module")
def discovery(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("discovery")
    write(tmp / "two_models.py", DISCOVERY)
    got = run_profiler(["--json", "out.json", "two_models.py"], cwd=tmp)
    return got, models_of(tmp / "out.json"), json.loads((tmp / "out.json").read_text())


def test_models_found_by_call_and_named_by_variable(discovery):
    got, models, _ = discovery
    assert got.returncode == 0, got.stderr.decode()
    assert got.stdout == b"ok\n"
    assert {name: (m["class"], m["parameters"]["total"]) for name, m in models.items()} == {
        "encoder": ("Sequential", 4 * 8 + 8 + 8 * 4 + 4),
        "critic": ("Linear", 5),
        "Net": ("Net", 15),
    }


def test_submodule_called_alone_is_not_a_model(discovery):
    _, models, _ = discovery
    assert "Linear" not in models  # encoder[0] / encoder[2] on their own
    assert not any(m["parameters"]["total"] in (40, 36) for m in models.values())
    assert "unused" not in models
    assert [m["name"] for m in discovery[2]["models"]] == ["encoder", "critic", "Net"]  # order of first call


def test_never_called_model_falls_back_to_globals_with_a_note(tmp_path):
    write(
        tmp_path / "build_only.py",
        """
        from torch import nn

        model = nn.Linear(3, 2)
        big = nn.Sequential(nn.Linear(2, 2), nn.Tanh())
        inner = big[0]  # part of big: not a model of its own
        print("built")
        """,
    )
    got = run_profiler(["--json", "out.json", "build_only.py"], cwd=tmp_path)
    assert got.returncode == 0, got.stderr.decode()
    assert got.stdout == b"built\n"
    data = json.loads((tmp_path / "out.json").read_text())
    assert {m["name"]: m["parameters"]["total"] for m in data["models"]} == {"model": 8, "big": 6}
    assert any("global" in note for note in data.get("notes", []))
    assert "note:" in got.stderr.decode()


# --------------------------------------------------------------------------- workers


MULTIPROCESSING = """
    import multiprocessing as mp

    import torch
    from torch.utils.data import DataLoader, Dataset


    def square(x):
        return x * x


    class Numbers(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.tensor([float(i)])


    if __name__ == "__main__":
        with mp.get_context("spawn").Pool(2) as pool:
            print("pool", pool.map(square, range(6)))
        model = torch.nn.Linear(1, 1)
        total = 0.0
        for batch in DataLoader(Numbers(), batch_size=2, num_workers=2):
            total += float(batch.sum())
            model(batch)
        print("loader", total)
"""


def test_multiprocessing_spawn_pool_and_dataloader_workers(tmp_path):
    write(tmp_path / "workers.py", MULTIPROCESSING)
    got = run_profiler(["--json", "out.json", "workers.py"], cwd=tmp_path)
    err = got.stderr.decode()
    assert got.returncode == 0, err
    assert got.stdout == b"pool [0, 1, 4, 9, 16, 25]\nloader 28.0\n"
    assert "Traceback" not in err
    models = models_of(tmp_path / "out.json")
    assert {n: m["parameters"]["total"] for n, m in models.items()} == {"model": 2}


def test_nanogpt_example_json(tmp_path, hand_count):
    args = "--n_layer 2 --n_embd 64 --n_head 2 --vocab_size 100 --block_size 32 --seq-len 16 --steps 1".split()
    got = run_profiler(["--json", "out.json", EXAMPLES / "nanogpt.py", *args], cwd=tmp_path)
    err = got.stderr.decode(errors="replace")
    assert got.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    expected = hand_count(100, 32, 64, 2)["total"]
    assert expected == 108_544
    data = json.loads((tmp_path / "out.json").read_text())
    assert [(m["class"], m["parameters"]["total"]) for m in data["models"]] == [("GPT", expected)]
    params = data["models"][0]["parameters"]
    assert params["total_with_duplicates"] == expected + 100 * 64
    assert [(t["path"], t["blocks"]) for t in params["trunks"]] == [("transformer.h", 2)]
    assert "step 0" in got.stdout.decode()


def test_a_scripts_own_profiler_module_is_said_to_be_hidden(tmp_path):
    # (Run from another folder: from the script's own, `python -m profiler` would run that module.)
    write(tmp_path / "proj" / "profiler.py", "def timer():\n    return 1\n")
    script = write(tmp_path / "proj" / "train.py", "import profiler\nprint(hasattr(profiler, 'timer'))\n")
    got = run_profiler([script], tmp_path)
    assert got.returncode == 0
    assert "warning: the script's own" in got.stderr.decode() and "profiler.py is hidden" in got.stderr.decode()


def test_a_failure_writing_the_json_still_prints_the_report(tmp_path, monkeypatch, capsys):
    # Our own error while writing a file (not an OSError): one line and a
    # non-zero exit, and the report is still printed.
    from profiler import Report, cli

    script = write_sgd_script(tmp_path / "train.py", 2)

    def broken(self, path=None):
        raise ValueError("simulated bug")

    monkeypatch.setattr(Report, "to_json", broken)
    code = cli.main(["--json", str(tmp_path / "out.json"), "--no-sampler", str(script)])
    err = capsys.readouterr().err
    assert code == 1
    assert "Memory of a training step" in err  # the report is still printed
    assert (
        err.strip().splitlines()[-1]
        == "python -m profiler: error: could not write the report files: ValueError: simulated bug"
    )
    assert "Traceback" not in err


def test_an_interrupted_script_ends_as_under_python(tmp_path):
    # Uncaught Ctrl-C: Python runs atexit handlers, then dies by SIGINT (the
    # parent sees -2, a shell 130). The report is written first.
    script = write(
        tmp_path / "interrupted.py",
        """
        import atexit
        import torch
        atexit.register(lambda: print("atexit ran"))
        model = torch.nn.Linear(4, 2)
        model(torch.randn(3, 4)).sum().backward()
        raise KeyboardInterrupt
    """,
    )
    out = tmp_path / "r.json"
    got, plain = run_both(["--json", out, "--no-sampler", script], [script], tmp_path)
    assert got.returncode == plain.returncode == -2
    assert got.stdout == plain.stdout == b"atexit ran\n"
    assert got.stderr.decode().count("Traceback") == 1 and "profiler/" not in got.stderr.decode().split("Traceback")[1]
    assert models_of(out)


def test_stop_after_steps_lets_the_last_iteration_finish(tmp_path):
    # The last measured step ends inside optimizer.step(); what the script does
    # after it in that iteration (scheduler, logging, a checkpoint) still runs.
    script = write_sgd_script(
        tmp_path / "sched.py",
        4,
        setup="sched = torch.optim.lr_scheduler.StepLR(opt, 1)",
        after_step='sched.step(); print("finished iteration", i, flush=True)',
    )
    proc = run_profiler(["-q", "--no-sampler", "--steps", "2", "--stop-after-steps", script], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().splitlines() == ["finished iteration 0", "finished iteration 1"]


def test_an_error_of_ours_never_stops_the_script_under_stop_after_steps(tmp_path, monkeypatch, capsys):
    from profiler import cli
    from profiler.tracking.phases import PhaseClock

    script = write_sgd_script(tmp_path / "five.py", 5, after_step='print("iteration", i)')
    phase_begin = PhaseClock.begin

    def broken(self, step, name):
        if name == "optimizer":
            raise RuntimeError("simulated bug")
        phase_begin(self, step, name)

    monkeypatch.setattr(PhaseClock, "begin", broken)
    code = cli.main(
        ["-q", "--no-sampler", "--steps", "3", "--stop-after-steps", "--json", str(tmp_path / "r.json"), str(script)]
    )
    assert code == 0
    assert capsys.readouterr().out.splitlines() == [f"iteration {i}" for i in range(5)]
    (model,) = models_of(tmp_path / "r.json").values()
    assert any("internal error" in n for n in model["memory"]["notes"])


def test_a_failure_rendering_the_report_is_said_once(tmp_path, monkeypatch, capsys):
    from profiler import Report, cli

    script = write(
        tmp_path / "one.py",
        """
        import torch
        model = torch.nn.Linear(4, 2)
        model(torch.randn(3, 4)).sum().backward()
    """,
    )

    def broken(self, depth=2):
        raise ValueError("simulated bug")

    monkeypatch.setattr(Report, "render", broken)
    assert cli.main(["--no-sampler", str(script)]) == 1
    err = capsys.readouterr().err
    assert err.count("could not render the report: ValueError: simulated bug") == 1


def test_fit_batches_the_script_ignores_are_said_not_measured(tmp_path):
    script = write_sgd_script(tmp_path / "fixed_batch.py", 3)  # always batch 4, whatever the arguments
    out = tmp_path / "r.json"
    proc = run_profiler(["--no-sampler", "--fit-batches", "2,8", "--json", out, script], tmp_path)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.decode()
    assert "the run with --batch-size 2 measured model at batch 4, not 2" in err
    (model,) = models_of(out).values()
    assert model["fit"]["measured_batches"] == [4]  # no copies of batch 4 passed off as batches 2 and 8


def test_this_tools_options_after_the_script_get_a_warning(tmp_path):
    script = write(
        tmp_path / "args.py",
        """
        import sys
        print(sys.argv[1:])
    """,
    )
    got, plain = run_both(["-q", script, "--json", "x.json"], [script, "--json", "x.json"], tmp_path)
    assert got.stdout == plain.stdout == b"['--json', 'x.json']\n"  # the script still gets them
    assert "warning: --json after the script goes to the script, not to this tool" in got.stderr.decode()


def test_a_script_stopped_after_its_steps_is_said_so(tmp_path):
    script = write_sgd_script(tmp_path / "long.py", 50)
    out = tmp_path / "r.json"
    proc = run_profiler(["-q", "--no-sampler", "--steps", "2", "--stop-after-steps", "--json", out, script], tmp_path)
    assert proc.returncode == 0
    notes = json.loads(out.read_text())["notes"]
    assert any("ended by --stop-after-steps" in n for n in notes)
