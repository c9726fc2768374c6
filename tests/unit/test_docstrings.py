"""A reader of gpu_common, gpu_agent and controller finds a docstring where they need one.

Walks the source with `ast` (nothing is imported) and fails on:

- a public class without a docstring (module level, or nested in a public class);
- a public module-level function without one that another project module imports or uses
  (`from m import f`, `m.f`), counting bench, tools and tests as readers;
- a public method of a public class without one whose name another module reads as an attribute.

Exempt: dunder methods, `@property` getters and setters, `@overload` stubs, and a method that
overrides a documented method of a project base class (the error classes' `details()`, for
example).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECKED = ("gpu_common", "gpu_agent", "controller")
READERS = (*CHECKED, "bench", "tools", "tests")

EXEMPT_DECORATORS = {"property", "cached_property", "setter", "deleter", "overload"}


@dataclass
class Module:
    """One parsed source file and the project names it reads from other modules."""

    name: str
    path: Path
    tree: ast.Module
    # (module, name) pairs this module reads: `from module import name` or `module.name`.
    references: set[tuple[str, str]] = field(default_factory=set)
    # Every `x.attr` attribute name read here; a method counts as used where its name is read.
    attributes: set[str] = field(default_factory=set)
    classes: list[ast.ClassDef] = field(default_factory=list)


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _dotted(node: ast.expr) -> list[str] | None:
    """`a.b.c` as ["a", "b", "c"]; None when the chain does not start at a plain name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return parts[::-1]


def _read(root: Path, packages: tuple[str, ...]) -> dict[str, Module]:
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            name = _module_name(root, path)
            modules[name] = Module(name, path, ast.parse(path.read_text(), filename=str(path)))
    for module in modules.values():
        _collect_references(module, set(modules))
    return modules


def _collect_references(module: Module, known: set[str]) -> None:
    # Local name -> project module it stands for (`import a.b as c`, `from a import b`).
    aliases: dict[str, str] = {}
    chains: list[list[str]] = []
    package = module.name if module.path.name == "__init__.py" else module.name.rpartition(".")[0]
    # One walk per file: the whole check must stay well under two seconds.
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Attribute):
            module.attributes.add(node.attr)
            if chain := _dotted(node):
                chains.append(chain)
        elif isinstance(node, ast.ClassDef):
            module.classes.append(node)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                aliases[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, source] if source else base)
            for alias in node.names:
                if f"{source}.{alias.name}" in known:
                    aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
                else:
                    module.references.add((source, alias.name))
    for chain in chains:
        if chain[0] in aliases:
            target = ".".join([aliases[chain[0]], *chain[1:-1]])
            module.references.add((target, chain[-1]))


