"""Node agents: what a workflow node named by `agent_name` does (adapter layer).

Two are built in, and the studio registers its own with `@node_agent("name")` in a module named
in `GPU_WORKFLOWS_AGENT_MODULES` (imported when a worker starts and before a DAG is validated):

- `llm`: text through the controller's Ollama-compatible API. `input_data`: `model` (a name or
  an intent such as `auto:quality`; default `auto`), `prompt` (with an optional `system`) or
  `messages`, and optional `options`, `min_quality`, `max_latency_s`. Output: `text`, `model`,
  `agent`, `reason` (why the controller chose that model) and token counts.
- `image`: a ComfyUI workflow (API format) as a controller image job. `input_data`:
  `workflow`, optional `inputs` that set node inputs (`{"6.text": "..."}`), `vram_bytes` and
  `priority`. Output: `job_id`, the output URLs on the controller, `agent` and `reason`.

An agent is a coroutine `(ctx, input_data) -> dict` plus a pure check of its input, run before
anything is sent. It ends a node by returning its output, or raises `NodeFailed` (the node
fails with that reason) or `NodeHeld` (no room now: the task gives its worker slot back and
retries after the countdown). A studio persona built on `llm` calls `ctx.llm({...})`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from controller.client import ImageJob, StudioBusy, StudioClient, StudioTimeout, StudioUnavailable
from controller.schema import ImageJobInfo
from controller.workflows.dag import InputCheck
from controller.workflows.settings import WorkflowSettings
from gpu_common import clock

log = logging.getLogger(__name__)

Handler = Callable[["NodeContext", dict[str, Any]], Awaitable[dict[str, Any]]]

_LLM_FIELDS: Final = frozenset(
    {"model", "prompt", "system", "messages", "options", "min_quality", "max_latency_s"}
)
_IMAGE_FIELDS: Final = frozenset({"workflow", "inputs", "vram_bytes", "priority"})


class NodeFailed(Exception):
    """The node cannot succeed; `reason` says why and becomes the node's reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NodeHeld(Exception):
    """No room for the node's work now: retry after `retry_after_s` (None: the default)."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass
class NodeContext:
    """What a node agent may use: the studio client, the run and node it serves, the settings.

    `idempotency_key` names this node in this run: a second delivery of the same node sends
    the same key and reattaches to the job the first one made. `jobs` collects the controller
    jobs the node made, so a soft time limit or a revoke can cancel them."""

    run_id: str
    node_id: str
    studio: StudioClient
    settings: WorkflowSettings
    on_job: Callable[[str], None] = lambda job_id: None
    on_progress: Callable[[str, str], None] = lambda state, reason: None
    jobs: list[str] = field(default_factory=list)

    def report(self, state: str, reason: str) -> None:
        """Show the node's state (running, held, ...) and why in the run's progress."""
        self.on_progress(state, reason)

    @property
    def idempotency_key(self) -> str:
        return f"workflow/{self.run_id}/{self.node_id}"

    def add_job(self, job_id: str) -> None:
        """Note a controller job this node made (or reattached to)."""
        if job_id not in self.jobs:
            self.jobs.append(job_id)
            self.on_job(job_id)

    async def llm(self, input_data: dict[str, Any]) -> dict[str, Any]:
        """Run the built-in `llm` agent (for personas built on it)."""
        return await run_llm(self, input_data)

    async def image(self, input_data: dict[str, Any]) -> dict[str, Any]:
        """Run the built-in `image` agent."""
        return await run_image(self, input_data)


@dataclass(frozen=True)
class NodeAgent:
    """A registered agent: its coroutine and the check of its input."""

    name: str
    run: Handler
    check: InputCheck


class AgentRegistry:
    """The node agents by name, the built-in ones first."""

    def __init__(self) -> None:
        self._agents: dict[str, NodeAgent] = {}
        self.add(NodeAgent("llm", run_llm, check_llm_input))
        self.add(NodeAgent("image", run_image, check_image_input))

    def add(self, agent: NodeAgent) -> None:
        """Register `agent`, replacing one of the same name."""
        self._agents[agent.name] = agent

    def register(
        self, name: str, *, check: InputCheck | None = None
    ) -> Callable[[Handler], Handler]:
        """Decorator: register the coroutine as agent `name`, its input checked by `check`
        (by default only that it is an object)."""

        def decorate(handler: Handler) -> Handler:
            self.add(NodeAgent(name, handler, check or _any_input))
            return handler

        return decorate

    def get(self, name: str) -> NodeAgent:
        """The agent called `name` (KeyError if none)."""
        return self._agents[name]

    def checks(self) -> dict[str, InputCheck]:
        """Each agent's input check by name, for `parse_dag`."""
        return {name: agent.check for name, agent in self._agents.items()}


