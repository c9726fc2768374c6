"""The controller's engine (imperative shell): agent state in, core decisions out, actions done.

One request's path reads top to bottom: the API validates a wire model; the engine gathers each
agent's state (`ledger.agent_state`), calls the pure core with plain values and `now`, carries out
the decision through the agent links, and logs the reason. Planning happens under one lock, and
every decision promises its memory in the ledger before the lock is released, so two decisions
never spend the same free bytes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from datetime import datetime

from controller.agents import AgentLink
from controller.domain.types import AgentState, ModelProfile
from controller.errors import AgentError
from controller.knowledge import Knowledge
from controller.ledger import AgentBook, agent_state
from controller.pulse import Pulse
from controller.schema import AgentInfo, FleetInfo, HeldJobInfo, ModelInfo, ModelsInfo
from controller.settings import ControllerSettings
from controller.store import AsyncJobStore
from gpu_common import clock as clock_mod
from gpu_common.schema import AgentEvent, AgentStatus, AvailableModelInfo

log = logging.getLogger(__name__)


def service_trouble(status: AgentStatus | None) -> str | None:
    """Why part of a healthy agent cannot serve: its Ollama or its ComfyUI does not answer.
    The agent still takes the work the other one can do, so this does not make it unhealthy."""
    if status is None:
        return None
    troubles = []
    if not status.ollama.reachable:
        troubles.append(f"Ollama unreachable: {status.ollama.error or 'no reason given'}")
    if not status.comfyui.reachable:
        troubles.append("ComfyUI unreachable")
    return "; ".join(troubles) or None


class Engine:
    """Owns the agent links, the ledger and the learned knowledge; hosts the two schedulers."""

    def __init__(
        self,
        settings: ControllerSettings,
        store: AsyncJobStore,
        *,
        clock: Callable[[], float] = clock_mod.monotonic_s,
        wall: Callable[[], datetime] = clock_mod.utc_now,
    ) -> None:
        from controller.images import ImageScheduler
        from controller.llm import LlmRouter

        self.settings = settings
        self.store = store
        self.clock = clock
        self.wall = wall
        self.policy = settings.policy_config()
        self.knowledge = Knowledge(store, settings.quality)
        self.links: dict[str, AgentLink] = {}
        for endpoint in settings.agents:
            self.links[endpoint.name] = AgentLink(
                endpoint.name,
                endpoint.url,
                settings.agent_token(endpoint),
                request_timeout_s=settings.request_timeout_s,
                load_timeout_s=settings.load_timeout_s,
                stale_after_s=settings.stale_after_s,
                on_event=self._on_agent_event,
                monotonic=clock,
            )
        self.books = {name: AgentBook(name) for name in self.links}
        # Per agent, the link's stream count at its latest snapshot (see `_on_agent_event`).
        self._streams_seen = {name: 0 for name in self.links}
        self.plan_lock = asyncio.Lock()
        # Actions on one agent (unloads, frees, loads) run one at a time, in decision order.
        self.action_locks = {name: asyncio.Lock() for name in self.links}
        self.pulse = Pulse()
        self.decisions = 0
        self.llm = LlmRouter(self)
        self.images = ImageScheduler(self)

    async def start(self) -> None:
        await self.knowledge.load()
        for link in self.links.values():
            await link.start()
        await self.images.start()

    async def stop(self) -> None:
        await self.images.stop()
        for link in self.links.values():
            await link.stop()

    # -- state ----------------------------------------------------------------------------

    def _on_agent_event(self, agent: str, event: AgentEvent) -> None:
        if event.type == "snapshot" and event.status is not None:
            self.books[agent].observe(event.status, self.clock())
            opened = self.links[agent].streams_opened
            if opened != self._streams_seen[agent]:
                # A new stream: prompt events sent while there was none (a cut link, an agent
                # restart) were missed, so the jobs out there are asked about now.
                self._streams_seen[agent] = opened
                self.images.agent_reconnected(agent)
        elif event.type == "prompt" and event.prompt is not None:
            self.images.on_prompt(agent, event.prompt)
        self.pulse.fire()

    def state_of(self, name: str, now: float) -> AgentState:
        link = self.links[name]
        healthy, reason = link.health()
        return agent_state(
            self.books[name],
            link.status,
            healthy=healthy,
            reason=reason,
            reserve_bytes=self.settings.reserve_bytes,
            now=now,
        )

    async def refresh(self, name: str) -> None:
        """Read agent `name`'s status now, after an action changed it; the next snapshot
        serves if it cannot be read."""
        try:
            await self.links[name].refresh()
        except AgentError as exc:
            log.info("status of %s not refreshed: %s", name, exc)

    def states(self, now: float) -> list[AgentState]:
        return [self.state_of(name, now) for name in sorted(self.links)]

    def available(self) -> Iterable[AvailableModelInfo]:
        for name in sorted(self.links):
            status = self.links[name].status
            if status is not None:
                yield from status.ollama.available

    def catalog(self) -> dict[str, ModelProfile]:
        return self.knowledge.catalog(self.available())

    # -- views ----------------------------------------------------------------------------

    def models_info(self) -> ModelsInfo:
        catalog = self.catalog()
        now = self.clock()
        states = self.states(now)
        budgets = [s.budget_bytes for s in states if s.total_bytes]
        smallest = min(budgets) if budgets else 0
        offered: dict[str, list[str]] = {}
        for name in sorted(self.links):
            status = self.links[name].status
            for model in status.ollama.available if status else []:
                offered.setdefault(model.name, []).append(name)
        models = []
        for name, profile in sorted(catalog.items()):
            speed = self.knowledge.speeds.get(name)
            models.append(
                ModelInfo(
                    name=name,
                    quality=profile.quality,
                    vram_bytes=profile.vram_bytes,
                    size_bytes=profile.size_bytes,
                    fits=profile.size_bytes <= smallest,
                    decode_tokens_per_s=round(profile.decode_tokens_per_s, 2),
                    prompt_tokens_per_s=round(profile.prompt_tokens_per_s, 2),
                    load_s=round(profile.load_s, 3),
                    measured=profile.measured,
                    samples=speed.samples if speed else 0,
                    agents=offered.get(name, []),
                    resident_on=[s.name for s in states if s.resident_model(name)],
                )
            )
        return ModelsInfo(models=models, image_footprints_bytes=dict(self.knowledge.image_peaks))

    def fleet_info(self) -> FleetInfo:
        now = self.clock()
        agents = []
        for state in self.states(now):
            link = self.links[state.name]
            status = link.status
            age = link.age_s()
            agents.append(
                AgentInfo(
                    name=state.name,
                    url=link.url,
                    healthy=state.healthy,
                    reason=state.unhealthy_reason or service_trouble(status),
                    connected=link.connected,
                    age_s=round(age, 3) if age is not None else None,
                    budget_bytes=state.budget_bytes,
                    used_bytes=state.used_bytes,
                    pending_bytes=state.pending_bytes,
                    free_bytes=state.free_bytes,
                    draining=state.held_image_since is not None,
                    gpus=status.telemetry.gpus if status else [],
                    resident=status.ollama.resident if status else [],
                    comfyui_connection=status.comfyui.connection if status else None,
                    image_running=state.image_running.job_id if state.image_running else None,
                )
            )
        held = [
            HeldJobInfo(
                id=job.job_id,
                reason=job.reason,
                waiting_s=round((self.wall() - job.created_at).total_seconds(), 3),
                vram_bytes=self.images.expected_peak(job),
                family=job.family,
            )
            for job in self.images.held()
        ]
        return FleetInfo(agents=agents, held_jobs=held, jobs_by_state=self.images.counts())