def _exempt_by_decorator(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    # Properties read as attributes and their names say what they hold; an `@overload` stub
    # shares the docstring of the implementation that follows it.
    for decorator in node.decorator_list:
        chain = _dotted(decorator)
        if chain and chain[-1] in EXEMPT_DECORATORS:
            return True
    return False


def _documented_methods(modules: dict[str, Module]) -> dict[str, list[tuple[list[str], set[str]]]]:
    """Class name -> (base names, documented method names) for every project class."""
    classes: dict[str, list[tuple[list[str], set[str]]]] = defaultdict(list)
    for module in modules.values():
        for node in module.classes:
            bases = [chain[-1] for base in node.bases if (chain := _dotted(base))]
            documented = {
                item.name
                for item in node.body
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                and ast.get_docstring(item)
            }
            classes[node.name].append((bases, documented))
    return classes


def _overrides_documented(
    bases: list[str], method: str, classes: dict[str, list[tuple[list[str], set[str]]]]
) -> bool:
    seen: set[str] = set()
    pending = list(bases)
    while pending:
        base = pending.pop()
        if base in seen:
            continue
        seen.add(base)
        for grand_bases, documented in classes.get(base, []):
            if method in documented:
                return True
            pending.extend(grand_bases)
    return False


def undocumented(
    root: Path = ROOT,
    checked: tuple[str, ...] = CHECKED,
    readers: tuple[str, ...] = READERS,
) -> list[str]:
    """`path:line name` for each definition the rule asks a docstring of and that lacks one."""
    modules = _read(root, readers)
    classes = _documented_methods(modules)
    referenced: dict[tuple[str, str], set[str]] = defaultdict(set)
    attribute_readers: dict[str, set[str]] = defaultdict(set)
    for module in modules.values():
        for reference in module.references:
            referenced[reference].add(module.name)
        for attribute in module.attributes:
            attribute_readers[attribute].add(module.name)

    missing: list[str] = []
    for module in modules.values():
        relative = module.path.relative_to(root).as_posix()
        if module.name.split(".")[0] not in checked:
            continue
        read_elsewhere = {
            attribute
            for attribute in module.attributes | _method_names(module)
            if attribute_readers[attribute] - {module.name}
        }
        for node in module.tree.body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                missing += _class_gaps(node, "", relative, read_elsewhere, classes)
            elif (
                isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                and not node.name.startswith("_")
                and not ast.get_docstring(node)
                and referenced[(module.name, node.name)] - {module.name}
            ):
                missing.append(f"{relative}:{node.lineno} {node.name}")
    return missing


def _method_names(module: Module) -> set[str]:
    return {
        item.name
        for node in module.classes
        for item in node.body
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
    }


def _class_gaps(
    node: ast.ClassDef,
    prefix: str,
    relative: str,
    read_elsewhere: set[str],
    classes: dict[str, list[tuple[list[str], set[str]]]],
) -> list[str]:
    qualified = f"{prefix}{node.name}"
    gaps = [] if ast.get_docstring(node) else [f"{relative}:{node.lineno} {qualified}"]
    bases = [chain[-1] for base in node.bases if (chain := _dotted(base))]
    for item in node.body:
        if getattr(item, "name", "").startswith("_"):
            continue
        if isinstance(item, ast.ClassDef):
            gaps += _class_gaps(item, f"{qualified}.", relative, read_elsewhere, classes)
        elif (
            isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
            and not ast.get_docstring(item)
            and item.name in read_elsewhere
            and not _exempt_by_decorator(item)
            and not _overrides_documented(bases, item.name, classes)
        ):
            gaps.append(f"{relative}:{item.lineno} {qualified}.{item.name}")
    return gaps


def test_public_definitions_that_others_use_have_docstrings() -> None:
    missing = undocumented()
    assert not missing, (
        f"{len(missing)} definitions need a docstring (what it is for; units; what it returns"
        " or raises when not obvious):\n" + "\n".join(missing)
    )


def test_the_walk_would_catch_what_the_rule_asks_for(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "__init__.py").write_text("")
    (tmp_path / "lib" / "core.py").write_text(
        "class Base:\n"
        '    """Documented."""\n'
        "    def details(self):\n"
        '        """Documented."""\n'
        "class Bare(Base):\n"
        "    class Inner:\n"
        "        pass\n"
        "    def details(self): ...\n"
        "    def called(self): ...\n"
        "    def local(self): ...\n"
        "    def __eq__(self, other): ...\n"
        "    @property\n"
        "    def size_bytes(self): ...\n"
        "def shared(): ...\n"
        "def private_use(): ...\n"
        "def used_as_attribute(): ...\n"
        "def _hidden(): ...\n"
        "private_use()\n"
    )
    (tmp_path / "lib" / "other.py").write_text(
        "from lib.core import Bare, shared\n"
        "from lib import core\n"
        "core.used_as_attribute()\n"
        "Bare().called()\n"
        "Bare().size_bytes\n"
    )
    found = undocumented(tmp_path, ("lib",), ("lib",))
    assert found == [
        "lib/core.py:5 Bare",
        "lib/core.py:6 Bare.Inner",
        "lib/core.py:9 Bare.called",
        "lib/core.py:14 shared",
        "lib/core.py:16 used_as_attribute",
    ]
