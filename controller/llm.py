"""Routing LLM requests (imperative shell): choose with the core, make room, load, hand over.

`acquire()` asks `select()` for a plan under the engine's planning lock, promises the memory a
load needs and counts the request against the model, then carries the plan out on the agent:
unloads (each confirmed on the GPU by the agent), a ComfyUI free, the load. The caller streams the
request through the returned route and calls `release()` (and `record()` with Ollama's final
line, so speeds are learned). While nothing can serve within limits it waits, up to `llm_wait_s`,
for the fleet to change; then it raises `NoCapacity` with the core's reason.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from controller.agents import AgentLink
from controller.domain.catalog import DEFAULT_NUM_CTX
from controller.domain.selection import Choice, select
from controller.domain.types import LlmRequest
from controller.errors import AgentRejected, NoCapacity
from gpu_common.errors import NotFound

if TYPE_CHECKING:
    from controller.engine import Engine

log = logging.getLogger(__name__)

# Longest single wait for a change before planning again.
REPLAN_S = 1.0


@dataclass
class Route:
    """A request placed on an agent; `release()` it when the request ends."""

    agent: str
    model: str
    reason: str
    link: AgentLink
    loaded: bool
    released: bool = False


class LlmRouter:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.in_flight = 0
        # Requests waiting for room, by ticket, with the time they started waiting.
        self._waiting: dict[int, float] = {}
        self._tickets = itertools.count()

    @property
    def waiting_since(self) -> float | None:
        """When the longest-waiting request started waiting for room, if any waits."""
        return min(self._waiting.values(), default=None)

    async def acquire(self, request: LlmRequest, *, num_ctx: int | None = None) -> Route:
        engine = self._engine
        deadline = engine.clock() + engine.settings.llm_wait_s
        ticket = next(self._tickets)
        try:
            return await self._acquire(request, num_ctx, deadline, ticket)
        finally:
            self._waiting.pop(ticket, None)

    async def _acquire(
        self, request: LlmRequest, num_ctx: int | None, deadline: float, ticket: int
    ) -> Route:
        engine = self._engine
        while True:
            mark = engine.pulse.mark()
            async with engine.plan_lock:
                now = engine.clock()
                catalog = engine.catalog()
                decision = select(request, engine.states(now), catalog, now, engine.policy)
                engine.decisions += 1
                if isinstance(decision, Choice):
                    book = engine.books[decision.agent]
                    book.queued[decision.model] += 1
                    book.unloading.update(decision.room.unload)
                    book.freeing_comfy += int(decision.room.free_comfy)
                    token = None
                    if decision.load:
                        token = book.promise(catalog[decision.model].vram_bytes)
            if isinstance(decision, Choice):
                self._waiting.pop(ticket, None)
                try:
                    return await self._carry_out(decision, token, num_ctx)
                except AgentRejected as exc:
                    if exc.status != 409:
                        raise
                    # A model we meant to unload became busy meanwhile: plan again.
                    log.info(
                        "plan for %s hit a busy model (%s); planning again", request.model, exc
                    )
                    continue
            if decision.retry_after_s == 0:
                raise NotFound(decision.reason)
            left = deadline - engine.clock()
            if left <= 0:
                raise NoCapacity(decision.reason, retry_after_s=decision.retry_after_s)
            self._waiting.setdefault(ticket, engine.clock())
            await engine.pulse.wait(min(left, REPLAN_S), mark)

    async def _carry_out(self, choice: Choice, token: int | None, num_ctx: int | None) -> Route:
        engine = self._engine
        book = engine.books[choice.agent]
        link = engine.links[choice.agent]
        try:
            async with engine.action_locks[choice.agent]:
                for model in choice.room.unload:
                    await link.unload(model)
                    log.info(
                        "unloaded %s on %s to make room for %s", model, link.name, choice.model
                    )
                if choice.room.free_comfy:
                    await link.free()
                    log.info("freed ComfyUI's cache on %s for %s", link.name, choice.model)
                if choice.load:
                    started = engine.clock()
                    result = await link.load(choice.model, num_ctx=num_ctx)
                    await engine.knowledge.record_load(
                        choice.model,
                        result.context_length or num_ctx or DEFAULT_NUM_CTX,
                        result.vram_bytes,
                        result.size_bytes,
                        result.load_time_s or engine.clock() - started,
                    )
                if choice.load or not choice.room.empty:
                    # The marks below come off only once the status shows the changes.
                    await engine.refresh(choice.agent)
        except BaseException:
            book.queued[choice.model] -= 1
            raise
        finally:
            book.unloading.difference_update(choice.room.unload)
            book.freeing_comfy -= int(choice.room.free_comfy)
            if token is not None:
                book.release(token)
            engine.pulse.fire()
        log.debug("route: %s", choice.reason)
        self.in_flight += 1
        return Route(choice.agent, choice.model, choice.reason, link, choice.load)

    def release(self, route: Route) -> None:
        if route.released:
            return
        route.released = True
        engine = self._engine
        book = engine.books[route.agent]
        book.queued[route.model] -= 1
        book.end_request(route.model)
        book.touch(route.model, engine.clock())
        self.in_flight -= 1
        engine.pulse.fire()

    async def record(self, route: Route, final: dict[str, Any]) -> None:
        """Learn from Ollama's final line of a finished generation."""
        if final.get("done") and not final.get("error"):
            await self._engine.knowledge.record_generation(
                route.model, final, was_loaded=route.loaded
            )
