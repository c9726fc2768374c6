"""The import rules that keep the layers apart, checked over the source with `ast`.

    gpu_common          shared by everything below; imports none of them
    gpu_agent.sim       the simulated desktop; knows gpu_common only, never the agent
    gpu_agent           the desktop daemon; never the controller; the simulator only where it
                        composes a simulated desktop (cli, daemon, demo)
    controller          the studio-side service; from gpu_agent nothing, except where it composes
                        a whole simulated stack in one process (simulated, demo)
    controller.domain   the pure policy core; only itself, gpu_common's values and the stdlib

An import inside a function or under `if TYPE_CHECKING:` counts like any other: a rule that lazy
imports may break is not a rule. Nothing may import in a cycle. Each failure names the file, the
line and the forbidden import, and the rule it breaks.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gpu_common", "gpu_agent", "controller", "bench", "tools")

AGENT_COMPOSITION = frozenset({"gpu_agent.cli", "gpu_agent.daemon", "gpu_agent.demo"})
STACK_COMPOSITION = frozenset({"controller.simulated", "controller.demo"})
# What the pure policy core may use of ours: value modules with no I/O.
CORE_MAY_USE = (
    "controller.domain",
    "gpu_common.schema",
    "gpu_common.stats",
    "gpu_common.model_names",
)


@dataclass(frozen=True)
class Import:
    """One import statement's target, resolved to a module of the project where it is one."""

    importer: str
    target: str
    path: Path
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line} {self.importer} imports {self.target}"


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_sources(root: Path = ROOT) -> dict[str, Source]:
    """Every module of the project's packages under `root`, by dotted name."""
    return {
        _module_name(root, path): Source(path.relative_to(root), path.read_text())
        for package in PACKAGES
        if (root / package).is_dir()
        for path in sorted((root / package).rglob("*.py"))
    }


@dataclass(frozen=True)
class Source:
    """A module's file, relative to the project root, and its text."""

    path: Path
    text: str


