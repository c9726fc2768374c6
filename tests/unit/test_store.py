"""The controller's job store on real SQLite files in a temporary folder."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from controller.errors import StoreError
from controller.store import (
    FINAL_JOB_STATES,
    JOB_STATES,
    SCHEMA_VERSION,
    AsyncJobStore,
    JobState,
    JobStore,
    transition_allowed,
)
from gpu_common.errors import Conflict, NotFound

T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)

WORKFLOW: dict[str, Any] = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 7, "steps": 20, "model": ["4", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl.safetensors"}},
}

# The transitions the controller relies on, written out independently of the store's table.
ALLOWED: set[tuple[JobState, JobState]] = {
    ("held", "dispatched"),
    ("held", "cancelled"),
    ("held", "failed"),
    ("dispatched", "running"),
    ("dispatched", "held"),
    ("dispatched", "succeeded"),
    ("dispatched", "failed"),
    ("dispatched", "cancelled"),
    ("running", "succeeded"),
    ("running", "failed"),
    ("running", "cancelled"),
    ("running", "held"),
}

# A path from "held" to each state, through allowed transitions.
PATH_TO: dict[JobState, tuple[JobState, ...]] = {
    "held": (),
    "dispatched": ("dispatched",),
    "running": ("dispatched", "running"),
    "succeeded": ("dispatched", "running", "succeeded"),
    "failed": ("failed",),
    "cancelled": ("cancelled",),
}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    job_store = JobStore(tmp_path / "store" / "jobs.sqlite3")
    yield job_store
    job_store.close()


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def job_in(store: JobStore, state: JobState) -> str:
    job_id = store.create(workflow=WORKFLOW, now=T0).job_id
    for step, next_state in enumerate(PATH_TO[state], start=1):
        store.update(job_id, state=next_state, now=at(step))
    return job_id


def test_create_get_round_trip_keeps_every_field(store: JobStore) -> None:
    created = store.create(
        workflow=WORKFLOW,
        vram_hint_bytes=9_100_000_000,
        priority=5,
        reason="needs 9.1 GB, 3.0 GB free",
        family="sdxl",
        width=1024,
        height=768,
        batch=2,
        now=T0,
    )

    assert uuid.UUID(created.job_id).version == 4
    assert uuid.UUID(created.prompt_id).version == 4
    assert created.prompt_id != created.job_id
    assert created.state == "held"
    assert created.attempts == 0
    assert created.outputs == ()
    assert created.progress is None
    assert created.agent is None
    assert created.error is None
    assert created.peak_bytes is None
    assert created.created_at == T0 == created.updated_at
    assert store.get(created.job_id) == created


def test_datetimes_come_back_in_utc(store: JobStore) -> None:
    berlin = timezone(timedelta(hours=1))
    created = store.create(workflow={}, now=T0.astimezone(berlin))
    fetched = store.get(created.job_id)

    assert fetched is not None
    assert fetched.created_at == T0
    assert fetched.created_at.tzinfo is UTC
    assert fetched.updated_at.tzinfo is UTC


def test_naive_now_is_refused(store: JobStore) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        store.create(workflow={}, now=datetime(2025, 3, 1, 12, 0))
    assert store.list() == []


def test_workflow_that_is_not_json_is_refused_and_nothing_written(store: JobStore) -> None:
    with pytest.raises(TypeError):
        store.create(workflow={"3": {"inputs": {"seed": object()}}}, now=T0)
    with pytest.raises(ValueError, match="JSON"):
        store.create(workflow={"3": {"inputs": {"cfg": float("nan")}}}, now=T0)
    assert store.counts()["held"] == 0


def test_get_unknown_is_none_and_update_unknown_is_not_found(store: JobStore) -> None:
    assert store.get(str(uuid.uuid4())) is None
    with pytest.raises(NotFound):
        store.update(str(uuid.uuid4()), state="dispatched", now=T0)


@pytest.mark.parametrize("old", JOB_STATES)
@pytest.mark.parametrize("new", JOB_STATES)
def test_transitions_allowed_and_refused(store: JobStore, old: JobState, new: JobState) -> None:
    job_id = job_in(store, old)
    before = store.get(job_id)
    assert before is not None
    allowed = old == new or (old, new) in ALLOWED
    assert transition_allowed(old, new) == allowed

    if allowed:
        after = store.update(job_id, state=new, reason=f"now {new}", now=at(60))
        assert after.state == new
        assert after.reason == f"now {new}"
        assert store.get(job_id) == after
    else:
        with pytest.raises(Conflict, match=f"is {old}"):
            store.update(job_id, state=new, reason=f"now {new}", now=at(60))
        # The refused update left no trace: its transaction was rolled back.
        assert store.get(job_id) == before


def test_final_states_are_terminal_for_every_other_state(store: JobStore) -> None:
    for final in FINAL_JOB_STATES:
        job_id = job_in(store, final)
        for other in JOB_STATES:
            if other == final:
                continue
            with pytest.raises(Conflict):
                store.update(job_id, state=other, now=at(99))
        record = store.get(job_id)
        assert record is not None
        assert record.state == final


def test_update_changes_only_the_given_fields(store: JobStore) -> None:
    created = store.create(workflow=WORKFLOW, priority=3, family="sdxl", now=T0)
    dispatched = store.update(
        created.job_id, state="dispatched", agent="desk-1", attempts=1, reason="sent", now=at(1)
    )
    progressed = store.update(
        created.job_id, progress={"node": "3", "step": 7, "steps": 20}, now=at(2)
    )

    assert progressed.progress == {"node": "3", "step": 7, "steps": 20}
    assert progressed.updated_at == at(2)
    assert progressed.state == "dispatched"
    assert progressed.agent == "desk-1"
    assert progressed.attempts == 1
    assert progressed.reason == "sent"
    assert progressed.created_at == T0
    assert progressed.priority == 3
    assert progressed.family == "sdxl"
    assert progressed.workflow == WORKFLOW
    assert progressed.prompt_id == created.prompt_id
    assert dispatched.progress is None

    done = store.update(
        created.job_id,
        state="succeeded",
        outputs=["ComfyUI_00001_.png", "ComfyUI_00002_.png"],
        peak_bytes=8_700_000_000,
        progress=None,
        agent=None,
        now=at(3),
    )
    assert done.outputs == ("ComfyUI_00001_.png", "ComfyUI_00002_.png")
    assert done.peak_bytes == 8_700_000_000
    assert done.progress is None
    assert done.agent is None
    assert done.attempts == 1
    assert store.get(created.job_id) == done


def test_a_final_job_keeps_its_state_but_may_be_filled_in(store: JobStore) -> None:
    job_id = job_in(store, "failed")
    record = store.update(job_id, error="CUDA out of memory", state="failed", now=at(9))
    assert record.state == "failed"
    assert record.error == "CUDA out of memory"


def test_update_refuses_bad_values_before_writing(store: JobStore) -> None:
    job_id = store.create(workflow={}, now=T0).job_id
    with pytest.raises(ValueError, match="unknown job state"):
        store.update(job_id, state="lost", now=at(1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative"):
        store.update(job_id, attempts=-1, now=at(1))
    with pytest.raises(TypeError, match="one string"):
        store.update(job_id, outputs="a.png", now=at(1))
    record = store.get(job_id)
    assert record is not None
    assert record.updated_at == T0


def test_unfinished_is_oldest_first_with_creation_order_breaking_ties(store: JobStore) -> None:
    # On virtual time many jobs share one timestamp; they resume in the order they came in.
    late = store.create(workflow={}, now=at(30)).job_id
    tied = [store.create(workflow={}, now=at(10)).job_id for _ in range(4)]
    early = store.create(workflow={}, now=at(5)).job_id
    finished = store.create(workflow={}, now=at(1)).job_id
    store.update(finished, state="cancelled", now=at(2))
    running = store.create(workflow={}, now=at(20)).job_id
    store.update(running, state="dispatched", now=at(21))
    store.update(running, state="running", now=at(22))

    ids = [record.job_id for record in store.unfinished()]
    assert ids == [early, *tied, running, late]


def test_list_filters_by_state_newest_first_and_limits(store: JobStore) -> None:
    ids = [store.create(workflow={}, now=at(i)).job_id for i in range(5)]
    store.update(ids[1], state="failed", error="bad node", now=at(10))
    store.update(ids[3], state="failed", error="bad node", now=at(11))

    assert [r.job_id for r in store.list()] == list(reversed(ids))
    assert [r.job_id for r in store.list(limit=2)] == [ids[4], ids[3]]
    assert [r.job_id for r in store.list(states={"failed"})] == [ids[3], ids[1]]
    assert [r.job_id for r in store.list(states=["held", "failed"], limit=3)] == ids[4:1:-1]
    assert store.list(states=()) == []
    assert store.list(limit=0) == []


def test_list_puts_the_latest_created_first_among_ties(store: JobStore) -> None:
    tied = [store.create(workflow={}, now=at(10)).job_id for _ in range(4)]
    later = store.create(workflow={}, now=at(11)).job_id

    assert [r.job_id for r in store.list()] == [later, *reversed(tied)]
    assert [r.job_id for r in store.list(states=["held"], limit=3)] == [later, tied[3], tied[2]]


def test_counts_cover_every_state(store: JobStore) -> None:
    assert store.counts() == dict.fromkeys(JOB_STATES, 0)
    for state in ("held", "held", "running", "succeeded", "cancelled", "cancelled", "cancelled"):
        job_in(store, state)

    assert store.counts() == {
        "held": 2,
        "dispatched": 0,
        "running": 1,
        "succeeded": 1,
        "failed": 0,
        "cancelled": 3,
    }


def test_learned_values_round_trip_and_overwrite(store: JobStore) -> None:
    assert store.get_learned("image_peaks") == {}
    store.put_learned("image_peaks", "sdxl:1024x1024x1", 8_700_000_000)
    store.put_learned("image_peaks", "sd15:512x512x4", 3_100_000_000)
    store.put_learned("speeds", "llama3.1:8b", {"decode_tokens_per_s": 61.5, "samples": 3})

    store.put_learned("image_peaks", "sdxl:1024x1024x1", 8_900_000_000)

    assert store.get_learned("image_peaks") == {
        "sdxl:1024x1024x1": 8_900_000_000,
        "sd15:512x512x4": 3_100_000_000,
    }
    assert store.get_learned("speeds") == {
        "llama3.1:8b": {"decode_tokens_per_s": 61.5, "samples": 3}
    }
    assert store.get_learned("llm_footprints") == {}
    with pytest.raises(ValueError, match="JSON"):
        store.put_learned("speeds", "broken", float("inf"))
    assert "broken" not in store.get_learned("speeds")


def test_reopening_the_file_finds_everything(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    first = JobStore(path)
    held = first.create(workflow=WORKFLOW, vram_hint_bytes=4_000_000_000, now=T0)
    running = first.create(workflow={}, family="flux", width=1024, height=1024, batch=1, now=T0)
    first.update(running.job_id, state="dispatched", agent="desk-2", attempts=1, now=at(1))
    running_now = first.update(running.job_id, state="running", progress={"step": 3}, now=at(2))
    first.put_learned("llm_footprints", "qwen2.5:14b@8192", 10_400_000_000)
    first.close()

    second = JobStore(path)
    try:
        assert second.get(held.job_id) == held
        assert second.get(running.job_id) == running_now
        # Both created at T0: in the order they were created.
        assert [r.job_id for r in second.unfinished()] == [held.job_id, running.job_id]
        assert second.get_learned("llm_footprints") == {"qwen2.5:14b@8192": 10_400_000_000}
    finally:
        second.close()


def test_file_is_in_wal_mode_with_our_schema_version(store: JobStore) -> None:
    store.create(workflow={}, now=T0)
    other = sqlite3.connect(store.path)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        # A second connection sees the committed row at once: the write was committed.
        assert other.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1
    finally:
        other.close()


def test_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "photos.db"
    foreign = sqlite3.connect(path)
    foreign.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, name TEXT)")
    foreign.execute("INSERT INTO photos (name) VALUES ('cat.png')")
    foreign.commit()
    foreign.close()

    with pytest.raises(StoreError, match="not a job store"):
        JobStore(path)

    # Refusing left the file as it was.
    check = sqlite3.connect(path)
    try:
        assert check.execute("SELECT name FROM photos").fetchall() == [("cat.png",)]
        assert check.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    finally:
        check.close()


def test_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"these are not the pages of a database\n" * 200)
    with pytest.raises(StoreError):
        JobStore(path)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    JobStore(path).close()
    newer = sqlite3.connect(path)
    newer.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    newer.close()

    with pytest.raises(StoreError, match="newer"):
        JobStore(path)


def test_closed_store_raises_store_error(tmp_path: Path) -> None:
    job_store = JobStore(tmp_path / "jobs.sqlite3")
    job_store.close()
    job_store.close()
    with pytest.raises(StoreError, match="closed"):
        job_store.create(workflow={}, now=T0)
    with pytest.raises(StoreError, match="closed"):
        job_store.counts()


async def test_async_store_lands_100_concurrent_creates(tmp_path: Path) -> None:
    async with AsyncJobStore(tmp_path / "jobs.sqlite3") as job_store:
        created = await asyncio.gather(
            *(
                job_store.create(workflow={"n": n}, priority=n % 3, now=at(n % 7))
                for n in range(100)
            )
        )
        assert len({record.job_id for record in created}) == 100
        assert (await job_store.counts())["held"] == 100
        unfinished = await job_store.unfinished()
        assert {r.job_id for r in unfinished} == {r.job_id for r in created}
        assert sorted(r.workflow["n"] for r in unfinished) == list(range(100))
        for record in created[:10]:
            assert await job_store.get(record.job_id) == record


async def test_async_store_runs_every_call_on_one_worker_thread(tmp_path: Path) -> None:
    async with AsyncJobStore(tmp_path / "jobs.sqlite3") as job_store:
        # The connection refuses use from any thread but the one that made it, so these would
        # raise StoreError if any call ran elsewhere.
        records = await asyncio.gather(
            *(job_store.create(workflow={}, now=T0) for _ in range(20)),
        )
        updates, _, listed = await asyncio.gather(
            asyncio.gather(
                *(
                    job_store.update(r.job_id, state="dispatched", agent="desk-1", now=at(1))
                    for r in records
                )
            ),
            job_store.put_learned("speeds", "m", {"decode_tokens_per_s": 50.0}),
            job_store.list(states=["dispatched"]),
        )
        assert [u.state for u in updates] == ["dispatched"] * 20
        # Calls run in the order they were made, so the listing saw every update before it.
        assert len(listed) == 20
        assert await job_store.get_learned("speeds") == {"m": {"decode_tokens_per_s": 50.0}}
        assert len(await job_store.list(states=["dispatched"])) == 20
        await job_store.update(records[0].job_id, state="cancelled", now=at(2))
        with pytest.raises(Conflict):
            await job_store.update(records[0].job_id, state="held", now=at(3))


def test_sync_store_refuses_use_from_another_thread(store: JobStore) -> None:
    # Why the async store's calls all succeeding proves they ran on the one thread that opened it.
    with ThreadPoolExecutor(max_workers=1) as other_thread, pytest.raises(StoreError):
        other_thread.submit(store.counts).result(timeout=5)


async def test_async_store_reports_open_failure_and_closed_use(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.db"
    connection = sqlite3.connect(foreign)
    connection.execute("CREATE TABLE t (x)")
    connection.commit()
    connection.close()

    bad = AsyncJobStore(foreign)
    with pytest.raises(StoreError, match="not a job store"):
        await bad.ready()
    with pytest.raises(StoreError, match="not a job store"):
        await bad.counts()
    await bad.close()

    good = AsyncJobStore(tmp_path / "jobs.sqlite3")
    await good.create(workflow={}, now=T0)
    await good.close()
    await good.close()
    with pytest.raises(StoreError, match="closed"):
        await good.counts()
