"""Choosing the agent and model for one LLM request (pure core).

Intents: an explicit model name is honoured; "auto:fast" takes the lowest expected latency;
"auto:quality" the highest quality; "auto" the fastest model whose quality is within
`auto_quality_slack` of the best candidate. Constraints (`min_quality`, `max_latency_s`) filter
first. No auto plan ever spills to the CPU, resident models win by costing no load, and a plan
that needs room names exactly what it will unload.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from controller.domain.room import NoRoom, RoomPlan, clear_idle, make_room
from controller.domain.types import AgentState, LlmRequest, ModelProfile, PolicyConfig, gb

AUTO_INTENTS = ("auto", "auto:fast", "auto:quality")


@dataclass(frozen=True, slots=True)
class Choice:
    """Serve the request with `model` on `agent`, after `room` (and a load when `load`)."""

    agent: str
    model: str
    expected_latency_s: float
    quality: float
    load: bool
    room: RoomPlan
    spills: bool
    reason: str


@dataclass(frozen=True, slots=True)
class NoChoice:
    """Nothing can serve the request within its limits now."""

    reason: str
    retry_after_s: float


Selection = Choice | NoChoice


@dataclass(frozen=True, slots=True)
class _Option:
    agent: str
    model: str
    latency_s: float
    quality: float
    load: bool
    room: RoomPlan
    spills: bool
    note: str


def _request_seconds(profile: ModelProfile, prompt_tokens: int, output_tokens: int) -> float:
    return prompt_tokens / profile.prompt_tokens_per_s + output_tokens / profile.decode_tokens_per_s


def _draining(agent: AgentState, now: float, config: PolicyConfig) -> bool:
    """An image job has waited past its bound on this agent: no new loads start here."""
    return agent.held_image_since is not None and now - agent.held_image_since > config.max_hold_s


def _option(
    agent: AgentState,
    profile: ModelProfile,
    request: LlmRequest,
    now: float,
    config: PolicyConfig,
    explicit: bool,
) -> _Option | str:
    output_tokens = request.output_tokens or config.default_output_tokens
    own = _request_seconds(profile, request.prompt_tokens, output_tokens)
    typical = _request_seconds(profile, request.prompt_tokens, config.default_output_tokens)
    resident = agent.resident_model(profile.name)
    if resident is not None:
        ahead = resident.in_flight + agent.queued_for(profile.name)
        latency = ahead * typical + own
        if resident.spilled and not explicit:
            return f"{profile.name} on {agent.name} is resident but partly on the CPU"
        note = "resident" + (f", {ahead} ahead" if ahead else "")
        return _Option(
            agent.name,
            profile.name,
            latency,
            profile.quality,
            False,
            RoomPlan(),
            resident.spilled,
            note,
        )
    spills = profile.size_bytes > agent.budget_bytes
    if spills and not explicit:
        return (
            f"{profile.name} needs {gb(profile.size_bytes)}, more than {agent.name}'s "
            f"{gb(agent.budget_bytes)} budget"
        )
    if _draining(agent, now, config):
        return f"{agent.name} holds new loads for an image job waiting too long"
    room = (
        clear_idle(agent, now, config)
        if spills
        else make_room(agent, profile.vram_bytes, now, config)
    )
    if isinstance(room, NoRoom):
        return f"{profile.name} on {agent.name}: {room.reason}"
    latency = room.cost_s(config) + profile.load_s + own
    note = f"load {profile.load_s:.1f} s"
    if not room.empty:
        note += f" after: {room.describe()}"
    return _Option(agent.name, profile.name, latency, profile.quality, True, room, spills, note)


def select(
    request: LlmRequest,
    agents: Sequence[AgentState],
    catalog: Mapping[str, ModelProfile],
    now: float,
    config: PolicyConfig = PolicyConfig(),
) -> Selection:
    """Pick agent and model for `request`, or say why nothing can serve it now."""
    intent = request.model
    explicit = intent not in AUTO_INTENTS
    if explicit:
        if intent not in catalog:
            return NoChoice(f"unknown model {intent!r}", retry_after_s=0.0)
        profiles = [catalog[intent]]
    else:
        profiles = sorted(catalog.values(), key=lambda p: p.name)
    healthy = sorted((a for a in agents if a.healthy), key=lambda a: a.name)
    if not healthy:
        reasons = [f"{a.name}: {a.unhealthy_reason or 'unhealthy'}" for a in agents]
        return NoChoice("no healthy agent" + (f" ({'; '.join(reasons)})" if reasons else ""), 5.0)

    options: list[_Option] = []
    rejected: list[str] = []
    for agent in healthy:
        for profile in profiles:
            if request.min_quality is not None and profile.quality < request.min_quality:
                rejected.append(
                    f"{profile.name} quality {profile.quality:.0f} < {request.min_quality:.0f}"
                )
                continue
            option = _option(agent, profile, request, now, config, explicit)
            if isinstance(option, str):
                rejected.append(option)
                continue
            if request.max_latency_s is not None and option.latency_s > request.max_latency_s:
                rejected.append(
                    f"{profile.name} on {agent.name} ~{option.latency_s:.1f} s > "
                    f"{request.max_latency_s:.1f} s"
                )
                continue
            options.append(option)
    if not options:
        unique = list(dict.fromkeys(rejected))
        return NoChoice("nothing can serve it: " + "; ".join(unique[:6]), retry_after_s=5.0)

    def fastest(o: _Option) -> tuple[float, float, str, str]:
        return (round(o.latency_s, 6), -o.quality, o.model, o.agent)

    if intent == "auto:quality":
        best = min(options, key=lambda o: (-o.quality, round(o.latency_s, 6), o.model, o.agent))
        why = "auto:quality picks the highest quality"
    elif intent == "auto":
        top = max(o.quality for o in options)
        pool = [o for o in options if o.quality >= top - config.auto_quality_slack]
        best = min(pool, key=fastest)
        why = (
            f"auto picks the fastest within {config.auto_quality_slack:.0f} quality points "
            f"of the best ({top:.0f})"
        )
    elif intent == "auto:fast":
        best = min(options, key=fastest)
        why = "auto:fast picks the lowest expected latency"
    else:
        best = min(options, key=fastest)
        why = "requested by name"
    if best.spills:
        why += "; it does not fit in the GPU budget and will run partly on the CPU"
    reason = (
        f"{best.model} on {best.agent}: ~{best.latency_s:.1f} s ({best.note}), "
        f"quality {best.quality:.0f}; {why}"
    )
    return Choice(
        agent=best.agent,
        model=best.model,
        expected_latency_s=best.latency_s,
        quality=best.quality,
        load=best.load,
        room=best.room,
        spills=best.spills,
        reason=reason,
    )
