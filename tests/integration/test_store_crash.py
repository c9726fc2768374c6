"""The job store survives SIGKILL: every job whose create returned is found with its last state.

A child process writes jobs and moves them along; it prints one line after each commit. The
parent kills it with SIGKILL right after reading a chosen line, collects whatever else the child
had printed, then opens the file and compares. The child can have committed at most one write it
had not yet printed when the signal landed; that write may or may not be found.

The child is another process, so this runs on a real-time loop (`real_time`): a virtual clock
would jump to the read timeout whenever the child had not printed yet.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from pathlib import Path

import pytest

from controller.store import JobState, JobStore

REPO_ROOT = Path(__file__).resolve().parents[2]
# Real seconds: the child's start (Python's imports included) and its first commit, on a
# machine that may be busy.
READ_TIMEOUT_S = 30.0

# Each job goes held -> dispatched -> running -> final; the writes of several jobs interleave,
# so at any moment jobs sit in every state. Iteration n creates job n and moves jobs n-1, n-2
# and n-3 one step on.
CHILD = """
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from controller.store import JobStore

FINALS = ("succeeded", "failed", "cancelled")
store = JobStore(Path(sys.argv[1]))
t0 = datetime(2025, 1, 1, tzinfo=UTC)
jobs = []
for n in range(int(sys.argv[2])):
    now = t0 + timedelta(seconds=n)
    record = store.create(workflow={"n": n}, family="sdxl", now=now)
    jobs.append(record.job_id)
    print("ready", record.job_id, record.state, flush=True)
    if n >= 1:
        moved = store.update(jobs[n - 1], state="dispatched", agent="desk-1", attempts=1, now=now)
        print("ready", moved.job_id, moved.state, flush=True)
    if n >= 2:
        moved = store.update(jobs[n - 2], state="running", progress={"step": n}, now=now)
        print("ready", moved.job_id, moved.state, flush=True)
    if n >= 3:
        final = FINALS[(n - 3) % 3]
        outputs = [f"job{n - 3}.png"] if final == "succeeded" else []
        moved = store.update(jobs[n - 3], state=final, outputs=outputs, now=now)
        print("ready", moved.job_id, moved.state, flush=True)
"""

NEXT_STATE: dict[JobState, tuple[JobState, ...]] = {
    "held": ("dispatched",),
    "dispatched": ("running",),
    "running": ("succeeded", "failed", "cancelled"),
}


async def read_line(stream: asyncio.StreamReader) -> str:
    line = await asyncio.wait_for(stream.readline(), timeout=READ_TIMEOUT_S)
    if not line.endswith(b"\n"):
        raise AssertionError(f"child stopped before printing enough lines: {line!r}")
    return line.decode()


def printed_states(lines: list[str]) -> dict[str, JobState]:
    """The last state printed for each job, from complete "ready <job_id> <state>" lines."""
    last: dict[str, JobState] = {}
    for line in lines:
        word, job_id, state = line.split()
        assert word == "ready"
        last[job_id] = state  # type: ignore[assignment]
    return last


@pytest.mark.real_time
@pytest.mark.parametrize("kill_after_lines", [1, 2, 9, 150])
async def test_sigkill_loses_no_committed_job(tmp_path: Path, kill_after_lines: int) -> None:
    path = tmp_path / "jobs.sqlite3"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(path),
        "100000",  # far more than it can write before the kill: it dies mid-stream
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
        env=env,
    )
    assert child.stdout is not None
    killed = False
    try:
        lines = [await read_line(child.stdout) for _ in range(kill_after_lines)]
        child.send_signal(signal.SIGKILL)
        killed = True
        # Lines already in the pipe were printed after their commits: they count too.
        rest = await asyncio.wait_for(child.stdout.read(), timeout=READ_TIMEOUT_S)
    finally:
        # Signal only once: a second send_signal would poll() and reap the child behind
        # asyncio's back, which then reports a bogus exit status.
        if not killed:
            child.kill()
        await asyncio.wait_for(child.wait(), timeout=READ_TIMEOUT_S)
    assert child.returncode == -signal.SIGKILL
    complete = rest.decode().split("\n")[:-1]  # a line cut off by the kill was not printed
    expected = printed_states(lines + complete)

    store = JobStore(path)
    try:
        found = {record.job_id: record for record in store.list(limit=len(expected) + 10)}
    finally:
        store.close()

    surprises: list[str] = []
    for job_id, state in expected.items():
        record = found.get(job_id)
        assert record is not None, f"job {job_id} was printed as {state} but is gone"
        if record.state != state:
            assert record.state in NEXT_STATE.get(state, ()), (job_id, state, record.state)
            surprises.append(job_id)
        if record.state == "succeeded":
            assert len(record.outputs) == 1
        if record.state != "held":
            assert (record.agent, record.attempts) == ("desk-1", 1)
    for job_id, record in found.items():
        if job_id not in expected:
            assert record.state == "held"
            surprises.append(job_id)
    # Only the one write between the last commit and its print can be unaccounted for.
    assert len(surprises) <= 1, surprises

    check = sqlite3.connect(path)
    try:
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        check.close()
