"""Prompt-graph helpers of the emulated ComfyUI (simulator layer): cache keys and run order.

Pure functions over a prompt (node id -> {class_type, inputs}); a link is `[node_id, slot]`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping, Sequence
from typing import Any


class GraphError(Exception):
    """The prompt's links form a cycle through `node_id`."""

    def __init__(self, node_id: str, message: str) -> None:
        super().__init__(message)
        self.node_id = node_id


def is_link(value: Any) -> bool:
    """Whether an input value is a link `[node_id, slot]` rather than a literal value.

    Only the shape is checked: any two-item list reads as a link.
    """
    return isinstance(value, list) and len(value) == 2


def signatures(
    prompt: Mapping[str, Any], changed: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Each node's cache key: its class and inputs, links replaced by the linked node's key.

    Node ids do not enter the key, so an identical sub-graph under other ids is still cached,
    as with ComfyUI's input-signature cache. `changed` adds a node's IS_CHANGED value (the hash
    of the file an image loader reads), so a node whose outside input changed runs again.
    """
    extra = changed or {}
    memo: dict[str, str] = {}
    visiting: set[str] = set()

    def signature(node_id: str) -> str:
        if node_id in memo:
            return memo[node_id]
        if node_id in visiting:
            raise GraphError(node_id, "Dependency cycle detected")
        visiting.add(node_id)
        node = prompt[node_id]
        parts: list[Any] = [node["class_type"], extra.get(node_id)]
        for name in sorted(node.get("inputs", {})):
            value = node["inputs"][name]
            if is_link(value):
                parts.append([name, signature(str(value[0])), value[1]])
            else:
                parts.append([name, value])
        visiting.discard(node_id)
        digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
        memo[node_id] = digest.hexdigest()
        return memo[node_id]

    return {node_id: signature(node_id) for node_id in prompt}


def execution_order(
    prompt: Mapping[str, Any],
    outputs: Sequence[str],
    keys: Mapping[str, str],
    cached_keys: Collection[str],
) -> list[str]:
    """Nodes to stage, dependencies first, from each output node in turn.

    A cached node is not entered and neither are its inputs; a cached *output* node is still
    staged, because ComfyUI re-sends its UI output.
    """
    order: list[str] = []
    seen: set[str] = set()

    def visit(node_id: str, is_output: bool) -> None:
        if node_id in seen:
            return
        seen.add(node_id)
        cached = keys[node_id] in cached_keys
        if cached and not is_output:
            return
        if not cached:
            for value in prompt[node_id].get("inputs", {}).values():
                if is_link(value):
                    visit(str(value[0]), False)
        order.append(node_id)

    for output_id in outputs:
        visit(output_id, True)
    return order
