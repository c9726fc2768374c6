"""A studio agent as the studio writes one: a strategist persona on the built-in `llm` agent,
registered by decorator and found through `GPU_WORKFLOWS_AGENT_MODULES`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from controller.workflows import NodeContext, node_agent


def _check(data: Mapping[str, Any]) -> list[str]:
    brief = data.get("brief")
    return (
        [] if isinstance(brief, str) and brief.strip() else ["'brief' must be a non-empty string"]
    )


@node_agent("strategist", check=_check)
async def strategist(ctx: NodeContext, data: dict[str, Any]) -> dict[str, Any]:
    """The studio's brand strategist: turns a client's brief into a positioning line."""
    return await ctx.llm(
        {
            "model": "auto:quality",
            "system": "You are the studio's brand strategist. Answer with one positioning line.",
            "prompt": data["brief"],
        }
    )
