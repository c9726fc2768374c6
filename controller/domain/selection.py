"""Choosing the agent and model for one LLM request (pure core).

Intents:

- an explicit model name is honoured, even when it spills to the CPU;
- "auto:fast" takes the lowest expected latency, so a resident model that answers sooner is
  always preferred to a load;
- "auto" takes the fastest model whose quality is within `auto_quality_slack` of the best
  candidate;
- "auto:quality" takes the *top model*: the highest-quality model that some healthy agent's
  budget holds without spilling to the CPU, loading it and unloading idle models when needed.
  When busy work holds the room it needs (a busy or freshly loaded model, a running image job,
  an agent draining for a starving one), the request is held: `NoChoice` with the reason and a
  `retry_after_s`, rather than a weaker model. The router plans again whenever the fleet changes,
  for up to its `llm_wait_s`, and then answers 503 with that reason and a Retry-After. Only a
  request that states its limits gets another model instead of waiting: the best one that meets
  its `min_quality` and `max_latency_s` now.

The quality tier (`quality_tier`): the median quality of every model in the catalogue (the mean
of the two middle ones for an even count), capped at the top model's quality so that the top
model always meets it. No "auto:quality" answer is below the tier unless the request allows it
with a `min_quality` under the tier, or sets a `max_latency_s` that no model at the tier can meet
now; the reason then says which.

Constraints (`min_quality`, `max_latency_s`) filter first. No auto plan ever spills to the CPU,
resident models win by costing no load, and a plan that needs room names exactly what it will
unload.

Embedding models serve only embeddings: the intents choose among the other models (and the
quality tier is theirs), a generate or chat request that names an embedding model is refused,
and an embedding request names its model, since no intent says which vector space the caller's
index was built in. An embedding request may name any model, as Ollama embeds with any.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from controller.domain.room import NoRoom, RoomPlan, clear_idle, make_room
from controller.domain.types import AgentState, LlmRequest, ModelProfile, PolicyConfig, gb
from gpu_common.model_names import normalize_model_name

AUTO_INTENTS = ("auto", "auto:fast", "auto:quality")
# Retry hints (seconds) for a NoChoice: when nothing can serve within limits, and the longest a
# held "auto:quality" request is told to wait when nothing says sooner.
NOTHING_RETRY_S = 5.0
HOLD_RETRY_S = 5.0
MIN_RETRY_S = 0.5


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
    """Nothing can serve the request within its limits now (`kind` "wait": worth planning
    again), or ever as asked: "unknown" for a model no agent offers, "unsupported" for a
    request its model cannot serve (generate on an embedding model, embeddings for an intent).
    """

    reason: str
    retry_after_s: float
    kind: Literal["wait", "unknown", "unsupported"] = "wait"


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
    output_tokens = (
        0 if request.task == "embed" else request.output_tokens or config.default_output_tokens
    )
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


def _fits(profile: ModelProfile, agents: Sequence[AgentState]) -> bool:
    """Some agent's budget holds `profile` whole, with room made: it need not spill."""
    return any(profile.size_bytes <= agent.budget_bytes for agent in agents)


def top_model(
    catalog: Mapping[str, ModelProfile], agents: Sequence[AgentState]
) -> ModelProfile | None:
    """The model "auto:quality" aims at: the highest quality that one of `agents` (the healthy
    ones) can hold without spilling to the CPU; ties go to the first name. None if none fits."""
    fitting = [p for p in catalog.values() if _fits(p, agents)]
    return min(fitting, key=lambda p: (-p.quality, p.name), default=None)


def quality_tier(catalog: Mapping[str, ModelProfile], agents: Sequence[AgentState]) -> float:
    """The catalogue's middle quality tier: the least an "auto:quality" answer may have unless
    the request allows less.

    The median of the qualities of every model in the catalogue, whether it fits or not (the
    mean of the two middle ones when the count is even): the catalogue is what the studio chose
    to offer, so its middle does not move when an agent is busy. It is capped at the top model's
    quality, so that a catalogue whose upper half does not fit any agent still has a tier that
    the best model the fleet can run meets. 0 for an empty catalogue.
    """
    if not catalog:
        return 0.0
    middle = statistics.median(p.quality for p in catalog.values())
    top = top_model(catalog, agents)
    return min(middle, top.quality) if top is not None else middle


