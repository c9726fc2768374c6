"""`POST /v1/images` with an Idempotency-Key: the same key returns the same job, and ComfyUI
runs it once; the same key with another body is refused with 422; the store's claims."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from controller.client import StudioClient, StudioRequestError
from controller.store import JobStore, KeyClaim
from gpu_agent.sim.desktop import SimDesktop
from tests.integration.stack import CONTROLLER_TOKEN, running_stack, sd15

T0 = datetime(2026, 5, 4, 9, 0, tzinfo=UTC)
DAY_S = 86400.0


def claim(store: JobStore, key: str, fingerprint: str, at: datetime) -> KeyClaim:
    return store.claim_key(key, fingerprint, now=at, expires_after_s=DAY_S, stale_claim_s=60.0)


def test_a_key_is_claimed_once_then_replayed_refused_or_reported_in_progress(
    tmp_path: Path,
) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    try:
        assert claim(store, "k", "f1", T0) == KeyClaim("new")
        assert claim(store, "k", "f1", T0) == KeyClaim("in_progress")
        job = store.create(workflow={"1": {"class_type": "X"}}, now=T0, idempotency_key="k")
        assert claim(store, "k", "f1", T0) == KeyClaim("replay", job.job_id)
        assert claim(store, "k", "f2", T0) == KeyClaim("mismatch", job.job_id)
        # A day later the key is forgotten and may name a new request.
        assert claim(store, "k", "f2", T0 + timedelta(days=1, seconds=1)) == KeyClaim("new")
    finally:
        store.close()


def test_the_job_and_its_key_are_committed_together(tmp_path: Path) -> None:
    # Whatever point a crash hits, a retry with the key finds the job the key made: the
    # binding commits with the job, so a reopened store replays it.
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path)
    assert claim(store, "k", "f", T0) == KeyClaim("new")
    job = store.create(workflow={"1": {"class_type": "X"}}, now=T0, idempotency_key="k")
    store.close()
    reopened = JobStore(path)
    try:
        later = T0 + timedelta(minutes=5)  # past the stale-claim time
        assert claim(reopened, "k", "f", later) == KeyClaim("replay", job.job_id)
        assert reopened.get(job.job_id) == job
    finally:
        reopened.close()


def test_a_claim_whose_request_died_is_taken_over_and_a_refused_one_released(
    tmp_path: Path,
) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    try:
        assert claim(store, "dead", "f", T0) == KeyClaim("new")
        assert claim(store, "dead", "f", T0 + timedelta(seconds=61)) == KeyClaim("new")
        assert claim(store, "refused", "f", T0) == KeyClaim("new")
        store.release_key("refused")
        assert claim(store, "refused", "other", T0) == KeyClaim("new")
    finally:
        store.close()


async def test_the_same_key_returns_the_same_job_and_comfyui_runs_it_once(
    desktop: SimDesktop, tmp_path: Path
) -> None:
    async with (
        running_stack(desktop, tmp_path / "controller") as stack,
        StudioClient(stack.url, token=CONTROLLER_TOKEN, timeout_s=600.0) as studio,
    ):
        first = await studio.generate_image(sd15(), idempotency_key="run-1/image_a")
        again = await studio.generate_image(sd15(), idempotency_key="run-1/image_a")
        assert again.id == first.id
        await first.wait()
        after = await studio.generate_image(sd15(), idempotency_key="run-1/image_a")
        assert after.id == first.id
        assert after.info.state == "succeeded"
        other = await studio.generate_image(sd15(), idempotency_key="run-1/image_b")
        assert other.id != first.id
        await other.wait()
        assert desktop.comfyui.stats.prompts_run == 2
        assert (await stack.fleet())["jobs_by_state"] == {"succeeded": 2}


async def test_the_same_key_with_another_body_is_refused_with_422(
    desktop: SimDesktop, tmp_path: Path
) -> None:
    async with (
        running_stack(desktop, tmp_path / "controller") as stack,
        StudioClient(stack.url, token=CONTROLLER_TOKEN) as studio,
    ):
        job = await studio.generate_image(sd15(seed=1), idempotency_key="k-1")
        with pytest.raises(StudioRequestError) as caught:
            await studio.generate_image(sd15(seed=2), idempotency_key="k-1")
        assert caught.value.status == 422
        assert caught.value.code == "idempotency_key_reused"
        assert job.id in caught.value.message
        response = await stack.http.post(
            "/v1/images",
            json={"workflow": sd15(seed=1), "priority": 5},
            headers={"Idempotency-Key": '"k-1"'},
        )
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "idempotency_key_reused"


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        ('"unterminated', "no closing quote"),
        ('"a"b"', "after the closing quote"),
        ('"bad\\escape"', "escape only"),
        ("two words", "quoted string"),
        ('""', "1 to 255 printable ASCII"),
        ("x" * 256, "1 to 255 printable ASCII"),
    ],
)
async def test_a_malformed_key_is_a_clear_400(
    desktop: SimDesktop, tmp_path: Path, header: str, fragment: str
) -> None:
    async with running_stack(desktop, tmp_path / "controller") as stack:
        response = await stack.http.post(
            "/v1/images", json={"workflow": sd15()}, headers={"Idempotency-Key": header}
        )
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "bad_request"
        assert fragment in error["message"]
        assert (await stack.fleet())["jobs_by_state"] == {}


async def test_a_held_job_comes_with_retry_after_and_a_bare_key_is_accepted(
    desktop: SimDesktop, tmp_path: Path
) -> None:
    async with running_stack(desktop, tmp_path / "controller") as stack:
        budget = (await stack.fleet())["agents"][0]["budget_bytes"]
        body = {"workflow": sd15(), "vram_bytes": budget}
        first = await stack.http.post("/v1/images", json=body, headers={"Idempotency-Key": "bare"})
        again = await stack.http.post(
            "/v1/images", json=body, headers={"Idempotency-Key": '"bare"'}
        )
        assert first.status_code == again.status_code == 202
        assert first.json()["id"] == again.json()["id"]
        assert again.json()["state"] == "held"
        assert int(again.headers["Retry-After"]) > 0
