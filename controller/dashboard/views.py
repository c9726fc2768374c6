"""What the dashboard shows, gathered from the engine in one pass (adapter layer).

`dashboard_state()` reads the engine as it is now: agents with their health and GPUs, resident
models, image jobs held (with the core's reason), out at an agent (with node and step) and
recently ended, LLM requests being served and recently ended (with the chosen model and why),
and the learned catalogue. Times go out as wall-clock timestamps, so the page can count waits
and expiries against the state's `now`; the engine's clock readings are converted here.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

from pydantic import Field

from controller import __version__
from controller.domain.types import AgentState
from controller.engine import Engine, service_trouble
from controller.llm import EndedRequest, Route
from controller.schema import ModelsInfo, ProgressInfo
from controller.store import JobRecord
from gpu_common.schema import GpuInfo, WireModel


class GpuView(WireModel):
    """One card now: memory by owner (bytes), load, temperature and power."""

    index: int
    name: str
    total_bytes: int
    used_bytes: int
    desktop_bytes: int = Field(description="processes that are neither Ollama nor ComfyUI")
    ollama_bytes: int
    comfyui_bytes: int
    other_bytes: int = Field(description="used memory no process accounts for")
    utilization_percent: int | None
    temperature_c: int | None
    power_w: float | None
    power_limit_w: float | None


class ResidentView(WireModel):
    """A model loaded on an agent, as Ollama reports it, and whether it may be unloaded now."""

    name: str
    vram_bytes: int
    size_bytes: int
    context_length: int | None
    expires_at: datetime | None
    in_flight: int
    offloaded: bool
    idle: bool = Field(description="nothing in flight or on its way: it may be unloaded by hand")


class AgentView(WireModel):
    """An agent: health and why not, its link, its budget, its GPUs and resident models."""

    name: str
    url: str
    healthy: bool
    reason: str | None
    connected: bool
    snapshot_at: datetime | None
    ollama: str = Field(description="'up 0.x' or why Ollama does not answer")
    comfyui: str = Field(description="how the agent follows ComfyUI, and its queue")
    draining: bool
    budget_bytes: int
    used_bytes: int
    pending_bytes: int
    free_bytes: int
    gpus: list[GpuView]
    resident: list[ResidentView]


class JobView(WireModel):
    """An image job for the page: its state and why, where it runs and how far it got."""

    id: str
    state: str
    reason: str
    agent: str | None
    family: str | None
    size: str
    vram_bytes: int
    priority: int
    attempts: int
    created_at: datetime
    updated_at: datetime
    progress: ProgressInfo | None
    error: str | None
    outputs: int


class LlmView(WireModel):
    """An LLM request: what was asked for, what serves it and why, since when and how long."""

    id: int
    requested: str
    model: str
    agent: str
    reason: str
    outcome: Literal["waiting", "serving", "served", "refused"]
    started_at: datetime
    duration_s: float | None


class DashboardState(WireModel):
    """Everything the page shows at one instant."""

    now: datetime
    version: str
    agents: list[AgentView]
    held: list[JobView]
    running: list[JobView]
    recent_jobs: list[JobView]
    llm_active: list[LlmView]
    llm_recent: list[LlmView]
    catalogue: ModelsInfo
    jobs_by_state: dict[str, int]


def gpu_view(gpu: GpuInfo) -> GpuView:
    """A card's latest reading, memory split by owner."""
    owners = gpu.memory_by_owner_bytes
    ollama = owners.get("ollama", 0)
    comfyui = owners.get("comfyui", 0)
    desktop = owners.get("other", 0)
    return GpuView(
        index=gpu.index,
        name=gpu.name,
        total_bytes=gpu.memory_total_bytes,
        used_bytes=gpu.memory_used_bytes,
        desktop_bytes=desktop,
        ollama_bytes=ollama,
        comfyui_bytes=comfyui,
        other_bytes=max(0, gpu.memory_used_bytes - desktop - ollama - comfyui),
        utilization_percent=gpu.utilization_gpu_percent,
        temperature_c=gpu.temperature_c,
        power_w=gpu.power_w,
        power_limit_w=gpu.power_limit_w,
    )


