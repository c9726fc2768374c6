"""Admitting image jobs against each agent's VRAM budget (pure core).

A job runs only where the budget holds its peak on top of what is resident and running. Where it
does not, idle LLMs are unloaded or ComfyUI's cache is freed when that makes room; otherwise the
job is held with its reason ("needs 9.1 GB, 3.0 GB free, qwen2.5:14b busy"). Busy models are never
evicted. A job held longer than `max_hold_s` is starving: minimum residency no longer protects
idle models from it, and its target agent starts no new LLM loads until it runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from controller.domain.room import NoRoom, RoomPlan, make_room
from controller.domain.types import AgentState, ImageJob, PolicyConfig, RunningImage, gb


@dataclass(frozen=True, slots=True)
class Admit:
    """Dispatch `job_id` to `agent` once `room` is carried out."""

    job_id: str
    agent: str
    need_bytes: int
    room: RoomPlan
    reason: str


@dataclass(frozen=True, slots=True)
class Hold:
    """Keep `job_id` waiting. `drain_agent` stops new LLM loads there (the job is starving);
    `impossible` says no healthy agent's whole budget could ever hold it."""

    job_id: str
    reason: str
    drain_agent: str | None = None
    impossible: bool = False


ImageDecision = Admit | Hold


def image_need_bytes(job: ImageJob, agent: AgentState) -> int:
    """Memory the job adds on `agent`: its peak less what ComfyUI already holds that it reuses.

    `peak_bytes` is ComfyUI's whole process at the job's peak; the CUDA context is always there,
    and a checkpoint of the same family is already loaded.
    """
    reused = agent.comfy_bytes if agent.comfy_family == job.family else agent.comfy_floor_bytes
    return max(0, job.peak_bytes - reused)


def _order(
    jobs: Sequence[ImageJob], agents: Sequence[AgentState], now: float, config: PolicyConfig
) -> list[ImageJob]:
    """Starving jobs first, then priority, then jobs for an already loaded family (batching),
    then age."""
    cached = {a.comfy_family for a in agents if a.comfy_family}

    def key(job: ImageJob) -> tuple[int, int, int, float, str]:
        starving = now - job.submitted_at > config.max_hold_s
        return (
            0 if starving else 1,
            -job.priority,
            0 if job.family in cached else 1,
            job.submitted_at,
            job.job_id,
        )

    return sorted(jobs, key=key)


def _blocking_bytes(agent: AgentState) -> int:
    """Memory on `agent` that no plan can take back soon: busy models and a running image."""
    busy = sum(m.vram_bytes for m in agent.resident if m.busy)
    running = agent.image_running.peak_bytes if agent.image_running else 0
    return busy + running


def plan_images(
    jobs: Sequence[ImageJob],
    agents: Sequence[AgentState],
    now: float,
    config: PolicyConfig = PolicyConfig(),
    *,
    llm_waiting_since: float | None = None,
) -> list[ImageDecision]:
    """One decision per job. Each admission is charged to its agent before the next job is
    considered, so two jobs never spend the same free memory. ComfyUI runs one prompt at a time,
    so an agent takes at most one job per round and none while one runs.

    `llm_waiting_since`: an LLM request has been waiting for room since then. Interactive
    requests are short, so an image job held less than `image_yield_s` waits for them rather
    than take the room they are waiting for; an older job competes on equal terms.
    """
    state = {a.name: a for a in agents}
    decisions: list[ImageDecision] = []
    for job in _order(jobs, agents, now, config):
        starving = now - job.submitted_at > config.max_hold_s
        yields = now - job.submitted_at < config.image_yield_s
        if llm_waiting_since is not None and yields:
            waited = now - llm_waiting_since
            decisions.append(
                Hold(
                    job.job_id, f"an LLM request has waited {waited:.0f} s for room; it goes first"
                )
            )
            continue
        candidates: list[tuple[tuple[float, int, str], Admit]] = []
        reasons: list[str] = []
        for agent in sorted(state.values(), key=lambda a: a.name):
            if not agent.healthy:
                reasons.append(f"{agent.name} {agent.unhealthy_reason or 'unhealthy'}")
                continue
            if agent.image_running is not None:
                reasons.append(f"{agent.name} busy with image job {agent.image_running.job_id}")
                continue
            need = image_need_bytes(job, agent)
            if need > agent.budget_bytes:
                reasons.append(
                    f"needs {gb(need)}, more than {agent.name}'s {gb(agent.budget_bytes)} budget"
                )
                continue
            # Freeing ComfyUI would throw away the checkpoint this job counts on reusing.
            reuses_cache = agent.comfy_family == job.family
            room = make_room(
                agent, need, now, config, starving=starving, allow_free_comfy=not reuses_cache
            )
            if isinstance(room, NoRoom):
                reasons.append(room.reason if len(state) == 1 else f"{agent.name}: {room.reason}")
                continue
            if room.empty:
                why = f"needs {gb(need)}, {gb(agent.free_bytes)} free on {agent.name}"
            else:
                why = (
                    f"needs {gb(need)}, {gb(max(0, agent.free_bytes))} free on {agent.name}: "
                    f"{room.describe()} first"
                )
            rank = (room.cost_s(config), len(room.unload), agent.name)
            candidates.append((rank, Admit(job.job_id, agent.name, need, room, why)))
        if candidates:
            admit = min(candidates, key=lambda c: c[0])[1]
            decisions.append(admit)
            chosen = state[admit.agent]
            freed_models = set(admit.room.unload)
            state[admit.agent] = dataclasses.replace(
                chosen,
                resident=tuple(m for m in chosen.resident if m.name not in freed_models),
                used_bytes=chosen.used_bytes
                - sum(m.vram_bytes for m in chosen.resident if m.name in freed_models)
                - (chosen.comfy_freeable_bytes if admit.room.free_comfy else 0),
                comfy_bytes=chosen.comfy_floor_bytes
                if admit.room.free_comfy
                else chosen.comfy_bytes,
                pending_bytes=chosen.pending_bytes + admit.need_bytes,
                image_running=RunningImage(job.job_id, job.peak_bytes, job.family, now),
            )
            continue
        drain = None
        if starving:
            eligible = [
                a
                for a in state.values()
                if a.healthy and image_need_bytes(job, a) <= a.budget_bytes
            ]
            if eligible:
                drain = min(eligible, key=lambda a: (_blocking_bytes(a), a.name)).name
        reason = "; ".join(dict.fromkeys(reasons)) or "no agent"
        if drain is not None:
            reason += f"; waited {now - job.submitted_at:.0f} s, so {drain} starts no new LLM loads"
        healthy = [a for a in state.values() if a.healthy]
        impossible = bool(healthy) and all(
            image_need_bytes(job, a) > a.budget_bytes for a in healthy
        )
        decisions.append(Hold(job.job_id, reason, drain, impossible))
    return decisions