@dataclass(frozen=True, slots=True)
class _Candidates:
    """Every agent and model weighed for one request."""

    # Plans within every limit of the request.
    options: list[_Option]
    # Plans that would serve, but over `max_latency_s`.
    too_slow: list[_Option]
    # (model, why it cannot serve now), in the order found: agents by name, then models.
    rejected: list[tuple[str, str]]

    def reasons(self, model: str | None = None) -> list[str]:
        """Distinct rejection reasons, for one model or all."""
        found = (why for name, why in self.rejected if model is None or name == model)
        return list(dict.fromkeys(found))

    def status(self, model: str) -> str:
        """Why `model` offers no plan within limits now, as a reason prints it."""
        slow = [o.latency_s for o in self.too_slow if o.model == model]
        if slow:
            return f"est {min(slow):.1f} s"
        return "not now: " + "; ".join(self.reasons(model)[:3])


def _gather(
    request: LlmRequest,
    agents: Sequence[AgentState],
    profiles: Sequence[ModelProfile],
    now: float,
    config: PolicyConfig,
    explicit: bool,
) -> _Candidates:
    options: list[_Option] = []
    too_slow: list[_Option] = []
    rejected: list[tuple[str, str]] = []
    for agent in agents:
        for profile in profiles:
            if request.min_quality is not None and profile.quality < request.min_quality:
                rejected.append(
                    (
                        profile.name,
                        f"{profile.name} quality {profile.quality:.0f} < {request.min_quality:.0f}",
                    )
                )
                continue
            option = _option(agent, profile, request, now, config, explicit)
            if isinstance(option, str):
                rejected.append((profile.name, option))
                continue
            if request.max_latency_s is not None and option.latency_s > request.max_latency_s:
                too_slow.append(option)
                rejected.append(
                    (
                        profile.name,
                        f"{profile.name} on {agent.name} ~{option.latency_s:.1f} s > "
                        f"{request.max_latency_s:.1f} s",
                    )
                )
                continue
            options.append(option)
    return _Candidates(options, too_slow, rejected)


def _fastest(o: _Option) -> tuple[float, float, str, str]:
    return (round(o.latency_s, 6), -o.quality, o.model, o.agent)


def _best_quality(o: _Option) -> tuple[float, float, str, str]:
    return (-o.quality, round(o.latency_s, 6), o.model, o.agent)


def _choice(best: _Option, why: str) -> Choice:
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


def _nothing(found: _Candidates, retry_after_s: float = NOTHING_RETRY_S) -> NoChoice:
    return NoChoice(
        "nothing can serve it: " + "; ".join(found.reasons()[:6]), retry_after_s=retry_after_s
    )


def _hold_retry_s(
    agents: Sequence[AgentState],
    catalog: Mapping[str, ModelProfile],
    request: LlmRequest,
    now: float,
    config: PolicyConfig,
) -> float:
    """When a held request is worth planning again: the soonest a resident model may let go of
    its memory (its queue done, or its minimum residency over), else `HOLD_RETRY_S`.

    Only a hint for the caller's Retry-After: the router plans again whenever the fleet changes.
    """
    soonest = HOLD_RETRY_S
    for agent in agents:
        for model in agent.resident:
            ahead = model.in_flight + agent.queued_for(model.name)
            profile = catalog.get(model.name)
            if ahead and profile is not None:
                typical = _request_seconds(
                    profile, request.prompt_tokens, config.default_output_tokens
                )
                soonest = min(soonest, ahead * typical)
            elif not ahead and now - model.loaded_at < config.min_residency_s:
                soonest = min(soonest, config.min_residency_s - (now - model.loaded_at))
    return max(MIN_RETRY_S, soonest)