def _agent_view(engine: Engine, state: AgentState) -> AgentView:
    link = engine.links[state.name]
    status = link.status
    idle = {m.name for m in state.resident if not m.busy and not state.queued_for(m.name)}
    if status is None:
        ollama, comfyui, snapshot_at = "no snapshot yet", "no snapshot yet", None
        gpus: list[GpuView] = []
        resident: list[ResidentView] = []
    else:
        o, c = status.ollama, status.comfyui
        ollama = f"up {o.version or ''}".strip() if o.reachable else f"down: {o.error or '?'}"
        comfyui = (
            f"{c.connection}, {c.queue_running} running, {c.queue_pending} queued"
            if c.reachable
            else "unreachable"
        )
        snapshot_at = status.now
        gpus = [gpu_view(g) for g in status.telemetry.gpus]
        resident = [
            ResidentView(
                name=m.name,
                vram_bytes=m.vram_bytes,
                size_bytes=m.size_bytes,
                context_length=m.context_length,
                expires_at=m.expires_at,
                in_flight=m.in_flight,
                offloaded=m.offloaded,
                idle=m.name in idle,
            )
            for m in status.ollama.resident
        ]
    return AgentView(
        name=state.name,
        url=link.url,
        healthy=state.healthy,
        reason=state.unhealthy_reason or service_trouble(status),
        connected=link.connected,
        snapshot_at=snapshot_at,
        ollama=ollama,
        comfyui=comfyui,
        draining=state.held_image_since is not None,
        budget_bytes=state.budget_bytes,
        used_bytes=state.used_bytes,
        pending_bytes=state.pending_bytes,
        free_bytes=state.free_bytes,
        gpus=gpus,
        resident=resident,
    )


def job_view(engine: Engine, record: JobRecord) -> JobView:
    """An image job as the page shows it, with its latest progress."""
    info = engine.images.info(record)
    return JobView(
        id=record.job_id,
        state=record.state,
        reason=record.reason,
        agent=record.agent,
        family=record.family,
        size=f"{record.width or '?'}x{record.height or '?'}"
        + (f" x{record.batch}" if record.batch and record.batch > 1 else ""),
        vram_bytes=info.vram_bytes or 0,
        priority=record.priority,
        attempts=record.attempts,
        created_at=record.created_at,
        updated_at=record.updated_at,
        progress=info.progress,
        error=record.error,
        outputs=len(record.outputs),
    )


def _llm_active(route: Route, origin: datetime, now: float) -> LlmView:
    return LlmView(
        id=route.request_id,
        requested=route.requested,
        model=route.model,
        agent=route.agent,
        reason=route.reason,
        outcome="serving",
        started_at=_wall(route.started_s, origin),
        duration_s=round(now - route.started_s, 3),
    )


def _llm_waiting(engine: Engine, ticket: int, origin: datetime, now: float) -> LlmView:
    requested, reason = engine.llm.waiting[ticket]
    since = engine.llm.waiting_started(ticket) or now
    return LlmView(
        id=ticket,
        requested=requested,
        model="",
        agent="",
        reason=reason,
        outcome="waiting",
        started_at=_wall(since, origin),
        duration_s=round(now - since, 3),
    )


def _llm_ended(ended: EndedRequest, origin: datetime) -> LlmView:
    return LlmView(
        id=ended.request_id,
        requested=ended.requested,
        model=ended.model,
        agent=ended.agent,
        reason=ended.reason,
        outcome=ended.outcome,
        started_at=_wall(ended.started_s, origin),
        duration_s=round(ended.ended_s - ended.started_s, 3),
    )


def _wall(clock_s: float, origin: datetime) -> datetime:
    """A reading of the engine's clock as wall-clock time; `origin` is the wall time of 0."""
    return origin + timedelta(seconds=clock_s)


def dashboard_state(engine: Engine) -> DashboardState:
    """The whole page's content now."""
    now = engine.clock()
    wall = engine.wall()
    origin = wall - timedelta(seconds=now)
    images = engine.images
    return DashboardState(
        now=wall,
        version=__version__,
        agents=[_agent_view(engine, state) for state in engine.states(now)],
        held=[job_view(engine, r) for r in images.held()],
        running=[job_view(engine, r) for r in images.active()],
        recent_jobs=[job_view(engine, r) for r in images.recent],
        llm_active=[
            *(_llm_waiting(engine, ticket, origin, now) for ticket in sorted(engine.llm.waiting)),
            *(
                _llm_active(route, origin, now)
                for route in sorted(engine.llm.active.values(), key=lambda r: r.started_s)
            ),
        ],
        llm_recent=[_llm_ended(ended, origin) for ended in engine.llm.recent],
        catalogue=engine.models_info(),
        jobs_by_state=images.counts(),
    )
