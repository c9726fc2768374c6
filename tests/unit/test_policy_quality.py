"""The auto:quality intent: the top model or a hold, the quality tier, and what may lower it."""

from __future__ import annotations

import pytest

from controller.domain.selection import (
    HOLD_RETRY_S,
    Choice,
    NoChoice,
    Selection,
    quality_tier,
    select,
    top_model,
)
from controller.domain.types import GB, AgentState, LlmRequest, ModelProfile, RunningImage

from .policy_fixtures import CATALOG, GIB, desktop, resident

NOW = 1000.0
TOP = "qwen2.5:14b"
# The median of 54.8, 70.3, 80.8 and 85.4: the mean of the two middle ones.
TIER = (70.3 + 80.8) / 2


def quality(
    *agents: AgentState, min_quality: float | None = None, max_latency_s: float | None = None
) -> Selection:
    request = LlmRequest(
        "auto:quality", prompt_tokens=200, min_quality=min_quality, max_latency_s=max_latency_s
    )
    return select(request, list(agents), CATALOG, NOW)


# -- the tier and the top model ----------------------------------------------------------------


def test_the_tier_is_the_catalogue_median_and_the_top_is_the_best_that_fits() -> None:
    agent = desktop()
    assert quality_tier(CATALOG, [agent]) == pytest.approx(TIER)
    top = top_model(CATALOG, [agent])
    assert top is not None
    # mistral-small is better but needs 15.6 GB of a 12.3 GB budget: it would spill.
    assert top.name == TOP


def test_an_odd_catalogue_has_its_middle_model_as_the_tier() -> None:
    three = {name: p for name, p in CATALOG.items() if name != "mistral-small:latest"}
    assert quality_tier(three, [desktop()]) == pytest.approx(70.3)


def test_the_tier_never_exceeds_the_best_model_that_fits() -> None:
    huge = {
        name: ModelProfile(name, q, 40 * GIB, 40 * GIB, 5.0, 200.0, 9.0)
        for name, q in (("big:70b", 90.0), ("bigger:123b", 95.0))
    }
    catalog = {**CATALOG, **huge}
    # The median of six (80.8 and 85.4 in the middle) is above anything that fits the card.
    assert quality_tier(catalog, [desktop()]) == pytest.approx(CATALOG[TOP].quality)


def test_no_top_model_when_nothing_fits_and_no_tier_without_a_catalogue() -> None:
    small = AgentState("tiny", True, total_bytes=2 * GB, used_bytes=0, reserve_bytes=0)
    assert top_model(CATALOG, [small]) is None
    assert quality_tier({}, [desktop()]) == 0.0


# -- the top model, or a hold ------------------------------------------------------------------

SDXL_RUNNING = RunningImage("sdxl-1", 9 * GIB, "sdxl", NOW - 5)


@pytest.mark.parametrize(
    ("case", "agents", "unload"),
    [
        ("an empty card loads it", [desktop()], ()),
        (
            "an idle model makes room",
            [desktop(resident("llama3.2:3b", loaded_at=0.0, last_used_at=500.0))],
            ("llama3.2:3b",),
        ),
        (
            "an idle 7b makes room too",
            [desktop(resident("qwen2.5:7b", loaded_at=0.0, last_used_at=500.0))],
            ("qwen2.5:7b",),
        ),
        ("a busy top model takes the request in turn", [desktop(resident(TOP, in_flight=2))], ()),
        (
            "another agent has the room",
            [desktop(resident("llama3.2:3b", in_flight=1), name="a"), desktop(name="b")],
            (),
        ),
    ],
)
def test_auto_quality_is_served_by_the_top_model(
    case: str, agents: list[AgentState], unload: tuple[str, ...]
) -> None:
    result = quality(*agents)
    assert isinstance(result, Choice), f"{case}: {result}"
    assert result.model == TOP, case
    assert result.room.unload == unload, case
    assert not result.spills
    assert "highest quality that fits without spilling" in result.reason