def _select_quality(
    request: LlmRequest,
    agents: Sequence[AgentState],
    catalog: Mapping[str, ModelProfile],
    found: _Candidates,
    now: float,
    config: PolicyConfig,
) -> Selection:
    """The "auto:quality" intent: the top model, else a hold, else (only for a request that
    states limits) the best model that meets them, with the tier rule spelled out in the reason."""
    top = top_model(catalog, agents)
    if top is None:
        return _nothing(found)
    at_top = [o for o in found.options if o.quality >= top.quality]
    if at_top:
        return _choice(
            min(at_top, key=_fastest),
            "auto:quality picks the highest quality that fits without spilling",
        )
    retry_s = _hold_retry_s(agents, catalog, request, now, config)
    if request.min_quality is None and request.max_latency_s is None:
        # Waiting is the price of quality: the room comes back when busy work ends, and a
        # weaker model now is exactly what the caller did not ask for.
        return NoChoice(
            f"auto:quality waits for {top.name} (quality {top.quality:.0f}), the highest "
            f"quality that fits without spilling: {found.status(top.name)}; a request with "
            "min_quality or max_latency_s may take a lower model instead of waiting",
            retry_after_s=retry_s,
        )
    if not found.options:
        return _nothing(found, retry_s)
    # The request stated what it accepts rather than wait: the best model within those limits.
    best = min(found.options, key=_best_quality)
    tier = quality_tier(catalog, agents)
    if best.quality >= tier:
        limits = [
            f"{name} {value:g}"
            for name, value in (
                ("min_quality", request.min_quality),
                ("max_latency_s", request.max_latency_s),
            )
            if value is not None
        ]
        why = (
            f"auto:quality picks the highest quality within {' and '.join(limits)}; "
            f"{top.name} {found.status(top.name)}"
        )
        return _choice(best, why)
    allowed: list[str] = []
    if request.min_quality is not None and request.min_quality < tier:
        allowed.append(
            f"min_quality {request.min_quality:g} allows it; {top.name} {found.status(top.name)}"
        )
    if request.max_latency_s is not None:
        # `best` is the highest quality within the limit, so nothing at the tier meets it now.
        at_tier = sorted(
            (p for p in catalog.values() if p.quality >= tier and _fits(p, agents)),
            key=lambda p: (-p.quality, p.name),
        )
        allowed.append(
            f"max_latency_s {request.max_latency_s:g} could not be met by "
            + ", ".join(f"{p.name} ({found.status(p.name)})" for p in at_tier)
        )
    if not allowed:
        # Unreachable: a min_quality at or above the tier filtered every such option out. Kept so
        # that no later edit can serve below the tier without saying what allowed it.
        return _nothing(found, retry_s)
    return _choice(best, f"{best.model} below the quality tier ({tier:.1f}): " + "; ".join(allowed))


def _no_embedding_intent(intent: str, catalog: Mapping[str, ModelProfile]) -> str:
    """Why an embedding request cannot name an intent, and what it may name instead."""
    offered = sorted(p.name for p in catalog.values() if p.embedding)
    names = f"one of {', '.join(offered)}" if offered else "no agent offers one now"
    return (
        f"{intent} chooses among chat models; an embedding request must name its embedding "
        f"model, since vectors from different models cannot be compared ({names})"
    )


def select(
    request: LlmRequest,
    agents: Sequence[AgentState],
    catalog: Mapping[str, ModelProfile],
    now: float,
    config: PolicyConfig = PolicyConfig(),
) -> Selection:
    """Pick agent and model for `request`, or say why nothing can serve it now.

    A `NoChoice` with `retry_after_s` 0 will never change (an unknown model, a request its model
    cannot serve; `kind` says which); any other is worth planning again after that long or when
    the fleet changes.
    """
    intent = request.model
    explicit = intent not in AUTO_INTENTS
    if explicit:
        if intent not in catalog:
            # A name without a tag means `:latest`, as Ollama reads it.
            intent = normalize_model_name(intent)
        if intent not in catalog:
            return NoChoice(f"unknown model {intent!r}", retry_after_s=0.0, kind="unknown")
        named = catalog[intent]
        if named.embedding and request.task != "embed":
            # Ollama's own words for it.
            return NoChoice(
                f'"{intent}" does not support {request.task}', retry_after_s=0.0, kind="unsupported"
            )
        profiles = [named]
    elif request.task == "embed":
        return NoChoice(
            _no_embedding_intent(intent, catalog), retry_after_s=0.0, kind="unsupported"
        )
    else:
        catalog = {name: p for name, p in catalog.items() if not p.embedding}
        profiles = sorted(catalog.values(), key=lambda p: p.name)
    healthy = sorted((a for a in agents if a.healthy), key=lambda a: a.name)
    if not healthy:
        reasons = [f"{a.name}: {a.unhealthy_reason or 'unhealthy'}" for a in agents]
        return NoChoice("no healthy agent" + (f" ({'; '.join(reasons)})" if reasons else ""), 5.0)

    found = _gather(request, healthy, profiles, now, config, explicit)
    if intent == "auto:quality":
        return _select_quality(request, healthy, catalog, found, now, config)
    if not found.options:
        return _nothing(found)
    if intent == "auto":
        top = max(o.quality for o in found.options)
        pool = [o for o in found.options if o.quality >= top - config.auto_quality_slack]
        return _choice(
            min(pool, key=_fastest),
            f"auto picks the fastest within {config.auto_quality_slack:.0f} quality points "
            f"of the best ({top:.0f})",
        )
    if intent == "auto:fast":
        return _choice(
            min(found.options, key=_fastest), "auto:fast picks the lowest expected latency"
        )
    return _choice(min(found.options, key=_fastest), "requested by name")
