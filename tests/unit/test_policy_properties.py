"""Invariants of the policy core, checked on generated states (hypothesis)."""

from __future__ import annotations

import dataclasses

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from controller.domain.admission import Admit, Hold, image_need_bytes, plan_images
from controller.domain.selection import Choice, NoChoice, quality_tier, select, top_model
from controller.domain.types import (
    AgentState,
    ImageJob,
    LlmRequest,
    PolicyConfig,
    ResidentModel,
    RunningImage,
)

from .policy_fixtures import CATALOG, COMFY_CONTEXT, DESKTOP, GIB, RESERVE, TOTAL

NOW = 10_000.0
FITTING = [name for name, p in CATALOG.items() if p.fits_on_gpu and p.size_bytes < 11 * GIB]
CONFIG = PolicyConfig(min_residency_s=30, max_hold_s=120)


@st.composite
def residents(draw: st.DrawFn) -> tuple[ResidentModel, ...]:
    names = draw(st.lists(st.sampled_from(FITTING), unique=True, max_size=3))
    models = []
    for name in sorted(names):
        size = CATALOG[name].vram_bytes
        loaded = draw(st.floats(NOW - 600, NOW))
        used = draw(st.floats(loaded, NOW))
        models.append(ResidentModel(name, size, size, draw(st.integers(0, 2)), loaded, used))
    return tuple(models)


@st.composite
def agents(draw: st.DrawFn, name: str = "desk") -> AgentState:
    models = draw(residents())
    comfy_family = draw(st.sampled_from([None, "sd15", "sdxl"]))
    comfy = COMFY_CONTEXT + (draw(st.integers(0, 7 * GIB)) if comfy_family else 0)
    used = DESKTOP + comfy + sum(m.vram_bytes for m in models)
    assume(used <= TOTAL)
    return AgentState(
        name=name,
        healthy=True,
        total_bytes=TOTAL,
        used_bytes=used,
        reserve_bytes=RESERVE,
        resident=models,
        comfy_bytes=comfy,
        comfy_floor_bytes=COMFY_CONTEXT,
        comfy_family=comfy_family,
        pending_bytes=draw(st.integers(0, GIB)),
    )


@st.composite
def busy_agents(draw: st.DrawFn, name: str = "desk") -> AgentState:
    """An agent as `agents` draws it, sometimes running an image job or draining for one."""
    agent = draw(agents(name))
    if draw(st.booleans()) and agent.comfy_family is not None:
        running = RunningImage("job", agent.comfy_bytes, agent.comfy_family, NOW - 5)
        agent = dataclasses.replace(agent, image_running=running)
    if draw(st.booleans()):
        agent = dataclasses.replace(agent, held_image_since=NOW - draw(st.floats(0, 300)))
    return agent


@st.composite
def image_jobs(draw: st.DrawFn) -> list[ImageJob]:
    count = draw(st.integers(1, 6))
    jobs = []
    for i in range(count):
        family = draw(st.sampled_from(["sd15", "sdxl"]))
        peak = draw(st.integers(2 * GIB, 10 * GIB))
        jobs.append(
            ImageJob(
                f"job{i}", peak, family, draw(st.integers(0, 2)), NOW - draw(st.floats(0, 300))
            )
        )
    return jobs


@settings(max_examples=200, deadline=None)
@given(st.lists(agents(), min_size=1, max_size=3), image_jobs())
def test_admitted_plans_fit_the_budget_and_spare_busy_models(
    fleet: list[AgentState], jobs: list[ImageJob]
) -> None:
    fleet = [dataclasses.replace(a, name=f"desk{i}") for i, a in enumerate(fleet)]
    by_name = {a.name: a for a in fleet}
    admitted_per_agent: dict[str, int] = {}
    for decision in plan_images(jobs, fleet, NOW, CONFIG):
        if not isinstance(decision, Admit):
            assert isinstance(decision, Hold)
            assert decision.reason
            continue
        agent = by_name[decision.agent]
        admitted_per_agent[agent.name] = admitted_per_agent.get(agent.name, 0) + 1
        busy = {m.name for m in agent.resident if m.busy}
        assert not busy & set(decision.room.unload), "a busy model was evicted"
        job = next(j for j in jobs if j.job_id == decision.job_id)
        assert decision.need_bytes == image_need_bytes(job, agent)
        assert decision.need_bytes <= agent.free_bytes + decision.room.freed_bytes
    assert all(count == 1 for count in admitted_per_agent.values())


@settings(max_examples=200, deadline=None)
@given(
    agents(), st.sampled_from(["auto", "auto:fast", "auto:quality", *FITTING]), st.integers(1, 4000)
)
def test_selection_never_evicts_busy_models_and_auto_never_spills(
    agent: AgentState, intent: str, prompt_tokens: int
) -> None:
    result = select(LlmRequest(intent, prompt_tokens), [agent], CATALOG, NOW, CONFIG)
    if isinstance(result, Choice):
        busy = {m.name for m in agent.resident if m.busy}
        assert not busy & set(result.room.unload)
        if intent.startswith("auto"):
            assert not result.spills
        if result.load:
            need = CATALOG[result.model].vram_bytes
            assert need <= agent.free_bytes + result.room.freed_bytes
    assert result.reason


