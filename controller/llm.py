"""Routing LLM requests (imperative shell): choose with the core, make room, load, hand over.

`acquire()` asks `select()` for a plan under the shared planning lock, promises the memory a
load needs and counts the request against the model, then carries the plan out on the agent:
unloads (each confirmed on the GPU by the agent), a ComfyUI free, the load. The caller streams the
request through the returned route and calls `release()` (and `record()` with Ollama's final
line, so speeds are learned). While nothing can serve within limits it waits, up to `llm_wait_s`,
for the fleet to change; then it raises `NoCapacity` with the core's reason. A request that can
never be served as asked fails at once: `NotFound` for an unknown model, `BadRequest` for one
its model cannot serve.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from controller.agents import AgentLink
from controller.domain.catalog import DEFAULT_NUM_CTX
from controller.domain.selection import Choice, select
from controller.domain.types import LlmRequest, ModelProfile, PolicyConfig
from controller.errors import AgentRejected, NoCapacity
from controller.fleet import Fleet
from controller.knowledge import Knowledge
from controller.pulse import Pulse
from gpu_common.errors import BadRequest, NotFound

log = logging.getLogger(__name__)

# Longest single wait for a change before planning again.
REPLAN_S = 1.0
# How many ended requests `LlmRouter.recent` keeps, newest first, for the dashboard.
RECENT_REQUESTS = 50


@dataclass
class Route:
    """A request placed on an agent; `release()` it when the request ends.

    `requested` is the model the caller named (an intent such as `auto:fast`, or a model);
    `started_s` when it was placed, on the router's clock."""

    agent: str
    model: str
    reason: str
    link: AgentLink
    loaded: bool
    released: bool = False
    requested: str = ""
    started_s: float = 0.0
    request_id: int = 0


@dataclass(frozen=True, slots=True)
class EndedRequest:
    """An LLM request that ended: served by `model` on `agent` (both empty when it was
    refused), why, and when it started and ended (seconds on the router's clock)."""

    request_id: int
    requested: str
    model: str
    agent: str
    reason: str
    outcome: Literal["served", "refused"]
    started_s: float
    ended_s: float


