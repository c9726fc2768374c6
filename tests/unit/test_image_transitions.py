"""Every image job transition of the core, one row each: job state and event in, state, actions
and reason out."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from controller.domain.image_jobs import (
    Admitted,
    AgentGone,
    CancelRequested,
    DispatchFailed,
    Event,
    ImageJobState,
    InputsUnusable,
    JobStatus,
    JobUpdate,
    PromptNews,
    ReleaseRun,
    Requeue,
    RoomMade,
    SubmitAnswered,
    Transition,
    Unplaceable,
    WorkflowRejected,
    oom_footprint,
    transition,
)

NOW = 1000.0
MAX_ATTEMPTS = 3
PROMPT = "prompt-2"


def job(state: JobStatus = "running", **changes: typing.Any) -> ImageJobState:
    """A job on agent "desk" in its second attempt."""
    base = ImageJobState(
        job_id="job",
        state="held",
        reason="waiting for GPU memory",
        attempts=2,
        agent="desk",
        family="sdxl",
        prompt_id=PROMPT,
    )
    return dataclasses.replace(base, state=state, **changes)


def held(**changes: typing.Any) -> ImageJobState:
    return job("held", agent=None, **changes)


def news(state: str, **fields: typing.Any) -> PromptNews:
    return PromptNews(**{"agent": "desk", "prompt_id": PROMPT, "state": state, **fields})


ROWS: list[tuple[str, ImageJobState | None, Event, str | None, tuple[str, ...], str, bool]] = [
    # name, job, event -> state after, actions, reason fragment, news noted
    ("admitted", held(), Admitted("desk", "fits: 9.1 GB free"),
     "dispatched", ("Store", "Dispatch"), "fits: 9.1 GB free", True),
    ("admitted, but no longer held", job("dispatched"), Admitted("desk", "fits"),
     "dispatched", ("GiveBack",), "no longer held", False),
    ("admitted, but cancelled meanwhile", None, Admitted("desk", "fits"),
     None, ("GiveBack",), "given back", False),
    ("never fits anywhere", held(), Unplaceable("needs 20.0 GB, no budget holds it"),
     "failed", ("Store", "Forget"), "needs 20.0 GB", False),
    ("never fits, but no longer held", job("dispatched"), Unplaceable("needs 20.0 GB"),
     "dispatched", (), "no longer held", False),
    ("cancel while held", held(), CancelRequested(),
     "cancelled", ("Store", "Forget"), "cancelled by the caller", False),
    ("cancel while dispatched", job("dispatched"), CancelRequested(),
     "dispatched", ("CancelAtAgent",), "asking desk to cancel", False),
    ("cancel while running", job("running"), CancelRequested(),
     "running", ("CancelAtAgent",), "asking desk to cancel", False),
    ("cancel after the end", job("succeeded"), CancelRequested(),
     "succeeded", (), "already succeeded", False),
    ("room made", job("dispatched"), RoomMade("desk"),
     "dispatched", ("Submit",), "submitting", False),
    ("room made, pictures to upload", job("dispatched", inputs=2), RoomMade("desk"),
     "dispatched", ("UploadInputs", "Submit"), "uploading 2 input picture(s)", False),
    ("room made, but cancel asked", job("dispatched", cancelling=True), RoomMade("desk"),
     "cancelled", ("ReleaseRun", "Store", "Forget"), "cancelled by the caller", False),
    ("submitted while a cancel came", job("dispatched", cancelling=True), SubmitAnswered("pending"),
     "dispatched", ("CancelAtAgent",), "cancel arrived", False),
    ("submitted, already over, cancel came", job("dispatched", cancelling=True),
     SubmitAnswered("succeeded"), "dispatched", (), "succeeded", False),
    ("submitted", job("dispatched"), SubmitAnswered("pending"),
     "dispatched", (), "pending", False),
    ("dispatch failed", job("dispatched"), DispatchFailed("dispatch to desk failed: timed out"),
     "dispatched", ("Retry",), "dispatch to desk failed", False),
    ("workflow rejected", job("dispatched"), WorkflowRejected("desk", "no such node"),
     "failed", ("ReleaseRun", "Store", "Forget"), "rejected the workflow", False),
    ("pictures lost or refused", job("dispatched", inputs=1),
     InputsUnusable("input 'a.png' cannot be read"),
     "failed", ("ReleaseRun", "Store", "Forget"), "input pictures cannot reach ComfyUI", False),
    ("agent no longer configured", job("running"), AgentGone(),
     "failed", ("Store", "Forget"), "agent desk is no longer configured", False),
    ("queued in ComfyUI", job("dispatched"), news("pending"),
     "dispatched", ("Store",), "queued in ComfyUI on desk", True),
    ("queued again", job("dispatched", reason="queued in ComfyUI on desk"), news("pending"),
     "dispatched", (), "queued in ComfyUI on desk", True),
    ("starts running", job("dispatched"), news("running"),
     "running", ("Store",), "running on desk", True),
    ("progress while running", job("running"), news("running"),
     "running", (), "running on desk", True),
    ("succeeded", job("running"), news("succeeded", outputs=2),
     "succeeded", ("FetchOutputs", "ReleaseRun", "Store", "Forget"), "with 2 output(s)", True),
    ("out of memory: retried larger", job("running"),
     news("failed", reason="ran out of GPU memory", oom=True),
     "running", ("GrowFootprint", "Retry"), "ran out of GPU memory on desk", True),
    ("failed", job("running"), news("failed", reason="node error", error="boom"),
     "failed", ("ReleaseRun", "Store", "Forget"), "failed on desk: node error", True),
    ("interrupted on the desktop", job("running"), news("interrupted"),
     "cancelled", ("ReleaseRun", "Store", "Forget"), "interrupted on the desktop", True),
    ("cancel while running, confirmed", job("running", cancelling=True), news("cancelled"),
     "cancelled", ("ReleaseRun", "Store", "Forget"), "cancelled by the caller", True),
    ("prompt vanished (ComfyUI restarted)", job("running"), news("unknown"),
     "running", ("Retry",), "restarted and lost it", True),
    ("news from another agent", job("running"), dataclasses.replace(news("running"), agent="x"),
     "running", (), "ignored", False),
    ("news of an earlier attempt", job("running"),
     dataclasses.replace(news("failed"), prompt_id="prompt-1"),
     "running", (), "earlier attempt", False),
    ("duplicate news after the end", job("succeeded"), news("succeeded", outputs=2),
     "succeeded", (), "already succeeded", False),
    ("late news after it was forgotten", None, news("failed", reason="boom"),
     None, (), "has ended", False),
    ("lost: retried", job("running"), Requeue("ComfyUI on desk restarted and lost it"),
     "held", ("ReleaseRun", "Store"), "lost it; will retry", False),
    ("lost for the last time", job("running", attempts=MAX_ATTEMPTS), Requeue("lost"),
     "failed", ("ReleaseRun", "Store", "Forget"), "gave up after 3 attempts: lost", False),
    ("lost with no agent to release", job("dispatched", agent=None), Requeue("lost"),
     "held", ("Store",), "lost; will retry", False),
    ("lost after the end", job("cancelled"), Requeue("lost"),
     "cancelled", (), "already cancelled", False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("start", "event", "state", "actions", "reason", "noted"),
    [pytest.param(*row[1:], id=row[0]) for row in ROWS],
)
def test_transition(
    start: ImageJobState | None,
    event: Event,
    state: str | None,
    actions: tuple[str, ...],
    reason: str,
    noted: bool,
) -> None:
    change = transition(start, event, NOW, max_attempts=MAX_ATTEMPTS)
    assert change.state == state
    assert tuple(type(action).__name__ for action in change.actions) == actions
    assert reason in change.reason
    assert change.news_at == (NOW if noted else None)
    assert change.ignored == (not actions and not noted)


def test_every_event_has_a_row() -> None:
    events = set(typing.get_args(Event))
    assert events == {type(row[2]) for row in ROWS}


def test_admission_writes_the_agent_and_counts_the_attempt() -> None:
    change = transition(held(attempts=1), Admitted("desk", "fits"), NOW, max_attempts=3)
    assert change.update == JobUpdate(state="dispatched", agent="desk", reason="fits", attempts=2)


def test_a_retry_clears_the_agent_and_a_success_stores_its_result() -> None:
    retry = transition(job("running"), Requeue("lost"), NOW, max_attempts=3)
    assert retry.update == JobUpdate(state="held", reason="lost; will retry", clear_agent=True)
    done = transition(job("running"), news("succeeded", outputs=1), NOW, max_attempts=3)
    assert done.update is not None
    assert done.update.with_result


def test_a_failure_keeps_comfyuis_error_and_a_cancel_keeps_the_flag() -> None:
    failed = transition(job(), news("failed", reason="x", error="boom"), NOW, max_attempts=3)
    assert failed.update is not None
    assert failed.update.error == "boom"
    asked = transition(job(), CancelRequested(), NOW, max_attempts=3)
    assert asked.cancelling
    confirmed = transition(job(cancelling=True), news("running"), NOW, max_attempts=3)
    assert confirmed.cancelling


def test_releases_name_the_agent_and_keep_the_family_only_when_the_run_ended_there() -> None:
    ended = transition(job(), news("failed", reason="x"), NOW, max_attempts=3)
    lost = transition(job(), Requeue("lost"), NOW, max_attempts=3)
    assert [(a.agent, a.family) for a in ended.actions if isinstance(a, ReleaseRun)] == [
        ("desk", "sdxl")
    ]
    assert [(a.agent, a.family) for a in lost.actions if isinstance(a, ReleaseRun)] == [
        ("desk", None)
    ]


@pytest.mark.parametrize(
    ("peak", "budgets", "grown"),
    [(8_000, [20_000], 10_000), (10_000, [11_000, 12_000], 12_000), (8_000, [], 10_000)],
)
def test_an_oom_grows_the_footprint_up_to_the_largest_budget(
    peak: int, budgets: list[int], grown: int
) -> None:
    assert oom_footprint(peak, budgets) == grown


def test_only_a_success_learns_and_only_the_peak_the_agent_measured_during_the_run() -> None:
    measured = transition(job(), news("succeeded", outputs=1, peak_vram_bytes=5 << 30), NOW,
                          max_attempts=3)  # fmt: skip
    unmeasured = transition(job(), news("succeeded", outputs=1), NOW, max_attempts=3)
    failed = transition(job(), news("failed", reason="x", peak_vram_bytes=5 << 30), NOW,
                        max_attempts=3)  # fmt: skip

    def learned(change: Transition) -> list[int | None]:
        return [a.learn_peak_bytes for a in change.actions if isinstance(a, ReleaseRun)]

    assert learned(measured) == [5 << 30]
    assert learned(unmeasured) == [None]
    assert learned(failed) == [None]
