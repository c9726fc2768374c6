"""Making room on one agent: which idle models to unload, whether to free ComfyUI (pure core).

Shared by LLM selection and image admission, so both follow the same rules: busy models are never
evicted, models with queued work are kept, a model loaded less than `min_residency_s` ago is kept
unless the caller is starving, and ComfyUI's cache goes first (it is only a cache).
"""

from __future__ import annotations

from dataclasses import dataclass

from controller.domain.types import AgentState, PolicyConfig, ResidentModel, gb


@dataclass(frozen=True, slots=True)
class RoomPlan:
    """What to do before new work fits: unload these models, maybe free ComfyUI's cache."""

    unload: tuple[str, ...] = ()
    free_comfy: bool = False
    freed_bytes: int = 0

    @property
    def empty(self) -> bool:
        return not self.unload and not self.free_comfy

    def cost_s(self, config: PolicyConfig) -> float:
        """Seconds spent before the memory is back."""
        return len(self.unload) * config.unload_s + (config.free_s if self.free_comfy else 0.0)

    def describe(self) -> str:
        """The steps for a reason text, e.g. "free ComfyUI's cache, unload a"; "" when none."""
        steps = [f"unload {name}" for name in self.unload]
        if self.free_comfy:
            steps.insert(0, "free ComfyUI's cache")
        return ", ".join(steps)


@dataclass(frozen=True, slots=True)
class NoRoom:
    """Why the memory cannot be found now."""

    reason: str


def _evictable(
    model: ResidentModel, agent: AgentState, now: float, config: PolicyConfig, starving: bool
) -> str | None:
    """None if `model` may be unloaded now, else why not."""
    if model.busy:
        return f"{model.name} busy"
    if agent.queued_for(model.name):
        return f"{model.name} has queued requests"
    if not starving and now - model.loaded_at < config.min_residency_s:
        return f"{model.name} loaded {now - model.loaded_at:.0f} s ago"
    return None


def make_room(
    agent: AgentState,
    need_bytes: int,
    now: float,
    config: PolicyConfig,
    *,
    keep: frozenset[str] = frozenset(),
    allow_free_comfy: bool = True,
    starving: bool = False,
) -> RoomPlan | NoRoom:
    """The cheapest plan that frees `need_bytes` beyond what is already free on `agent`.

    ComfyUI's cache goes first; then idle models, least recently used first, but a single idle
    model that covers the whole shortfall is preferred to several. Models in `keep` stay.
    """
    free = agent.free_bytes
    if need_bytes <= free:
        return RoomPlan()
    shortfall = need_bytes - free
    freed = 0
    free_comfy = False
    comfy_bytes = agent.comfy_freeable_bytes if allow_free_comfy else 0
    if comfy_bytes > 0:
        free_comfy = True
        freed += comfy_bytes
        if freed >= shortfall:
            return RoomPlan(free_comfy=True, freed_bytes=freed)

    blocked: list[str] = []
    idle: list[ResidentModel] = []
    for model in agent.resident:
        if model.name in keep:
            continue
        why = _evictable(model, agent, now, config, starving)
        if why is None:
            idle.append(model)
        else:
            blocked.append(why)
    idle.sort(key=lambda m: (m.last_used_at, m.name))
    remaining = shortfall - freed
    single = [m for m in idle if m.vram_bytes >= remaining]
    if single:
        # The smallest model that covers the gap alone: one unload, least memory thrown away.
        chosen = [min(single, key=lambda m: (m.vram_bytes, m.last_used_at, m.name))]
    else:
        chosen = []
        for model in idle:
            if remaining <= 0:
                break
            chosen.append(model)
            remaining -= model.vram_bytes
    freed += sum(m.vram_bytes for m in chosen)
    if freed >= shortfall:
        return RoomPlan(
            unload=tuple(m.name for m in chosen), free_comfy=free_comfy, freed_bytes=freed
        )
    why = f"needs {gb(need_bytes)}, {gb(max(0, free))} free"
    if agent.image_running is not None:
        blocked.insert(0, f"image job {agent.image_running.job_id} running")
    if blocked:
        why += ", " + ", ".join(blocked)
    return NoRoom(reason=why)


def clear_idle(agent: AgentState, now: float, config: PolicyConfig) -> RoomPlan:
    """Everything that may go: for a model too big for the budget, which will spill anyway and
    spills least with the most room. Busy and protected models stay."""
    idle = sorted(
        (m for m in agent.resident if _evictable(m, agent, now, config, starving=False) is None),
        key=lambda m: (m.last_used_at, m.name),
    )
    comfy = agent.comfy_freeable_bytes
    return RoomPlan(
        unload=tuple(m.name for m in idle),
        free_comfy=comfy > 0,
        freed_bytes=comfy + sum(m.vram_bytes for m in idle),
    )
