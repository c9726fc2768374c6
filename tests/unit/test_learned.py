"""What the controller learns, kept off the request's path: the catalogue is rebuilt only when a
snapshot or a learned value changed, and learned speeds reach the job store in batches, on the
loop's clock and at close, never while a request waits.

Runs on the virtual-time loop with a real SQLite store in a temporary folder.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.errors import StoreError
from controller.knowledge import SPEEDS, Knowledge
from controller.store import AsyncJobStore, JobStore
from gpu_common import clock
from gpu_common.schema import AvailableModelInfo
from tests.waiting import wait_until

SMALL = "llama3.2:3b"
QWEN = "qwen2.5:7b"
MODELS = [
    AvailableModelInfo(
        name=SMALL,
        size_bytes=2_019_393_189,
        family="llama",
        parameter_size="3.2B",
        quantization_level="Q4_K_M",
    ),
    AvailableModelInfo(
        name=QWEN,
        size_bytes=4_683_087_332,
        family="qwen2",
        parameter_size="7.6B",
        quantization_level="Q4_K_M",
    ),
]
# Ollama's final line of a generation: 50 tokens in one second.
FINAL: dict[str, Any] = {
    "done": True,
    "prompt_eval_count": 100,
    "prompt_eval_duration": 50_000_000,
    "eval_count": 50,
    "eval_duration": 1_000_000_000,
    "load_duration": 0,
}
FLUSH_S = 5.0


def counted(models: list[AvailableModelInfo], reads: list[str]) -> Iterator[AvailableModelInfo]:
    """`models`, noting in `reads` that they were read."""
    reads.append("read")
    yield from models


async def test_the_catalogue_is_kept_until_a_snapshot_or_a_learned_speed_changes(
    tmp_path: Path,
) -> None:
    async with AsyncJobStore(tmp_path / "jobs.sqlite3") as store:
        knowledge = Knowledge(store, {})
        await knowledge.load()
        snapshot = object()
        first = knowledge.catalog(MODELS, snapshots=[snapshot])
        assert set(first) == {SMALL, QWEN}

        reads: list[str] = []
        again = knowledge.catalog(counted(MODELS, reads), snapshots=[snapshot])
        assert again == first
        assert reads == [], "nothing changed: the models were not even read"

        newer = knowledge.catalog(counted(MODELS, reads), snapshots=[object()])
        assert reads == ["read"]
        # Same figures in the new snapshot: the profiles built before are reused.
        assert newer[SMALL] is first[SMALL]
        assert newer[QWEN] is first[QWEN]

        await knowledge.record_generation(SMALL, FINAL, was_loaded=False)
        learned = knowledge.catalog(MODELS, snapshots=[snapshot])
        assert learned[SMALL].decode_tokens_per_s == pytest.approx(50.0)
        assert learned[SMALL].measured
        assert learned[QWEN] is first[QWEN], "only the model learned about is rebuilt"
        await store.flush_learned()


async def test_learned_speeds_are_written_in_one_batch_later_and_at_close(
    tmp_path: Path,
) -> None:
    path = tmp_path / "jobs.sqlite3"
    store = AsyncJobStore(path, learned_flush_s=FLUSH_S)
    await store.ready()
    knowledge = Knowledge(store, {})
    await knowledge.load()
    started_s = clock.monotonic_s()
    await knowledge.record_generation(SMALL, FINAL, was_loaded=False)
    await knowledge.record_generation(SMALL, FINAL, was_loaded=False)
    await knowledge.record_generation(QWEN, FINAL, was_loaded=False)
    # Nothing was written while the requests waited.
    assert await store.get_learned(SPEEDS) == {}

    async def written() -> dict[str, Any]:
        return await store.get_learned(SPEEDS)

    batch = await wait_until(written, poll_s=0.5, what="the batch of learned speeds")
    assert clock.monotonic_s() - started_s >= FLUSH_S
    assert batch[SMALL]["samples"] == 2
    assert batch[QWEN]["samples"] == 1

    await knowledge.record_generation(SMALL, FINAL, was_loaded=False)
    await store.close()
    reopened = JobStore(path)
    try:
        assert reopened.get_learned(SPEEDS)[SMALL]["samples"] == 3
    finally:
        reopened.close()


async def test_a_value_stored_now_wins_over_one_pending_under_the_same_key(
    tmp_path: Path,
) -> None:
    async with AsyncJobStore(tmp_path / "jobs.sqlite3", learned_flush_s=FLUSH_S) as store:
        store.put_learned_soon(SPEEDS, SMALL, {"samples": 1})
        await store.put_learned(SPEEDS, SMALL, {"samples": 2})
        await store.flush_learned()
        assert await store.get_learned(SPEEDS) == {SMALL: {"samples": 2}}

        with pytest.raises(ValueError, match="JSON"):
            store.put_learned_soon(SPEEDS, QWEN, {"decode_tokens_per_s": math.inf})
    with pytest.raises(StoreError, match="closed"):
        store.put_learned_soon(SPEEDS, QWEN, {"samples": 1})