class LlmRouter:
    """Places LLM requests on agents: one plan per request, made under the planning lock and
    carried out on the chosen agent under its action lock.

    `catalog` gives the model profiles at each plan, `wait_s` is how long a request waits for
    room before `NoCapacity`; `plan_lock` and `pulse` are shared with the image scheduler.
    """

    def __init__(
        self,
        fleet: Fleet,
        knowledge: Knowledge,
        *,
        catalog: Callable[[], Mapping[str, ModelProfile]],
        policy: PolicyConfig,
        plan_lock: asyncio.Lock,
        pulse: Pulse,
        clock: Callable[[], float],
        wait_s: float,
    ) -> None:
        self._fleet = fleet
        self._knowledge = knowledge
        self._catalog = catalog
        self._policy = policy
        self._plan_lock = plan_lock
        self._pulse = pulse
        self._clock = clock
        self._wait_s = wait_s
        self.in_flight = 0
        # The requests being served now, by route identity, and the latest ended ones.
        self.active: dict[int, Route] = {}
        self.recent: deque[EndedRequest] = deque(maxlen=RECENT_REQUESTS)
        # Plans made (selection calls), for the metrics.
        self.decisions = 0
        # Requests waiting for room, by ticket, with the time they started waiting.
        self._waiting: dict[int, float] = {}
        # The same requests' tickets, with the model asked for and the core's latest reason.
        self.waiting: dict[int, tuple[str, str]] = {}
        self._tickets = itertools.count()

    def waiting_since(self) -> float | None:
        """When the longest-waiting request started waiting for room, if any waits (`waiting`
        names, per ticket, the model each asked for and why it waits)."""
        return min(self._waiting.values(), default=None)

    def waiting_started(self, ticket: int) -> float | None:
        """When the request with `ticket` started waiting for room; None if it does not wait."""
        return self._waiting.get(ticket)

    async def acquire(self, request: LlmRequest, *, num_ctx: int | None = None) -> Route:
        """Place `request`: plan, make room, load if needed; returns the route to stream it
        through. Raises `NotFound` for a model no agent offers, `NoCapacity` when nothing can
        serve it within its limits before the wait runs out."""
        started = self._clock()
        deadline = started + self._wait_s
        ticket = next(self._tickets)
        try:
            route = await self._acquire(request, num_ctx, deadline, ticket)
        except (NoCapacity, NotFound) as exc:
            self.recent.appendleft(
                EndedRequest(
                    ticket, request.model, "", "", str(exc), "refused", started, self._clock()
                )
            )
            raise
        finally:
            self._waiting.pop(ticket, None)
            self.waiting.pop(ticket, None)
        route.requested = request.model
        route.started_s = started
        route.request_id = ticket
        self.active[id(route)] = route
        return route

    async def _acquire(
        self, request: LlmRequest, num_ctx: int | None, deadline: float, ticket: int
    ) -> Route:
        fleet = self._fleet
        while True:
            mark = self._pulse.mark()
            async with self._plan_lock:
                now = self._clock()
                catalog = self._catalog()
                decision = select(request, fleet.states(now), catalog, now, self._policy)
                self.decisions += 1
                if isinstance(decision, Choice):
                    book = fleet.books[decision.agent]
                    book.queued[decision.model] += 1
                    book.unloading.update(decision.room.unload)
                    book.freeing_comfy += int(decision.room.free_comfy)
                    token = None
                    if decision.load:
                        token = book.promise(catalog[decision.model].vram_bytes)
            if isinstance(decision, Choice):
                self._waiting.pop(ticket, None)
                self.waiting.pop(ticket, None)
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
            if decision.kind == "unknown":
                raise NotFound(decision.reason)
            if decision.kind == "unsupported":
                raise BadRequest(decision.reason)
            left = deadline - self._clock()
            if left <= 0:
                raise NoCapacity(decision.reason, retry_after_s=decision.retry_after_s)
            self._waiting.setdefault(ticket, self._clock())
            self.waiting[ticket] = (request.model, decision.reason)
            await self._pulse.wait(min(left, REPLAN_S), mark)

    async def _carry_out(self, choice: Choice, token: int | None, num_ctx: int | None) -> Route:
        fleet = self._fleet
        book = fleet.books[choice.agent]
        link = fleet.links[choice.agent]
        try:
            async with fleet.action_locks[choice.agent]:
                for model in choice.room.unload:
                    await link.unload(model)
                    log.info(
                        "unloaded %s on %s to make room for %s", model, link.name, choice.model
                    )
                if choice.room.free_comfy:
                    await link.free()
                    log.info("freed ComfyUI's cache on %s for %s", link.name, choice.model)
                if choice.load:
                    started = self._clock()
                    result = await link.load(choice.model, num_ctx=num_ctx)
                    await self._knowledge.record_load(
                        choice.model,
                        result.context_length or num_ctx or DEFAULT_NUM_CTX,
                        result.vram_bytes,
                        result.size_bytes,
                        result.load_time_s or self._clock() - started,
                    )
                if choice.load or not choice.room.empty:
                    # The marks below come off only once the status shows the changes.
                    await fleet.refresh(choice.agent)
        except BaseException:
            book.queued[choice.model] -= 1
            raise
        finally:
            book.unloading.difference_update(choice.room.unload)
            book.freeing_comfy -= int(choice.room.free_comfy)
            if token is not None:
                book.release(token)
            self._pulse.fire()
        log.debug("route: %s", choice.reason)
        self.in_flight += 1
        return Route(choice.agent, choice.model, choice.reason, link, choice.load)

    def release(self, route: Route) -> None:
        """The request on `route` ended (or failed): count it off its model and agent.
        Releasing twice is harmless."""
        if route.released:
            return
        route.released = True
        if self.active.pop(id(route), None) is not None:
            self.recent.appendleft(
                EndedRequest(
                    route.request_id,
                    route.requested,
                    route.model,
                    route.agent,
                    route.reason,
                    "served",
                    route.started_s,
                    self._clock(),
                )
            )
        book = self._fleet.books[route.agent]
        book.queued[route.model] -= 1
        book.end_request(route.model)
        book.touch(route.model, self._clock())
        self.in_flight -= 1
        self._pulse.fire()

    async def record(self, route: Route, final: dict[str, Any]) -> None:
        """Learn from Ollama's final line of a finished generation."""
        if final.get("done") and not final.get("error"):
            await self._knowledge.record_generation(route.model, final, was_loaded=route.loaded)
