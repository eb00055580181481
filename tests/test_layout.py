"""The package's shape: imports flow one way, no part reads another's private names, no module or class
grows past what one person can hold in their head, and the JSON schema page matches the typed shape.

These are the properties that were lost once already (a 1,500-line tracker, 35 reads of other modules'
private names): checked from the source with ``ast``, so a change that breaks them fails here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from support import ROOT

from profiler.results.schema import StepJSON

PACKAGE = ROOT / "profiler"
# Lower layers never import higher ones (model and tracking know nothing of each other).
LAYERS = {"errors": 0, "model": 1, "tracking": 1, "results": 2, "api": 3, "script": 3, "cli": 4}
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 520


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = ast.parse(path.read_text(), filename=str(path))
    return out


def _imports(name: str, tree: ast.Module) -> set[str]:
    """The package modules ``name`` imports at run time, relative imports resolved."""
    package = name if (PACKAGE / Path(*name.split(".")[1:]) / "__init__.py").exists() else name.rpartition(".")[0]
    typing_only = {
        id(n)
        for branch in ast.walk(tree)
        if isinstance(branch, ast.If) and ast.unparse(branch.test) == "TYPE_CHECKING"
        for n in ast.walk(branch)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue  # for annotations only: no import at run time
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("profiler"):
                found.add(target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("profiler")}
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_imports_flow_one_way():
    wrong = []
    for name, tree in _modules().items():
        mine = _layer(name)
        for target in _imports(name, tree):
            theirs = _layer(target)
            if mine is not None and theirs is not None and theirs > mine:
                wrong.append(f"{name} imports {target}")
    assert not wrong


def test_no_import_cycles_between_modules():
    modules = _modules()
    graph = {name: {t for t in _imports(name, tree) if t in modules and t != name} for name, tree in modules.items()}
    done, stack = set(), []

    def visit(node: str) -> None:
        if node in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(node) :] + [node]))
        if node in done:
            return
        stack.append(node)
        for nxt in graph[node]:
            if not nxt.endswith(("profiler", "profiler.tracking", "profiler.model", "profiler.results")):
                visit(nxt)
        stack.pop()
        done.add(node)

    for name in graph:
        visit(name)


def test_no_module_reads_another_modules_private_names():
    found = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module is not None and "profiler" in name:
                target = node.module
                if (node.level or target.startswith("profiler")) and any(a.name.startswith("_") for a in node.names):
                    found.append(f"{name}: from {'.' * node.level}{target} import _...")
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                # Another of our objects' private attribute, reached through a name other than self:
                # the parts of the tracker, and the report, speak through public names only.
                if isinstance(owner, ast.Attribute) and owner.attr in {
                    "tracker", "calls", "ledger", "phases", "optimizers", "saved_hooks", "outputs", "parameters",
                    "owner", "keeper", "session", "sampler",
                }:  # fmt: skip
                    found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert not found


def test_no_module_or_class_grows_past_what_one_person_can_hold():
    big = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            big.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                big.append(f"{path.relative_to(ROOT)}: class {node.name}, {node.end_lineno - node.lineno + 1} lines")
    assert not big


def test_the_schema_page_lists_every_key_of_the_typed_step():
    page = (ROOT / "docs" / "report-schema.md").read_text()
    listed = set(re.findall(r"`([a-z_]+)`", page))
    assert set(StepJSON.__annotations__) <= listed, set(StepJSON.__annotations__) - listed


def test_the_produced_step_has_exactly_the_typed_keys(tiny_gpt):
    import torch

    from profiler import profile

    opt = torch.optim.AdamW(tiny_gpt.parameters())
    with profile(tiny_gpt) as prof:  # with the sampler: its keys too
        for _ in range(2):
            x = torch.randint(0, 64, (2, 8))
            tiny_gpt(x, x)[1].backward()
            opt.step()
            opt.zero_grad()
    required = {k for k in StepJSON.__required_keys__}
    for step in prof.to_dict()["models"][0]["memory"]["steps"]:
        assert required <= set(step) <= set(StepJSON.__annotations__)


def test_one_version_string_and_a_license():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert 'license = { text = "MIT" }' in (ROOT / "pyproject.toml").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert re.search(r'(?m)^version = \{ ?attr = "profiler.__version__" ?\}', pyproject)
    assert not re.search(r'(?m)^version = "', pyproject)  # no second string to keep in step
    import importlib.metadata

    import profiler

    assert re.fullmatch(r"\d+\.\d+\.\d+", profiler.__version__)
    assert importlib.metadata.version("profiler") == profiler.__version__  # what pip installed says the same
