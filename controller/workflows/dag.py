"""Workflow DAGs as values (pure core): validation, levels, references, what runs and what skips.

A DAG is `{"nodes": [{"id", "agent_name", "input_data", "depends_on": [...]}, ...]}`. Nothing
here does I/O or reads a clock: the Celery tasks (`controller.workflows.tasks`) build their
canvas from `levels()` and ask `decide()` whether a node runs, and both are tested as tables.

An input string may name an upstream node's output as `{node_id}` (its `text`, or the whole
output as JSON when it has none) or `{node_id.field}` (one field of it). Only ids of the
DAG's own nodes are references; any other brace is left as written, so prompts may still
contain JSON. A node may refer only to the nodes it depends on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

NodeState = Literal["succeeded", "failed", "skipped", "cancelled"]
NODE_STATES: Final[tuple[NodeState, ...]] = ("succeeded", "failed", "skipped", "cancelled")

# A node id: what a reference `{id}` can name without ambiguity (no dots, no braces).
_NODE_ID: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
_REFERENCE: Final = re.compile(r"\{([A-Za-z_][A-Za-z0-9_-]{0,63})(?:\.([A-Za-z_][A-Za-z0-9_]*))?\}")
MAX_NODES: Final = 500

# Checks an agent's `input_data` before anything runs: the problems found, empty when none.
InputCheck = Callable[[Mapping[str, Any]], list[str]]


class DagError(ValueError):
    """A DAG that cannot run. `node` names the node at fault (None for the DAG as a whole)."""

    def __init__(self, message: str, *, node: str | None = None) -> None:
        super().__init__(f"node {node!r}: {message}" if node is not None else message)
        self.node = node


@dataclass(frozen=True)
class Node:
    """One validated node."""

    id: str
    agent_name: str
    input_data: Mapping[str, Any]
    depends_on: tuple[str, ...]


@dataclass(frozen=True)
class Dag:
    """A validated DAG: nodes in the order given, and the levels they run in."""

    nodes: tuple[Node, ...]

    def node(self, node_id: str) -> Node:
        """The node named `node_id` (KeyError if none)."""
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise KeyError(node_id)

    def levels(self) -> list[list[str]]:
        """Node ids grouped by depth: a node's level is one more than its deepest dependency.

        Each level runs as one Celery group once the level before it has finished, so the
        nodes of one level run in parallel."""
        depth: dict[str, int] = {}
        for node in self.nodes_in_dependency_order():
            depth[node.id] = 1 + max((depth[d] for d in node.depends_on), default=-1)
        levels: list[list[str]] = [[] for _ in range(1 + max(depth.values(), default=-1))]
        for node in self.nodes:
            levels[depth[node.id]].append(node.id)
        return levels

    def nodes_in_dependency_order(self) -> list[Node]:
        """Every node after all of its dependencies (Kahn's order, ties in the given order)."""
        order = _topological_order(self.nodes)
        if order is None:  # validated DAGs are acyclic
            raise AssertionError("a validated DAG has no cycle")
        return order

    def to_wire(self) -> dict[str, Any]:
        """The DAG as JSON-ready data, in the format `parse_dag` reads."""
        return {
            "nodes": [
                {
                    "id": node.id,
                    "agent_name": node.agent_name,
                    "input_data": dict(node.input_data),
                    "depends_on": list(node.depends_on),
                }
                for node in self.nodes
            ]
        }


def _topological_order(nodes: Sequence[Node]) -> list[Node] | None:
    """Nodes after their dependencies, or None when they form a cycle."""
    remaining = {node.id: set(node.depends_on) for node in nodes}
    order: list[Node] = []
    while remaining:
        ready = [node for node in nodes if node.id in remaining and not remaining[node.id]]
        if not ready:
            return None
        for node in ready:
            del remaining[node.id]
            order.append(node)
        for waiting in remaining.values():
            waiting.difference_update(node.id for node in ready)
    return order


def _find_cycle(nodes: Sequence[Node]) -> list[str]:
    """One cycle among `nodes`, as ids along the dependencies, the first repeated at the end."""
    edges = {node.id: node.depends_on for node in nodes}
    done: set[str] = set()

    def walk(node_id: str, path: list[str]) -> list[str]:
        if node_id in path:
            return [*path[path.index(node_id) :], node_id]
        if node_id in done:
            return []
        for dependency in edges.get(node_id, ()):
            cycle = walk(dependency, [*path, node_id])
            if cycle:
                return cycle
        done.add(node_id)
        return []

    for node_id in edges:
        cycle = walk(node_id, [])
        if cycle:
            return cycle
    return []


def references(value: Any) -> Iterator[tuple[str, str | None]]:
    """Every `{node_id}` or `{node_id.field}` in the strings of `value`, as (id, field)."""
    if isinstance(value, str):
        for match in _REFERENCE.finditer(value):
            yield match.group(1), match.group(2)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from references(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from references(item)


def parse_dag(raw: Any, checks: Mapping[str, InputCheck]) -> Dag:
    """Validate `raw` against the DAG format and the registered agents' input checks.

    `checks` maps each known agent name to its input check. Raises `DagError` naming the node
    for a bad node, an unknown agent or dependency, a reference to a node it does not depend
    on, bad input, or a cycle."""
    if not isinstance(raw, Mapping):
        raise DagError(f"a DAG is an object with a list of nodes, not {type(raw).__name__}")
    unknown_keys = sorted(set(raw) - {"nodes"})
    if unknown_keys:
        raise DagError(f"unknown DAG fields {unknown_keys}; a DAG has only 'nodes'")
    items = raw.get("nodes")
    if not isinstance(items, list) or not items:
        raise DagError("'nodes' must be a non-empty list")
    if len(items) > MAX_NODES:
        raise DagError(f"{len(items)} nodes; at most {MAX_NODES}")
    nodes: list[Node] = []
    for index, item in enumerate(items):
        nodes.append(_parse_node(index, item))
    ids = [node.id for node in nodes]
    duplicates = sorted({node_id for node_id in ids if ids.count(node_id) > 1})
    if duplicates:
        raise DagError("appears more than once", node=duplicates[0])
    known = set(ids)
    for node in nodes:
        for dependency in node.depends_on:
            if dependency not in known:
                raise DagError(f"depends on unknown node {dependency!r}", node=node.id)
            if dependency == node.id:
                raise DagError("depends on itself", node=node.id)
        for target, _field in references(node.input_data):
            if target in known and target not in node.depends_on:
                raise DagError(
                    f"refers to {{{target}}} but does not depend on {target!r}", node=node.id
                )
        check = checks.get(node.agent_name)
        if check is None:
            raise DagError(
                f"unknown agent {node.agent_name!r}; known: {', '.join(sorted(checks))}",
                node=node.id,
            )
        problems = check(node.input_data)
        if problems:
            raise DagError(f"bad input for {node.agent_name}: {'; '.join(problems)}", node=node.id)
    if _topological_order(nodes) is None:
        cycle = _find_cycle(nodes)
        raise DagError(f"is in a cycle: {' -> '.join(cycle)}", node=cycle[0] if cycle else None)
    return Dag(tuple(nodes))


def _parse_node(index: int, item: Any) -> Node:
    if not isinstance(item, Mapping):
        raise DagError(f"node #{index} must be an object, not {type(item).__name__}")
    node_id = item.get("id")
    if not isinstance(node_id, str) or not _NODE_ID.match(node_id):
        raise DagError(
            f"node #{index}: 'id' must be a name of letters, digits, '_' or '-' "
            f"(starting with a letter or '_', at most 64), not {node_id!r}"
        )
    unknown_keys = sorted(set(item) - {"id", "agent_name", "input_data", "depends_on"})
    if unknown_keys:
        raise DagError(f"unknown fields {unknown_keys}", node=node_id)
    agent_name = item.get("agent_name")
    if not isinstance(agent_name, str) or not agent_name:
        raise DagError("'agent_name' must be a non-empty string", node=node_id)
    input_data = item.get("input_data", {})
    if not isinstance(input_data, Mapping):
        raise DagError("'input_data' must be an object", node=node_id)
    try:
        json.dumps(input_data, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise DagError(f"'input_data' must be plain JSON: {exc}", node=node_id) from exc
    depends_on = item.get("depends_on", [])
    if not isinstance(depends_on, list) or not all(isinstance(d, str) for d in depends_on):
        raise DagError("'depends_on' must be a list of node ids", node=node_id)
    if len(set(depends_on)) != len(depends_on):
        raise DagError("'depends_on' lists a node twice", node=node_id)
    return Node(node_id, agent_name, dict(input_data), tuple(depends_on))


# -- running ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """The node runs, with its references filled in."""

    input_data: dict[str, Any]


@dataclass(frozen=True)
class Skip:
    """The node does not run; `state` is skipped (an upstream did not succeed) or cancelled."""

    state: Literal["skipped", "cancelled"]
    reason: str


def decide(
    node: Node, upstream: Mapping[str, Mapping[str, Any] | None], *, revoked: str | None = None
) -> Run | Skip:
    """Whether `node` runs, given its dependencies' results (`None`: no result recorded).

    A result is `{"state", "output", "reason", ...}`. The node is cancelled when the run was
    revoked (`revoked` is the reason), skipped when a dependency did not succeed (naming it
    and why), and otherwise runs with its references filled from the outputs."""
    if revoked is not None:
        return Skip("cancelled", f"workflow revoked: {revoked}")
    for dependency in node.depends_on:
        result = upstream.get(dependency)
        if result is None:
            return Skip("skipped", f"upstream {dependency!r} left no result")
        state = result.get("state")
        if state != "succeeded":
            why = result.get("reason") or "no reason given"
            return Skip("skipped", f"upstream {dependency!r} {state}: {why}")
    outputs = {d: (upstream[d] or {}).get("output") for d in node.depends_on}
    return Run(fill_references(dict(node.input_data), outputs))


def _text_of(output: Any, field: str | None) -> str:
    if field is not None:
        value = output.get(field) if isinstance(output, Mapping) else None
    elif isinstance(output, Mapping) and isinstance(output.get("text"), str):
        value = output["text"]
    else:
        value = output
    return value if isinstance(value, str) else json.dumps(value)


def fill_references(value: Any, outputs: Mapping[str, Any]) -> Any:
    """`value` with every `{id}` / `{id.field}` whose id is in `outputs` replaced by that
    output's text (or field); other braces are left as they are."""
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            node_id, field = match.group(1), match.group(2)
            if node_id not in outputs:
                return match.group(0)
            return _text_of(outputs[node_id], field)

        return _REFERENCE.sub(replace, value)
    if isinstance(value, Mapping):
        return {key: fill_references(item, outputs) for key, item in value.items()}
    if isinstance(value, list):
        return [fill_references(item, outputs) for item in value]
    return value


def workflow_state(results: Mapping[str, Mapping[str, Any] | None]) -> NodeState:
    """The run's overall state from its nodes' results: succeeded when every node did,
    cancelled when any was cancelled, otherwise failed."""
    states = [(r or {}).get("state") for r in results.values()]
    if states and all(state == "succeeded" for state in states):
        return "succeeded"
    if "cancelled" in states:
        return "cancelled"
    return "failed"
