"""The architecture, checked: import layers, module sizes, and how errors reach the user.

The library never imports the CLI or the public facade, has no import cycles, and no module
grows past what one reader holds in mind. Errors name what went wrong by the library's
names; the CLI spells the option and the fix as its flags.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from clipcli.errors import ClipcliError, InputError, OutputExistsError
from clipcli.messages import error_text

PACKAGE = Path(__file__).resolve().parent.parent / "clipcli"
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.module else base
            found.update(t for t in [target, *(f"{target}.{a.name}" for a in node.names)] if t in modules)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("clipcli"):
            found.update(t for t in [node.module, *(f"{node.module}.{a.name}" for a in node.names)] if t in modules)
    return found - {name, "clipcli"}  # the package itself: only __version__


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_library_module_imports_the_cli_or_the_facade(graph):
    facade = {"clipcli", "clipcli.api", "clipcli.__main__"}
    upward = {(name, target) for name, targets in graph.items() for target in targets
              if name not in facade and not name.startswith("clipcli.cli")
              and (target == "clipcli.api" or target.startswith("clipcli.cli"))}
    assert upward == set()


def test_no_import_cycles(graph):
    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for target in graph.get(todo.pop(), ()):
                if target == goal:
                    return True
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        return False

    cycles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if reaches(b, a))
    assert cycles == []


def test_no_module_is_too_long_to_read():
    long = {path.name: n for path in PACKAGE.rglob("*.py") if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


@pytest.mark.parametrize("error, library, cli", [
    (ClipcliError("'fp8': choose fp32, bf16 or fp16", option="precision"),
     "precision 'fp8': choose fp32, bf16 or fp16", "--precision 'fp8': choose fp32, bf16 or fp16"),
    (InputError("3 is the global batch; it must divide by the 2 processes", option="batch_size"),
     "batch_size 3 is the global batch; it must divide by the 2 processes",
     "--batch-size 3 is the global batch; it must divide by the 2 processes"),
    (OutputExistsError("out.npy already exists", fix="overwrite"),
     "out.npy already exists", "out.npy already exists; pass --overwrite to replace it"),
    (ClipcliError("cuda: CUDA is not available here", option="device", fix="cpu"),
     "device cuda: CUDA is not available here", "--device cuda: CUDA is not available here; use --device cpu"),
])
def test_errors_speak_the_library_and_the_cli_spells_flags(error, library, cli):
    assert str(error) == library and "--" not in library
    assert error_text(error) == cli


def test_library_messages_name_no_flags():
    """A Python caller is never told to ``pass --overwrite``: flags are the interfaces' (the CLI,
    the wording both interfaces share in messages.py, and the server the CLI starts)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] in ("cli", "serve", "messages.py"):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(owner.body[0].value) for owner in ast.walk(tree)
                      if isinstance(owner, (ast.Module, ast.ClassDef, ast.FunctionDef)) and owner.body
                      and isinstance(owner.body[0], ast.Expr) and isinstance(owner.body[0].value, ast.Constant)}
        flags = {id(arg) for call in ast.walk(tree) if isinstance(call, ast.Call)  # a script's own argparse
                 and getattr(call.func, "attr", None) == "add_argument" for arg in call.args}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings | flags:
                if re.search(r"(^|[\s(])(?<!tar )--[a-z]", node.value):  # another program's flag (tar's) is fine
                    offenders.append(f"{path.name}: {node.value[:60]!r}")
    assert offenders == []
