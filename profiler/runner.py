"""Run a user's script faithfully as ``__main__``, the way Python itself would.

Modelled on memray's ``commands/run.py`` and cProfile's ``main``: the script is
compiled first (a syntax error is the user's input problem, reported in one
line), then executed in a fresh ``__main__`` module with ``sys.argv`` and
``sys.path[0]`` set as ``python SCRIPT ARGS`` would set them.
``sys.modules["__mp_main__"]`` points at the same module so multiprocessing and
DataLoader workers can unpickle what the script defines. The outcome (exit
code, exception) is returned rather than raised, so the caller can still write
its report before the process exits with the script's own status.
"""

from __future__ import annotations

import builtins
import os
import sys
import traceback
import types
from dataclasses import dataclass, field
from typing import Any

from .errors import ProfilerError

__all__ = ["ScriptResult", "load_script", "run_script"]


@dataclass
class ScriptResult:
    """How the script ended: its exit code and, if it raised, the exception."""

    exit_code: int
    exception: BaseException | None = None
    globals: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.exception is not None and not isinstance(self.exception, SystemExit)


def load_script(path: str) -> types.CodeType:
    """Read and compile the script, turning every problem into a one-line error."""
    if not os.path.exists(path):
        raise ProfilerError(f"script not found: {path}")
    if os.path.isdir(path):
        raise ProfilerError(f"not a script (it is a directory): {path}")
    try:
        with open(path, "rb") as fh:
            source = fh.read()
    except OSError as exc:
        raise ProfilerError(f"cannot read script {path}: {exc.strerror or exc}") from None
    try:
        # Python 3.9+ gives a script's code (and __file__) its absolute path.
        return compile(source, os.path.abspath(path), "exec", dont_inherit=True)
    except SyntaxError as exc:
        where = f"{exc.filename or path}:{exc.lineno}" if exc.lineno else path
        raise ProfilerError(f"syntax error in {where}: {exc.msg}") from None
    except ValueError as exc:  # e.g. source with null bytes
        raise ProfilerError(f"cannot compile {path}: {exc}") from None


def _exit_code(exc: SystemExit) -> int:
    """The status Python gives for ``sys.exit(code)``; a message is printed like Python does."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _print_user_traceback(exc: BaseException) -> None:
    """Print the traceback as Python would, starting at the script's own frame."""
    tb = exc.__traceback__
    # Skip our frames: the first frame of the script is the one whose file it is.
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    if sys.excepthook is not sys.__excepthook__:  # the script installed its own: Python would call it
        try:
            sys.excepthook(type(exc), exc, tb)
            return
        except Exception:  # noqa: BLE001 - a broken hook: Python falls back to the default, so do we
            pass
    traceback.print_exception(type(exc), exc, tb, file=sys.stderr)


def run_script(code: types.CodeType, path: str, args: list[str]) -> ScriptResult:
    """Execute compiled ``code`` as ``__main__`` with ``sys.argv = [path, *args]``."""
    main = types.ModuleType("__main__")
    main.__dict__.update(
        {"__file__": os.path.abspath(path), "__cached__": None, "__loader__": None, "__package__": None, "__spec__": None, "__builtins__": builtins}
    )
    saved_argv, saved_path0 = sys.argv, sys.path[0] if sys.path else None
    saved_main, saved_mp_main = sys.modules.get("__main__"), sys.modules.get("__mp_main__")
    sys.argv = [path, *args]
    if not sys.flags.safe_path and not sys.flags.isolated:
        script_dir = os.path.dirname(os.path.realpath(path))  # Python resolves a symlinked script here
        if sys.path:
            sys.path[0] = script_dir
        else:
            sys.path.insert(0, script_dir)
    sys.modules["__main__"] = sys.modules["__mp_main__"] = main
    try:
        exec(code, main.__dict__)
        result = ScriptResult(exit_code=0)
    except SystemExit as exc:
        result = ScriptResult(exit_code=_exit_code(exc), exception=exc)
    except KeyboardInterrupt as exc:
        _print_user_traceback(exc)
        result = ScriptResult(exit_code=130, exception=exc)
    except BaseException as exc:  # the script's own failure: show it, keep going to the report
        _print_user_traceback(exc)
        result = ScriptResult(exit_code=1, exception=exc)
    finally:
        sys.argv = saved_argv
        if saved_path0 is not None:
            sys.path[0] = saved_path0
        for name, saved in (("__main__", saved_main), ("__mp_main__", saved_mp_main)):
            if saved is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = saved
    result.globals = main.__dict__
    return result