@pytest.mark.parametrize(
    ("case", "agent", "blocker"),
    [
        ("a busy small model", desktop(resident("llama3.2:3b", in_flight=1)), "llama3.2:3b busy"),
        (
            "a freshly loaded small model",
            desktop(resident("llama3.2:3b", loaded_at=NOW - 5)),
            "llama3.2:3b loaded 5 s ago",
        ),
        (
            "a running SDXL job",
            desktop(comfy_bytes=9 * GIB, comfy_family="sdxl", image_running=SDXL_RUNNING),
            "image job sdxl-1 running",
        ),
        (
            "an agent draining for a starving image job",
            desktop(resident("llama3.2:3b", loaded_at=0.0), held_image_since=NOW - 90),
            "holds new loads for an image job",
        ),
    ],
)
def test_auto_quality_holds_rather_than_take_a_weaker_model(
    case: str, agent: AgentState, blocker: str
) -> None:
    # Before, the busy, fresh and draining cases were served by qwen2.5:7b or llama3.2:3b.
    result = quality(agent)
    assert isinstance(result, NoChoice), f"{case}: {result}"
    assert f"auto:quality waits for {TOP}" in result.reason, case
    assert blocker in result.reason, case
    assert 0 < result.retry_after_s <= HOLD_RETRY_S, case


def test_a_hold_suggests_retrying_when_the_busy_model_should_be_done() -> None:
    result = quality(desktop(resident("llama3.2:3b", in_flight=1)))
    assert isinstance(result, NoChoice)
    # One typical llama3.2:3b request: 200 prompt tokens at 9000/s, 256 output tokens at 165/s.
    assert result.retry_after_s == pytest.approx(200 / 9000 + 256 / 165)


def test_plain_auto_does_not_hold_where_auto_quality_does() -> None:
    busy_small = desktop(resident("llama3.2:3b", in_flight=1))
    assert isinstance(quality(busy_small), NoChoice)
    plain = select(LlmRequest("auto", prompt_tokens=200), [busy_small], CATALOG, NOW)
    assert isinstance(plain, Choice)
    assert plain.model == "qwen2.5:7b"


# -- what a request's own limits allow ---------------------------------------------------------

BUSY_SMALL = desktop(resident("llama3.2:3b", in_flight=1))


@pytest.mark.parametrize(
    ("case", "agent", "min_quality", "max_latency_s", "model", "says"),
    [
        # Empty card, 256 output tokens: 14b ~8.1 s with its load, 7b ~5.0 s, 3b ~2.8 s.
        ("the top model meets the limit", desktop(), None, 10.0, TOP, ["highest quality that"]),
        (
            "only below the tier meets the limit",
            desktop(),
            None,
            6.0,
            "qwen2.5:7b",
            [
                "qwen2.5:7b below the quality tier (75.5)",
                f"max_latency_s 6 could not be met by {TOP} (est 8.1 s)",
            ],
        ),
        (
            "a tighter limit goes lower still",
            desktop(),
            None,
            3.0,
            "llama3.2:3b",
            ["llama3.2:3b below the quality tier", f"could not be met by {TOP} (est 8.1 s)"],
        ),
        (
            "a limit the top model cannot meet while it waits for room",
            BUSY_SMALL,
            None,
            30.0,
            "qwen2.5:7b",
            ["below the quality tier", f"could not be met by {TOP} (not now:", "llama3.2:3b busy"],
        ),
        (
            "a min_quality under the tier accepts a model instead of waiting",
            BUSY_SMALL,
            60.0,
            None,
            "qwen2.5:7b",
            ["qwen2.5:7b below the quality tier", "min_quality 60 allows it", "llama3.2:3b busy"],
        ),
    ],
)
def test_a_request_may_lower_the_model_by_saying_so(
    case: str,
    agent: AgentState,
    min_quality: float | None,
    max_latency_s: float | None,
    model: str,
    says: list[str],
) -> None:
    result = quality(agent, min_quality=min_quality, max_latency_s=max_latency_s)
    assert isinstance(result, Choice), f"{case}: {result}"
    assert result.model == model, case
    for text in says:
        assert text in result.reason, f"{case}: {text!r} not in {result.reason!r}"


def test_a_min_quality_at_the_tier_keeps_the_request_waiting_for_a_model_that_meets_it() -> None:
    result = quality(BUSY_SMALL, min_quality=75.0)
    assert isinstance(result, NoChoice)
    assert "qwen2.5:7b quality 70 < 75" in result.reason
    assert "llama3.2:3b busy" in result.reason
    assert result.retry_after_s > 0


def test_a_limit_nothing_meets_is_refused_with_every_estimate() -> None:
    result = quality(desktop(), max_latency_s=1.0)
    assert isinstance(result, NoChoice)
    assert f"{TOP} on desk ~8.1 s > 1.0 s" in result.reason
    assert "llama3.2:3b on desk ~2.8 s > 1.0 s" in result.reason
