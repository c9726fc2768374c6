"""The policy core imports nothing that does I/O or awaits."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import controller.domain

# Standard-library modules the core may use: values, maths and typing only.
ALLOWED = {
    "__future__",
    "collections",
    "dataclasses",
    "enum",
    "functools",
    "itertools",
    "math",
    "operator",
    "re",
    "typing",
    "abc",
    "heapq",
    "bisect",
    "statistics",
}
# Shared modules of ours the core may use: pure functions of values, no I/O.
SHARED_VALUES = {"gpu_common.model_names"}


def _core_modules() -> list[str]:
    return [
        f"controller.domain.{info.name}"
        for info in pkgutil.iter_modules(controller.domain.__path__)
    ] + ["controller.domain"]


def _imports(module_name: str) -> set[str]:
    module = importlib.import_module(module_name)
    assert module.__file__ is not None
    tree = ast.parse(Path(module.__file__).read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_core_imports_only_values_and_itself() -> None:
    modules = _core_modules()
    assert len(modules) > 5
    for name in modules:
        for imported in _imports(name):
            top = imported.split(".")[0]
            allowed = top in ALLOWED or imported in SHARED_VALUES
            assert imported.startswith("controller.domain") or allowed, (
                f"{name} imports {imported}: the policy core must stay pure"
            )


def test_core_has_no_async_code() -> None:
    for name in _core_modules():
        module = importlib.import_module(name)
        assert module.__file__ is not None
        tree = ast.parse(Path(module.__file__).read_text())
        asyncs = [n for n in ast.walk(tree) if isinstance(n, ast.AsyncFunctionDef | ast.Await)]
        assert not asyncs, f"{name} has async code"