def _any_input(input_data: Mapping[str, Any]) -> list[str]:
    return []


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_llm_input(data: Mapping[str, Any]) -> list[str]:
    """Problems with an `llm` node's input (empty when none)."""
    problems = [f"unknown field {name!r}" for name in sorted(set(data) - _LLM_FIELDS)]
    model = data.get("model", "auto")
    if not isinstance(model, str) or not model.strip():
        problems.append("'model' must be a model name or an intent such as 'auto:quality'")
    has_prompt, has_messages = "prompt" in data, "messages" in data
    if has_prompt == has_messages:
        problems.append("give exactly one of 'prompt' and 'messages'")
    if has_prompt and (not isinstance(data["prompt"], str) or not data["prompt"].strip()):
        problems.append("'prompt' must be a non-empty string")
    if has_messages:
        messages = data["messages"]
        if not isinstance(messages, list) or not messages:
            problems.append("'messages' must be a non-empty list")
        elif not all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) and "content" in m
            for m in messages
        ):
            problems.append("each message must be an object with 'role' and 'content'")
        if "system" in data:
            problems.append("'system' goes with 'prompt'; put a system message in 'messages'")
    if "system" in data and not isinstance(data["system"], str):
        problems.append("'system' must be a string")
    if "options" in data and not isinstance(data["options"], Mapping):
        problems.append("'options' must be an object")
    quality = data.get("min_quality")
    if quality is not None and not (_number(quality) and 0 <= quality <= 100):
        problems.append("'min_quality' must be a number from 0 to 100")
    latency = data.get("max_latency_s")
    if latency is not None and not (_number(latency) and latency > 0):
        problems.append("'max_latency_s' must be a positive number")
    return problems


def check_image_input(data: Mapping[str, Any]) -> list[str]:
    """Problems with an `image` node's input (empty when none)."""
    problems = [f"unknown field {name!r}" for name in sorted(set(data) - _IMAGE_FIELDS)]
    workflow = data.get("workflow")
    if not isinstance(workflow, Mapping) or not workflow:
        return [*problems, "'workflow' must be a ComfyUI workflow in API format (an object)"]
    for node_id, node in workflow.items():
        if not isinstance(node, Mapping) or not isinstance(node.get("class_type"), str):
            problems.append(f"workflow node {node_id!r} has no class_type")
        elif not isinstance(node.get("inputs", {}), Mapping):
            problems.append(f"workflow node {node_id!r}: inputs must be an object")
    inputs = data.get("inputs", {})
    if not isinstance(inputs, Mapping):
        problems.append("'inputs' must be an object of 'node.input' to value")
    else:
        for target in inputs:
            node_id, dot, name = str(target).partition(".")
            if not dot or not name:
                problems.append(f"input {target!r} must be 'node.input', e.g. '6.text'")
            elif node_id not in workflow:
                problems.append(f"input {target!r} names workflow node {node_id!r}, not in it")
    vram = data.get("vram_bytes")
    if vram is not None and not (
        isinstance(vram, int) and not isinstance(vram, bool) and vram >= 0
    ):
        problems.append("'vram_bytes' must be a non-negative integer")
    priority = data.get("priority", 0)
    if not (
        isinstance(priority, int) and not isinstance(priority, bool) and -100 <= priority <= 100
    ):
        problems.append("'priority' must be an integer from -100 to 100")
    return problems