def _targets(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = node.module or ""
    if node.level:
        parts = importer.split(".")
        if not is_package:
            parts.pop()
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join([*parts, base] if base else parts)
    # `from package import module` names a module, `from module import name` does not: the
    # caller keeps the longest prefix that is a module.
    yield from (f"{base}.{alias.name}" for alias in node.names)


@functools.cache
def _named_imports(importer: str, source: Source) -> tuple[tuple[str, int], ...]:
    """Every dotted name `source` imports, with its line; parsed once per text."""
    is_package = source.path.name == "__init__.py"
    return tuple(
        (target, node.lineno)
        for node in ast.walk(ast.parse(source.text, filename=str(source.path)))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for target in _targets(node, importer, is_package)
    )


def project_imports(sources: Mapping[str, Source]) -> list[Import]:
    """Every import between the project's modules in `sources`, lazy ones included."""
    found: dict[tuple[str, str], Import] = {}
    for importer, source in sources.items():
        for target, line in _named_imports(importer, source):
            # The longest project module the name falls in: `gpu_agent.api.create_app`
            # is an import of `gpu_agent.api`.
            while target and target not in sources:
                target = target.rpartition(".")[0]
            if target and target != importer and (importer, target) not in found:
                found[importer, target] = Import(importer, target, source.path, line)
    return list(found.values())


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def broken_rule(imp: Import) -> str | None:
    """Why `imp` is forbidden, or None when the layering allows it."""
    source, target = imp.importer, imp.target
    if _in(source, "gpu_common") and not _in(target, "gpu_common"):
        return "gpu_common is shared by both services and imports neither"
    if _in(source, "gpu_agent.sim") and not (
        _in(target, "gpu_agent.sim") or _in(target, "gpu_common")
    ):
        return "the simulated desktop knows nothing of the agent: gpu_common and itself only"
    if _in(source, "controller.domain") and not any(_in(target, m) for m in CORE_MAY_USE):
        return "the policy core is pure: controller.domain, gpu_common's values and the stdlib"
    if _in(source, "gpu_agent") and _in(target, "controller"):
        return "the agent knows nothing of the controller"
    if (
        _in(source, "gpu_agent")
        and not _in(source, "gpu_agent.sim")
        and _in(target, "gpu_agent.sim")
        and source not in AGENT_COMPOSITION
    ):
        return "only the agent's composition (cli, daemon, demo) may start a simulated desktop"
    if _in(source, "controller") and _in(target, "gpu_agent") and source not in STACK_COMPOSITION:
        return (
            "the controller talks to agents over the wire: it imports gpu_common, not gpu_agent "
            "(only controller.simulated and controller.demo compose a whole stack)"
        )
    return None


def violations(sources: Mapping[str, Source]) -> list[str]:
    """Each forbidden import in `sources`, as `path:line importer imports target: rule`."""
    return [
        f"{imp}: {rule}"
        for imp in sorted(project_imports(sources), key=str)
        if (rule := broken_rule(imp)) is not None
    ]


def cycles(sources: Mapping[str, Source]) -> list[list[str]]:
    """Each set of modules that import one another in a loop (Tarjan's strongly connected
    components of the import graph), as sorted names; empty when the graph is acyclic."""
    graph: dict[str, set[str]] = {module: set() for module in sources}
    for imp in project_imports(sources):
        graph[imp.importer].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.fixture(scope="module")
def sources() -> dict[str, Source]:
    return project_sources()


def test_the_layers_import_only_what_the_rules_allow(sources: dict[str, Source]) -> None:
    found = violations(sources)
    assert not found, "forbidden imports:\n" + "\n".join(found)


def test_nothing_imports_in_a_cycle(sources: dict[str, Source]) -> None:
    found = cycles(sources)
    assert not found, "modules importing each other in a loop:\n" + "\n".join(
        " <-> ".join(component) for component in found
    )


def test_the_rules_see_every_package(sources: dict[str, Source]) -> None:
    for package in ("gpu_common", "gpu_agent.sim", "controller.domain", "controller.api"):
        assert package in sources
    assert len(project_imports(sources)) > 200


def _planted(sources: dict[str, Source], module: str, code: str) -> dict[str, Source]:
    """A copy of `sources` with `code` appended to `module`."""
    source = sources[module]
    return {**sources, module: Source(source.path, f"{source.text}\n\n{code}\n")}


@pytest.mark.parametrize(
    ("module", "planted", "imported"),
    [
        (
            "controller.api",
            "def _detour() -> None:\n    from gpu_agent.api import create_app",
            "gpu_agent.api",
        ),
        ("gpu_agent.sim.gpu", "from gpu_agent.errors import GpuAgentError", "gpu_agent.errors"),
        ("gpu_common.http", "from controller import errors", "controller.errors"),
        ("controller.domain.selection", "import controller.store", "controller.store"),
        ("gpu_agent.service", "from gpu_agent.sim import desktop", "gpu_agent.sim.desktop"),
    ],
)
def test_a_planted_forbidden_import_is_named(
    sources: dict[str, Source], module: str, planted: str, imported: str
) -> None:
    before = violations(sources)
    found = [v for v in violations(_planted(sources, module, planted)) if v not in before]
    assert len(found) == 1, found
    # The message names the file and line, the import, and the rule it breaks.
    path = sources[module].path
    line = len(sources[module].text.splitlines()) + 3 + planted.count("\n")
    assert found[0].startswith(f"{path}:{line} {module} imports {imported}: "), found[0]
    assert len(found[0].split(": ", 1)[1]) > 20


def test_a_planted_cycle_is_found(sources: dict[str, Source]) -> None:
    before = cycles(sources)
    # A lazy import hides a cycle from Python, not from the rule.
    planted = _planted(
        sources, "gpu_common.schema", "def _late() -> None:\n    from gpu_common import http"
    )
    new = [component for component in cycles(planted) if component not in before]
    assert new == [["gpu_common.http", "gpu_common.openapi", "gpu_common.schema"]]
