"""Each retry of an image job gets its own ComfyUI prompt id, the same after a restart."""

from __future__ import annotations

import dataclasses
import re
import uuid
from datetime import UTC, datetime

from controller.images import attempt_prompt_id
from controller.store import JobRecord

CANONICAL = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def record(attempts: int) -> JobRecord:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    return JobRecord(
        job_id=str(uuid.UUID(int=1)), prompt_id=str(uuid.UUID(int=2)), state="dispatched",
        workflow={}, vram_hint_bytes=None, priority=0, created_at=now, updated_at=now,
        agent="desk", reason="", progress=None, outputs=(), error=None, attempts=attempts,
        family="sdxl", width=1024, height=1024, batch=1, peak_bytes=None,
    )  # fmt: skip


def test_first_attempt_uses_the_stored_id_and_retries_get_their_own() -> None:
    first = record(1)
    assert attempt_prompt_id(first) == first.prompt_id
    assert attempt_prompt_id(record(0)) == first.prompt_id
    second, third = attempt_prompt_id(record(2)), attempt_prompt_id(record(3))
    assert len({first.prompt_id, second, third}) == 3
    assert CANONICAL.match(second)
    assert CANONICAL.match(third)
    # Derived, not random: the same after a controller restart.
    assert attempt_prompt_id(dataclasses.replace(record(2))) == second
