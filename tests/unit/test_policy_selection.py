"""Model selection: intents, constraints, residency and never spilling."""

from __future__ import annotations

from controller.domain.selection import Choice, NoChoice, select
from controller.domain.types import LlmRequest, PolicyConfig

from .policy_fixtures import CATALOG, GIB, desktop, resident

NOW = 1000.0


def choose(request: LlmRequest, *agents: object, config: PolicyConfig = PolicyConfig()) -> Choice:
    result = select(request, list(agents), CATALOG, NOW, config)  # type: ignore[arg-type]
    assert isinstance(result, Choice), result
    return result


def test_fast_and_quality_pick_different_models_for_the_reason_given() -> None:
    agent = desktop()
    fast = choose(LlmRequest("auto:fast", prompt_tokens=200), agent)
    quality = choose(LlmRequest("auto:quality", prompt_tokens=200), agent)
    assert fast.model == "llama3.2:3b"
    assert "lowest expected latency" in fast.reason
    assert quality.model == "qwen2.5:14b"
    assert "highest quality" in quality.reason
    assert fast.load
    assert quality.load


def test_auto_never_picks_a_model_that_spills() -> None:
    choice = choose(LlmRequest("auto:quality", prompt_tokens=50), desktop())
    assert choice.model != "mistral-small:latest"
    assert not choice.spills


def test_explicit_name_is_honoured_even_when_it_spills() -> None:
    choice = choose(LlmRequest("mistral-small:latest", prompt_tokens=50), desktop())
    assert choice.model == "mistral-small:latest"
    assert choice.spills
    assert "partly on the CPU" in choice.reason


def test_auto_fast_never_waits_for_a_load_while_a_resident_model_answers_sooner() -> None:
    agent = desktop(resident("qwen2.5:7b", loaded_at=0.0))
    # 16 tokens: the resident 7b answers in ~0.2 s, before llama3.2:3b's 1.2 s load is done.
    short = choose(LlmRequest("auto:fast", prompt_tokens=50, output_tokens=16), agent)
    assert short.model == "qwen2.5:7b"
    assert not short.load
    assert "resident" in short.reason
    # 512 tokens: the 3b's speed repays its load (~4.3 s against ~6.4 s), so it is the sooner.
    long = choose(LlmRequest("auto:fast", prompt_tokens=50, output_tokens=512), agent)
    assert long.model == "llama3.2:3b"
    assert long.load
    assert long.expected_latency_s < 6.4


def test_resident_model_is_preferred_by_auto() -> None:
    agent = desktop(resident("qwen2.5:7b", loaded_at=0.0))
    choice = choose(LlmRequest("auto", prompt_tokens=100), agent)
    assert choice.model == "qwen2.5:7b"
    assert not choice.load
    assert "resident" in choice.reason


def test_loading_evicts_an_idle_model_but_never_a_busy_one() -> None:
    idle = desktop(resident("qwen2.5:7b", loaded_at=0.0, last_used_at=500.0))
    choice = choose(LlmRequest("qwen2.5:14b", prompt_tokens=100), idle)
    assert choice.room.unload == ("qwen2.5:7b",)
    busy = desktop(resident("qwen2.5:7b", in_flight=1))
    result = select(LlmRequest("qwen2.5:14b", prompt_tokens=100), [busy], CATALOG, NOW)
    assert isinstance(result, NoChoice)
    assert "qwen2.5:7b busy" in result.reason
    assert result.retry_after_s > 0


def test_minimum_residency_protects_a_fresh_model() -> None:
    fresh = desktop(resident("qwen2.5:7b", loaded_at=NOW - 5))
    result = select(LlmRequest("qwen2.5:14b", prompt_tokens=100), [fresh], CATALOG, NOW)
    assert isinstance(result, NoChoice)
    assert "loaded 5 s ago" in result.reason


def test_comfyui_cache_is_freed_first_to_make_room() -> None:
    after_images = desktop(comfy_bytes=int(7.4 * GIB), comfy_family="sdxl")
    choice = choose(LlmRequest("qwen2.5:14b", prompt_tokens=100), after_images)
    assert choice.room.free_comfy
    assert choice.room.unload == ()
    assert "free ComfyUI's cache" in choice.reason


def test_constraints_filter_and_explain() -> None:
    agent = desktop()
    choice = choose(LlmRequest("auto:fast", prompt_tokens=100, min_quality=70), agent)
    assert choice.model == "qwen2.5:7b"
    result = select(
        LlmRequest("auto:quality", prompt_tokens=100, max_latency_s=0.5), [agent], CATALOG, NOW
    )
    assert isinstance(result, NoChoice)
    assert "> 0.5 s" in result.reason


def test_unhealthy_agents_get_no_work() -> None:
    result = select(
        LlmRequest("auto", prompt_tokens=10),
        [desktop(healthy=False, unhealthy_reason="telemetry 30 s old")],
        CATALOG,
        NOW,
    )
    assert isinstance(result, NoChoice)
    assert "telemetry 30 s old" in result.reason


def test_picks_the_agent_where_the_model_is_resident() -> None:
    a = desktop(name="a")
    b = desktop(resident("qwen2.5:14b"), name="b")
    choice = choose(LlmRequest("qwen2.5:14b", prompt_tokens=100), a, b)
    assert choice.agent == "b"


def test_draining_agent_starts_no_new_loads() -> None:
    config = PolicyConfig(max_hold_s=60)
    agent = desktop(held_image_since=NOW - 90)
    result = select(LlmRequest("auto", prompt_tokens=10), [agent], CATALOG, NOW, config)
    assert isinstance(result, NoChoice)
    assert "image job waiting" in result.reason
    with_resident = desktop(resident("llama3.2:3b"), held_image_since=NOW - 90)
    choice = choose(LlmRequest("auto", prompt_tokens=10), with_resident, config=config)
    assert choice.model == "llama3.2:3b"
    assert not choice.load


def test_unknown_model_is_refused() -> None:
    result = select(LlmRequest("nope:1b", prompt_tokens=1), [desktop()], CATALOG, NOW)
    assert isinstance(result, NoChoice)
    assert "unknown model" in result.reason
