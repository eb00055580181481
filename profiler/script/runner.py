"""Run a user's script or module faithfully as ``__main__``, the way Python itself would.

Modelled on memray's ``commands/run.py`` and cProfile's ``main``: the program
is compiled first (a syntax error, or a module that cannot be found, is the
user's input problem, reported in one line), then executed in a fresh
``__main__`` module with ``sys.argv``, ``sys.path[0]`` and the module's
dunders set as ``python SCRIPT ARGS`` or ``python -m MODULE ARGS`` would set
them. ``sys.modules["__mp_main__"]`` points at the same module so
multiprocessing and DataLoader workers can unpickle what the script defines.
The outcome (exit code, exception) is returned rather than raised, so the
caller can still write its report before the process exits with the script's
own status.
"""

from __future__ import annotations

import builtins
import importlib.util
import os
import sys
import traceback
import types
from dataclasses import dataclass, field
from typing import Any

from ..errors import ProfilerError
from .signals import Terminated

__all__ = ["Program", "ScriptResult", "load_module", "load_script", "run_program"]


@dataclass
class Program:
    """What to run as ``__main__``: its code, and what Python would set around it."""

    code: types.CodeType
    argv0: str  # sys.argv[0]
    path0: str  # sys.path[0]: the script's folder, or the working directory for a module
    dunders: dict[str, Any]  # __file__, __spec__, __package__, __loader__, __cached__
    source_path: str | None = None  # the file the code came from, if any


@dataclass
class ScriptResult:
    """How the script ended: its exit code and, if it raised, the exception."""

    exit_code: int
    exception: BaseException | None = None
    globals: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.exception is not None and not isinstance(self.exception, SystemExit)


def load_script(path: str) -> Program:
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
        code = compile(source, os.path.abspath(path), "exec", dont_inherit=True)
    except SyntaxError as exc:
        where = f"{exc.filename or path}:{exc.lineno}" if exc.lineno else path
        raise ProfilerError(f"syntax error in {where}: {exc.msg}") from None
    except ValueError as exc:  # e.g. source with null bytes
        raise ProfilerError(f"cannot compile {path}: {exc}") from None
    return Program(
        code=code,
        argv0=path,
        path0=os.path.dirname(os.path.realpath(path)),  # Python resolves a symlinked script here
        dunders={
            "__file__": os.path.abspath(path),
            "__cached__": None,
            "__loader__": None,
            "__package__": None,
            "__spec__": None,
        },
        source_path=os.path.abspath(path),
    )


def load_module(name: str) -> Program:
    """Find a module (a package: its ``__main__``) and get its code, as ``python -m NAME`` does.

    Finding ``pkg.mod`` imports ``pkg`` first, as Python does; what goes wrong
    there is the user's, said in one line.
    """
    if not name or name.startswith("."):
        raise ProfilerError(f"-m {name!r}: relative module names are not supported")
    spec = _find_spec(name)
    if spec.submodule_search_locations is not None:  # a package: run its __main__, as Python does
        spec = _find_spec(name + ".__main__", f"{name!r} is a package and cannot be directly executed")
    loader = spec.loader
    try:
        code = loader.get_code(spec.name) if loader is not None and hasattr(loader, "get_code") else None
    except SyntaxError as exc:
        where = f"{exc.filename or spec.origin}:{exc.lineno}" if exc.lineno else spec.origin
        raise ProfilerError(f"syntax error in {where}: {exc.msg}") from None
    except (ImportError, OSError, ValueError) as exc:
        raise ProfilerError(f"-m {name}: cannot read the module's code ({exc})") from None
    if code is None:
        raise ProfilerError(f"-m {name}: no code to run (a built-in or frozen module?)")
    origin = spec.origin if spec.has_location else name
    return Program(
        code=code,
        argv0=origin,
        path0=os.getcwd(),
        dunders={
            "__file__": origin,
            "__cached__": spec.cached,
            "__loader__": loader,
            "__package__": spec.parent,
            "__spec__": spec,
        },
        source_path=spec.origin if spec.has_location else None,
    )


def _find_spec(name: str, why_missing: str | None = None) -> Any:
    try:
        spec = importlib.util.find_spec(name)
    except Exception as exc:  # noqa: BLE001 - the package's own import failed: the user's problem, in one line
        raise ProfilerError(f"-m {name}: error while finding the module ({type(exc).__name__}: {exc})") from None
    if spec is None:
        raise ProfilerError(f"no module named {name!r}" + (f"; {why_missing}" if why_missing else ""))
    return spec


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


def run_program(program: Program, args: list[str]) -> ScriptResult:
    """Execute ``program`` as ``__main__`` with ``sys.argv = [argv0, *args]``."""
    main = types.ModuleType("__main__")
    main.__dict__.update({**program.dunders, "__builtins__": builtins})
    saved_argv, saved_path0 = sys.argv, sys.path[0] if sys.path else None
    saved_main, saved_mp_main = sys.modules.get("__main__"), sys.modules.get("__mp_main__")
    sys.argv = [program.argv0, *args]
    if not sys.flags.safe_path and not sys.flags.isolated:
        if sys.path:
            sys.path[0] = program.path0
        else:
            sys.path.insert(0, program.path0)
    sys.modules["__main__"] = sys.modules["__mp_main__"] = main
    try:
        exec(program.code, main.__dict__)
        result = ScriptResult(exit_code=0)
    except SystemExit as exc:
        result = ScriptResult(exit_code=_exit_code(exc), exception=exc)
    except Terminated as exc:  # SIGTERM: Python would have died silently; the report comes first
        result = ScriptResult(exit_code=128 + exc.signum, exception=exc)
    except KeyboardInterrupt as exc:
        _print_user_traceback(exc)
        result = ScriptResult(exit_code=130, exception=exc)
    except BaseException as exc:  # noqa: BLE001 - the script's own failure: show it, keep going to the report
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