@settings(max_examples=300, deadline=None)
@given(
    st.lists(busy_agents(), min_size=1, max_size=2),
    st.integers(1, 4000),
    st.none() | st.integers(1, 2048),
    st.none() | st.floats(40, 90),
    st.none() | st.floats(0.5, 60),
)
def test_auto_quality_is_the_top_model_and_never_below_the_tier_unless_allowed(
    fleet: list[AgentState],
    prompt_tokens: int,
    output_tokens: int | None,
    min_quality: float | None,
    max_latency_s: float | None,
) -> None:
    fleet = [dataclasses.replace(a, name=f"desk{i}") for i, a in enumerate(fleet)]
    request = LlmRequest("auto:quality", prompt_tokens, output_tokens, min_quality, max_latency_s)
    result = select(request, fleet, CATALOG, NOW, CONFIG)
    assert result.reason
    if isinstance(result, NoChoice):
        assert result.retry_after_s > 0
        if min_quality is None and max_latency_s is None:
            assert result.reason.startswith("auto:quality waits for"), result.reason
        return
    assert not result.spills
    assert min_quality is None or result.quality >= min_quality
    assert max_latency_s is None or result.expected_latency_s <= max_latency_s
    top = top_model(CATALOG, fleet)
    assert top is not None
    if min_quality is None and max_latency_s is None:
        # Unconstrained: the top model or a hold, never a weaker model.
        assert result.model == top.name
    tier = quality_tier(CATALOG, fleet)
    if result.quality >= tier:
        return
    assert "below the quality tier" in result.reason
    if min_quality is not None and min_quality < tier:
        assert "min_quality" in result.reason
        return
    # Only a latency limit that no model at the tier can meet now allows it.
    assert max_latency_s is not None
    assert "could not be met by" in result.reason
    for name, profile in CATALOG.items():
        if profile.quality >= tier and profile.size_bytes <= fleet[0].budget_bytes:
            by_name = dataclasses.replace(request, model=name, min_quality=None)
            assert isinstance(select(by_name, fleet, CATALOG, NOW, CONFIG), NoChoice), name


@settings(max_examples=200, deadline=None)
@given(busy_agents(), st.integers(1, 4000), st.none() | st.integers(1, 2048))
def test_auto_fast_loads_only_when_no_resident_model_answers_sooner(
    agent: AgentState, prompt_tokens: int, output_tokens: int | None
) -> None:
    request = LlmRequest("auto:fast", prompt_tokens, output_tokens)
    result = select(request, [agent], CATALOG, NOW, CONFIG)
    if not isinstance(result, Choice) or not result.load:
        return
    for model in agent.resident:
        stay = select(dataclasses.replace(request, model=model.name), [agent], CATALOG, NOW, CONFIG)
        assert isinstance(stay, Choice)
        assert not stay.load
        assert stay.expected_latency_s >= result.expected_latency_s - 1e-6, stay.reason


@settings(max_examples=100, deadline=None)
@given(st.lists(agents(), min_size=1, max_size=3), image_jobs(), st.randoms())
def test_same_inputs_same_decisions_in_any_order(
    fleet: list[AgentState], jobs: list[ImageJob], rng: object
) -> None:
    fleet = [dataclasses.replace(a, name=f"desk{i}") for i, a in enumerate(fleet)]
    first = plan_images(jobs, fleet, NOW, CONFIG)
    shuffled_jobs, shuffled_fleet = list(jobs), list(fleet)
    rng.shuffle(shuffled_jobs)  # type: ignore[attr-defined]
    rng.shuffle(shuffled_fleet)  # type: ignore[attr-defined]
    second = plan_images(shuffled_jobs, shuffled_fleet, NOW, CONFIG)
    assert sorted(first, key=lambda d: d.job_id) == sorted(second, key=lambda d: d.job_id)
    request = LlmRequest("auto", 100)
    assert select(request, fleet, CATALOG, NOW, CONFIG) == select(
        request, shuffled_fleet, CATALOG, NOW, CONFIG
    )


@settings(max_examples=100, deadline=None)
@given(agents(), image_jobs())
def test_every_held_job_is_admitted_in_the_end(agent: AgentState, jobs: list[ImageJob]) -> None:
    """A finite workload: busy models finish one request per step, admitted jobs finish the
    next step. Every job must run within a bounded number of steps."""
    agent = dataclasses.replace(agent, pending_bytes=0)
    assume(all(image_need_bytes(j, agent) <= agent.budget_bytes - DESKTOP for j in jobs))
    held = list(jobs)
    now = NOW
    step_s = 10.0
    bound = len(jobs) * 2 + 3 + int(CONFIG.max_hold_s / step_s) + 3
    for _ in range(bound):
        if not held:
            break
        # The running image (if any) finishes; ComfyUI keeps its family cached.
        if agent.image_running is not None:
            agent = dataclasses.replace(agent, image_running=None, pending_bytes=0)
        decisions = plan_images(held, [agent], now, CONFIG)
        for decision in decisions:
            if isinstance(decision, Admit):
                job = next(j for j in held if j.job_id == decision.job_id)
                held.remove(job)
                gone = set(decision.room.unload)
                kept = tuple(m for m in agent.resident if m.name not in gone)
                comfy = job.peak_bytes
                agent = dataclasses.replace(
                    agent,
                    resident=kept,
                    comfy_bytes=comfy,
                    comfy_family=job.family,
                    used_bytes=DESKTOP + comfy + sum(m.vram_bytes for m in kept),
                    image_running=RunningImage(job.job_id, job.peak_bytes, job.family, now),
                )
        # LLM work is finite: each busy model finishes one request per step.
        agent = dataclasses.replace(
            agent,
            resident=tuple(
                dataclasses.replace(m, in_flight=max(0, m.in_flight - 1)) for m in agent.resident
            ),
        )
        now += step_s
    assert not held, f"jobs never admitted: {[j.job_id for j in held]}"
