"""The controller's engine (imperative shell): agent state in, core decisions out, actions done.

One request's path reads top to bottom: the API validates a wire model; the engine gathers each
agent's state (`ledger.agent_state`), calls the pure core with plain values and `now`, carries out
the decision through the agent links, and logs the reason. Planning happens under one lock, and
every decision promises its memory in the ledger before the lock is released, so two decisions
never spend the same free bytes.

The engine composes the parts: the agents (`Fleet`), the learned knowledge, and the two
schedulers, each built from what it uses (`LlmRouter`, `ImageScheduler`); neither knows the
engine.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterable
from datetime import datetime

from controller.agents import AgentLink
from controller.domain.types import AgentState, ModelProfile
from controller.fleet import Fleet
from controller.image_inputs import InputFiles, InputLimits
from controller.images import ImageScheduler
from controller.knowledge import Knowledge
from controller.llm import LlmRouter
from controller.pulse import Pulse
from controller.schema import AgentInfo, FleetInfo, HeldJobInfo, ModelInfo, ModelsInfo
from controller.settings import ControllerSettings
from controller.store import AsyncJobStore
from gpu_common import clock as clock_mod
from gpu_common.schema import AgentEvent, AgentStatus, AvailableModelInfo


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
    """Composes the controller: the agents (`fleet`: links and ledger books), the learned
    knowledge and the two schedulers built from them; routes the agents' events to them and
    answers the fleet and model views."""

    def __init__(
        self,
        settings: ControllerSettings,
        store: AsyncJobStore,
        *,
        clock: Callable[[], float] = clock_mod.monotonic_s,
        wall: Callable[[], datetime] = clock_mod.utc_now,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.wall = wall
        self.policy = settings.policy_config()
        self.knowledge = Knowledge(store, settings.quality)
        links: dict[str, AgentLink] = {}
        for endpoint in settings.agents:
            links[endpoint.name] = AgentLink(
                endpoint.name,
                endpoint.url,
                settings.agent_token(endpoint),
                request_timeout_s=settings.request_timeout_s,
                load_timeout_s=settings.load_timeout_s,
                stale_after_s=settings.stale_after_s,
                on_event=self._on_agent_event,
                monotonic=clock,
                rng=rng,
            )
        self.fleet = Fleet(links, reserve_bytes=settings.reserve_bytes)
        self.links = self.fleet.links
        self.books = self.fleet.books
        # Per agent, the link's stream count at its latest snapshot (see `_on_agent_event`).
        self._streams_seen = {name: 0 for name in self.links}
        # One planning lock for both schedulers: no two decisions spend the same free bytes.
        self.plan_lock = asyncio.Lock()
        self.pulse = Pulse()
        self.llm = LlmRouter(
            self.fleet,
            self.knowledge,
            catalog=self.catalog,
            policy=self.policy,
            plan_lock=self.plan_lock,
            pulse=self.pulse,
            clock=clock,
            wait_s=settings.llm_wait_s,
        )
        self.images = ImageScheduler(
            store,
            self.fleet,
            self.knowledge,
            policy=self.policy,
            plan_lock=self.plan_lock,
            pulse=self.pulse,
            clock=clock,
            wall=wall,
            llm_waiting_since=self.llm.waiting_since,
            outputs_dir=settings.data_dir / "outputs",
            tick_interval_s=settings.tick_interval_s,
            max_attempts=settings.max_image_attempts,
            inputs=InputFiles(settings.data_dir / "inputs"),
        )
        self.input_limits = InputLimits(
            max_bytes=settings.max_input_bytes,
            max_pixels=settings.max_input_pixels,
            max_count=settings.max_inputs,
        )

    @property
    def decisions(self) -> int:
        """Plans made so far, LLM selections and image admission passes together."""
        return self.llm.decisions + self.images.decisions

    async def start(self) -> None:
        """Load what was learned, connect to the agents, resume the image jobs."""
        await self.knowledge.load()
        for link in self.links.values():
            await link.start()
        await self.images.start()

    async def stop(self) -> None:
        """Stop the image scheduler, then the agent links."""
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

    def states(self, now: float) -> list[AgentState]:
        """Every agent's state at `now`, by name."""
        return self.fleet.states(now)

    def available(self) -> Iterable[AvailableModelInfo]:
        """Every model the agents' Ollama offer, agent by agent (a model may repeat)."""
        for name in sorted(self.links):
            status = self.links[name].status
            if status is not None:
                yield from status.ollama.available

    def catalog(self) -> dict[str, ModelProfile]:
        """One profile per model any agent offers, from what has been learned of it."""
        # The latest status objects say whether a snapshot came since the last catalogue.
        snapshots = [self.links[name].status for name in sorted(self.links)]
        return self.knowledge.catalog(self.available(), snapshots=snapshots)

    # -- views ----------------------------------------------------------------------------

    def models_info(self) -> ModelsInfo:
        """The model catalogue as the API shows it: what is believed and measured of each."""
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
                    embedding=profile.embedding,
                )
            )
        return ModelsInfo(models=models, image_footprints_bytes=dict(self.knowledge.image_peaks))

    def fleet_info(self) -> FleetInfo:
        """The agents and the held image jobs as the API shows them."""
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