def apply_inputs(workflow: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `workflow` with each `"node.input": value` of `inputs` set."""
    result = copy.deepcopy(dict(workflow))
    for target, value in inputs.items():
        node_id, _, name = target.partition(".")
        result[node_id].setdefault("inputs", {})[name] = value
    return result


# -- the built-in agents --------------------------------------------------------------------


async def run_llm(ctx: NodeContext, data: dict[str, Any]) -> dict[str, Any]:
    """The `llm` agent: one generation through the controller, which picks the model."""
    common: dict[str, Any] = {
        "model": data.get("model", "auto"),
        "options": data.get("options"),
        "min_quality": data.get("min_quality"),
        "max_latency_s": data.get("max_latency_s"),
    }
    try:
        if "messages" in data:
            generation = await ctx.studio.chat(data["messages"], **common)
        else:
            generation = await ctx.studio.generate(
                data["prompt"], system=data.get("system"), **common
            )
    except StudioBusy as exc:
        raise NodeHeld(exc.reason, exc.retry_after_s) from exc
    return {
        "text": generation.text,
        "model": generation.model,
        "agent": generation.agent,
        "reason": generation.reason,
        "prompt_tokens": generation.prompt_tokens,
        "output_tokens": generation.output_tokens,
        "generation_s": round(generation.total_duration_s, 3),
    }


async def _follow(job: ImageJob, hold_wait_s: float, limit_s: float) -> ImageJobInfo | None:
    """The job's final state, following its events on one stream; None when it is still held
    after `hold_wait_s`. A job still going after `limit_s` raises `StudioTimeout`."""
    loop = asyncio.get_running_loop()
    holding = job.info.state == "held"
    if job.done or (holding and hold_wait_s <= 0):
        return None if holding else job.info
    try:
        async with asyncio.timeout(hold_wait_s if holding else limit_s) as scope:
            async with contextlib.aclosing(job.progress()) as updates:
                async for info in updates:
                    if holding and info.state != "held":
                        holding = False
                        scope.reschedule(loop.time() + limit_s)
                    if job.done:
                        return info
    except TimeoutError:
        if holding:
            return None
        raise StudioTimeout(
            f"image job {job.id} still {job.info.state} after {limit_s:g} s", reached_server=True
        ) from None
    except StudioUnavailable as exc:
        # The stream broke off: wait() follows through such breaks.
        log.info("image job %s: following again after: %s", job.id, exc)
    if job.info.state == "held":
        return None
    return await job.wait(limit_s)


async def run_image(ctx: NodeContext, data: dict[str, Any]) -> dict[str, Any]:
    """The `image` agent: one controller image job, submitted under the node's idempotency
    key. A job still held after `hold_wait_s` gives the worker back (`NodeHeld`)."""
    settings = ctx.settings
    workflow = apply_inputs(data["workflow"], data.get("inputs") or {})
    job = await ctx.studio.generate_image(
        workflow,
        vram_bytes=data.get("vram_bytes"),
        priority=data.get("priority", 0),
        idempotency_key=ctx.idempotency_key,
    )
    ctx.add_job(job.id)
    if job.info.state == "held":
        ctx.report("held", f"image job {job.id}: {job.info.reason}")
    else:
        ctx.report("running", f"image job {job.id} {job.info.state}")
    # Waits up to the hard limit: the soft limit, earlier, is what ends a long job cleanly.
    info = await _follow(job, settings.hold_wait_s, settings.time_limit_s)
    if info is None:
        held_s = (clock.utc_now() - job.info.created_at).total_seconds()
        if held_s > settings.hold_timeout_s:
            await job.cancel()
            raise NodeFailed(
                f"image job {job.id} held {held_s:.0f} s, over the limit of "
                f"{settings.hold_timeout_s:g} s: {job.info.reason}"
            )
        raise NodeHeld(f"image job {job.id} held: {job.info.reason}", job.retry_after_s)
    if info.state != "succeeded":
        raise NodeFailed(f"image job {job.id} {info.state}: {info.error or info.reason}")
    return {
        "job_id": job.id,
        "outputs": [ctx.studio.base_url + url for url in info.outputs],
        "agent": info.agent,
        "reason": info.reason,
        "attempts": info.attempts,
    }
