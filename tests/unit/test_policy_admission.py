"""Image admission against the VRAM budget."""

from __future__ import annotations

from controller.domain.admission import Admit, Hold, plan_images
from controller.domain.types import ImageJob, PolicyConfig, RunningImage

from .policy_fixtures import GIB, desktop, resident

NOW = 1000.0
SDXL = int(9.1 * GIB)


def sdxl(job_id: str = "j1", submitted_at: float = NOW - 1, priority: int = 0) -> ImageJob:
    return ImageJob(job_id, SDXL, "sdxl", priority, submitted_at)


def test_fits_without_eviction() -> None:
    [decision] = plan_images([sdxl()], [desktop()], NOW)
    assert isinstance(decision, Admit)
    assert decision.room.empty
    assert "free on desk" in decision.reason


def test_idle_14b_is_unloaded_for_sdxl() -> None:
    [decision] = plan_images([sdxl()], [desktop(resident("qwen2.5:14b"))], NOW)
    assert isinstance(decision, Admit)
    assert decision.room.unload == ("qwen2.5:14b",)
    assert "unload qwen2.5:14b first" in decision.reason


def test_busy_14b_holds_the_job_with_a_reason() -> None:
    [decision] = plan_images([sdxl()], [desktop(resident("qwen2.5:14b", in_flight=1))], NOW)
    assert isinstance(decision, Hold)
    assert decision.reason.startswith("needs ")
    assert "qwen2.5:14b busy" in decision.reason
    assert decision.drain_agent is None


def test_a_starving_job_drains_its_agent_and_ignores_min_residency() -> None:
    config = PolicyConfig(max_hold_s=60, min_residency_s=30)
    busy = desktop(resident("qwen2.5:14b", in_flight=2))
    [held] = plan_images([sdxl(submitted_at=NOW - 90)], [busy], NOW, config)
    assert isinstance(held, Hold)
    assert held.drain_agent == "desk"
    fresh = desktop(resident("qwen2.5:14b", loaded_at=NOW - 1))
    [young] = plan_images([sdxl(submitted_at=NOW - 10)], [fresh], NOW, config)
    assert isinstance(young, Hold)
    [old] = plan_images([sdxl(submitted_at=NOW - 90)], [fresh], NOW, config)
    assert isinstance(old, Admit)


def test_one_job_per_agent_per_round_and_none_while_one_runs() -> None:
    decisions = plan_images([sdxl("a"), sdxl("b")], [desktop()], NOW)
    kinds = {d.job_id: type(d).__name__ for d in decisions}
    assert kinds == {"a": "Admit", "b": "Hold"}
    running = desktop(image_running=RunningImage("x", SDXL, "sdxl", NOW - 2))
    [decision] = plan_images([sdxl("c")], [running], NOW)
    assert isinstance(decision, Hold)
    assert "busy with image job x" in decision.reason


def test_same_family_is_batched_before_older_other_family() -> None:
    agent = desktop(comfy_bytes=int(7 * GIB), comfy_family="sd15")
    older = ImageJob("old-sdxl", SDXL, "sdxl", 0, NOW - 20)
    newer = ImageJob("new-sd15", 3 * GIB, "sd15", 0, NOW - 5)
    decisions = plan_images([older, newer], [agent], NOW)
    admitted = [d.job_id for d in decisions if isinstance(d, Admit)]
    assert admitted == ["new-sd15"]


def test_priority_beats_age() -> None:
    decisions = plan_images(
        [sdxl("low", submitted_at=NOW - 30), sdxl("high", submitted_at=NOW - 1, priority=5)],
        [desktop()],
        NOW,
    )
    assert [d.job_id for d in decisions if isinstance(d, Admit)] == ["high"]


def test_a_job_larger_than_any_budget_is_held_with_that_reason() -> None:
    huge = ImageJob("huge", 20 * GIB, "flux", 0, NOW)
    [decision] = plan_images([huge], [desktop()], NOW)
    assert isinstance(decision, Hold)
    assert "budget" in decision.reason


def test_cached_family_needs_only_the_extra() -> None:
    agent = desktop(resident("qwen2.5:7b"), comfy_bytes=int(7.4 * GIB), comfy_family="sdxl")
    [decision] = plan_images([sdxl()], [agent], NOW)
    assert isinstance(decision, Admit)
    assert decision.need_bytes == SDXL - int(7.4 * GIB)


def test_young_images_yield_to_a_waiting_llm_request() -> None:
    config = PolicyConfig(max_hold_s=60, image_yield_s=20)
    [young] = plan_images([sdxl()], [desktop()], NOW, config, llm_waiting_since=NOW - 3)
    assert isinstance(young, Hold)
    assert "LLM request has waited 3 s" in young.reason
    [old] = plan_images(
        [sdxl(submitted_at=NOW - 25)], [desktop()], NOW, config, llm_waiting_since=NOW - 3
    )
    assert isinstance(old, Admit)


def test_a_job_reusing_comfyuis_checkpoint_never_frees_it() -> None:
    # SDXL cached in ComfyUI, 7b resident and idle: the only way in is to unload the 7b,
    # because freeing ComfyUI would throw away the weights the job was admitted as reusing.
    agent = desktop(resident("qwen2.5:7b"), comfy_bytes=6 * GIB, comfy_family="sdxl")
    job = ImageJob("big", 10 * GIB, "sdxl", 0, NOW - 1)
    [decision] = plan_images([job], [agent], NOW)
    assert isinstance(decision, Admit)
    assert not decision.room.free_comfy
    assert decision.room.unload == ("qwen2.5:7b",)


def test_a_job_larger_than_every_budget_is_marked_impossible() -> None:
    [decision] = plan_images([ImageJob("huge", 20 * GIB, "flux", 0, NOW)], [desktop()], NOW)
    assert isinstance(decision, Hold)
    assert decision.impossible
    [unhealthy] = plan_images(
        [ImageJob("huge", 20 * GIB, "flux", 0, NOW)], [desktop(healthy=False)], NOW
    )
    assert isinstance(unhealthy, Hold)
    assert not unhealthy.impossible
