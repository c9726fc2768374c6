"""The controller's durable job store (imperative shell: persistence).

Image jobs and what the controller has learned (model speeds, VRAM footprints) live in one SQLite
file in WAL mode with `synchronous=FULL`, so a write that returned survives a SIGKILL or a power
cut. Every write is one transaction, committed before the call returns; the API answers 202 only
after `create` returned, and after a restart `unfinished()` lists every job to resume or reconcile.

`JobStore` is synchronous and owns one connection. `AsyncJobStore` offers the same calls as
coroutines, run in order on one dedicated worker thread that alone makes and uses the connection.

Learned values that change on every request (model speeds) need not cost each request a commit:
`AsyncJobStore.put_learned_soon` keeps the value in memory and writes every value pending, in
one transaction, `learned_flush_s` later on the loop's clock, and at `close()`. A crash loses at
most that last batch of learned values, never a job: jobs are still committed before each call
returns.

sqlite3 errors become `StoreError` in one place (`_sqlite_errors`). A refused transition raises
`Conflict`, an update of an unknown job `NotFound`.
"""

from __future__ import annotations

import asyncio
import builtins
import enum
import json
import logging
import sqlite3
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Final, Literal, TypeVar, get_args

from controller.errors import StoreError
from gpu_common.errors import Conflict, NotFound

log = logging.getLogger(__name__)

JobState = Literal["held", "dispatched", "running", "succeeded", "failed", "cancelled"]
JOB_STATES: Final[tuple[JobState, ...]] = get_args(JobState)
FINAL_JOB_STATES: Final[frozenset[JobState]] = frozenset({"succeeded", "failed", "cancelled"})

# Where each state may go next. A state may always be "updated" to itself (progress, outputs);
# a final state goes nowhere else. "running" -> "held" is the retry of a job its agent lost.
ALLOWED_TRANSITIONS: Final[Mapping[JobState, frozenset[JobState]]] = MappingProxyType(
    {
        "held": frozenset({"dispatched", "cancelled", "failed"}),
        "dispatched": frozenset({"running", "held", "succeeded", "failed", "cancelled"}),
        "running": frozenset({"succeeded", "failed", "cancelled", "held"}),
        "succeeded": frozenset(),
        "failed": frozenset(),
        "cancelled": frozenset(),
    }
)

# "GPUC" in the database header: tells our file apart from any other SQLite file.
APPLICATION_ID: Final = 0x47505543
DEFAULT_BUSY_TIMEOUT_S: Final = 5.0
# How long a learned value given to `put_learned_soon` may wait in memory before it is written.
DEFAULT_LEARNED_FLUSH_S: Final = 5.0

# SQLite's own ceiling on a file's pages: setting max_page_count to it lifts any limit.
_UNLIMITED_PAGES: Final = 4294967294

# Migration i takes the schema from user_version i to i + 1; append, never edit a released one.
_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """
        CREATE TABLE jobs (
            job_id          TEXT PRIMARY KEY,
            prompt_id       TEXT NOT NULL UNIQUE,
            state           TEXT NOT NULL CHECK (state IN
                            ('held', 'dispatched', 'running', 'succeeded', 'failed', 'cancelled')),
            workflow        TEXT NOT NULL,
            vram_hint_bytes INTEGER,
            priority        INTEGER NOT NULL,
            created_at      TEXT NOT NULL,
            updated_at      TEXT NOT NULL,
            agent           TEXT,
            reason          TEXT NOT NULL,
            progress        TEXT,
            outputs         TEXT NOT NULL,
            error           TEXT,
            attempts        INTEGER NOT NULL,
            family          TEXT,
            width           INTEGER,
            height          INTEGER,
            batch           INTEGER,
            peak_bytes      INTEGER
        )
        """,
        "CREATE INDEX jobs_by_state ON jobs (state, created_at, job_id)",
        "CREATE INDEX jobs_by_created ON jobs (created_at, job_id)",
        """
        CREATE TABLE learned (
            kind  TEXT NOT NULL,
            key   TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (kind, key)
        ) WITHOUT ROWID
        """,
    ),
    (
        # Idempotency-Key of `POST /v1/images`: the key, a digest of the request it came with,
        # and the job it made (NULL while the first request with it is being served).
        """
        CREATE TABLE idempotency_keys (
            key         TEXT PRIMARY KEY,
            fingerprint TEXT NOT NULL,
            job_id      TEXT REFERENCES jobs (job_id),
            claimed_at  TEXT NOT NULL
        ) WITHOUT ROWID
        """,
        "CREATE INDEX idempotency_keys_by_claimed ON idempotency_keys (claimed_at)",
    ),
    (
        # A job's input pictures: a JSON list of `StoredInput`s, whose files are kept by content
        # hash in the data folder (written before the job's row).
        "ALTER TABLE jobs ADD COLUMN inputs TEXT NOT NULL DEFAULT '[]'",
    ),
)
SCHEMA_VERSION: Final = len(_MIGRATIONS)

_COLUMN_NAMES: Final = (
    "job_id",
    "prompt_id",
    "state",
    "workflow",
    "vram_hint_bytes",
    "priority",
    "created_at",
    "updated_at",
    "agent",
    "reason",
    "progress",
    "outputs",
    "error",
    "attempts",
    "family",
    "width",
    "height",
    "batch",
    "peak_bytes",
    "inputs",
)
_COLUMNS: Final = ", ".join(_COLUMN_NAMES)

T = TypeVar("T")


class Unset(enum.Enum):
    """Marks an `update` argument that was not given (so `None` can still mean "clear it")."""

    UNSET = enum.auto()

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = Unset.UNSET


@dataclass(frozen=True)
class StoredInput:
    """One input picture of a job: the name the workflow gives it, the SHA-256 and format of
    its file (kept once per content in the data folder), whether it is a mask, and the input
    a mask is painted onto."""

    name: str
    sha256: str
    format: str
    kind: Literal["image", "mask"] = "image"
    mask_of: str | None = None

    def wire(self) -> dict[str, Any]:
        """As stored, in the job's JSON list."""
        return {
            "name": self.name,
            "sha256": self.sha256,
            "format": self.format,
            "kind": self.kind,
            "mask_of": self.mask_of,
        }

    @classmethod
    def from_wire(cls, value: Mapping[str, Any]) -> StoredInput:
        """Read back from the job's JSON list."""
        kind = value.get("kind", "image")
        if kind not in ("image", "mask"):
            raise ValueError(f"unknown input kind {kind!r}")
        return cls(
            name=str(value["name"]),
            sha256=str(value["sha256"]),
            format=str(value["format"]),
            kind=kind,
            mask_of=value.get("mask_of"),
        )


@dataclass(frozen=True)
class JobRecord:
    """One image job as stored. Datetimes are UTC; `outputs` are file names, in order; `inputs`
    its input pictures."""

    job_id: str
    prompt_id: str
    state: JobState
    workflow: dict[str, Any]
    vram_hint_bytes: int | None
    priority: int
    created_at: datetime
    updated_at: datetime
    agent: str | None
    reason: str
    progress: dict[str, Any] | None
    outputs: tuple[str, ...]
    error: str | None
    attempts: int
    family: str | None
    width: int | None
    height: int | None
    batch: int | None
    peak_bytes: int | None
    inputs: tuple[StoredInput, ...] = ()

    @property
    def final(self) -> bool:
        return self.state in FINAL_JOB_STATES


KeyOutcome = Literal["new", "replay", "mismatch", "in_progress"]


@dataclass(frozen=True)
class KeyClaim:
    """What an Idempotency-Key stands for: `new` (claimed now: make the job, then `bind`),
    `replay` (the same request made `job_id` before), `mismatch` (the key came with another
    request) or `in_progress` (the first request with it is still being served)."""

    outcome: KeyOutcome
    job_id: str | None = None


def transition_allowed(old: JobState, new: JobState) -> bool:
    """Whether a job in `old` may be moved to `new` (the same state is always allowed)."""
    return old == new or new in ALLOWED_TRANSITIONS[old]


@contextmanager
def _sqlite_errors(what: str) -> Iterator[None]:
    """The one place where sqlite3's errors become the controller's `StoreError`."""
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreError(f"job store: {what}: {exc}") from exc


def _timestamp(moment: datetime) -> str:
    # One fixed ISO form in UTC, so text order is time order in indexes and ORDER BY.
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"timestamps must be timezone-aware, got {moment!r}")
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _parse_timestamp(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def _log_unwritten(written: asyncio.Future[None]) -> None:
    # A batch written on the timer has no caller to raise to; losing it costs only learning.
    if not written.cancelled() and written.exception() is not None:
        log.warning("learned values not stored: %s", written.exception())


def _to_json(value: Any) -> str:
    # NaN and Infinity are not JSON; refuse them rather than store what other readers reject.
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


def _check_state(state: str) -> JobState:
    if state not in JOB_STATES:
        raise ValueError(f"unknown job state {state!r}")
    return state


def _record(row: sqlite3.Row) -> JobRecord:
    progress = row["progress"]
    return JobRecord(
        job_id=row["job_id"],
        prompt_id=row["prompt_id"],
        state=_check_state(row["state"]),
        workflow=json.loads(row["workflow"]),
        vram_hint_bytes=row["vram_hint_bytes"],
        priority=row["priority"],
        created_at=_parse_timestamp(row["created_at"]),
        updated_at=_parse_timestamp(row["updated_at"]),
        agent=row["agent"],
        reason=row["reason"],
        progress=None if progress is None else json.loads(progress),
        outputs=tuple(json.loads(row["outputs"])),
        error=row["error"],
        attempts=row["attempts"],
        family=row["family"],
        width=row["width"],
        height=row["height"],
        batch=row["batch"],
        peak_bytes=row["peak_bytes"],
        inputs=tuple(StoredInput.from_wire(item) for item in json.loads(row["inputs"])),
    )


_PUT_LEARNED: Final = (
    "INSERT INTO learned (kind, key, value) VALUES (?, ?, ?) "
    "ON CONFLICT (kind, key) DO UPDATE SET value = excluded.value"
)


class JobStore:
    """Jobs and learned values in one SQLite file; one connection, used from one thread.

    Opening creates the parent folder and the schema, or migrates an older schema of ours, and
    refuses (with `StoreError`) any file that is not a job store or is newer than this code.
    """

    def __init__(self, path: Path, *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> None:
        self._path = path
        self._closed = False
        with _sqlite_errors(f"opening {path}"):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"job store: cannot create {path.parent}: {exc}") from exc
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so every write is exactly
            # one transaction, committed before the call returns.
            self._conn = sqlite3.connect(path, isolation_level=None)
            try:
                self._conn.row_factory = sqlite3.Row
                self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
                self._check_identity()
                mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(f"job store: {path} cannot use WAL (journal mode {mode})")
                self._conn.execute("PRAGMA synchronous = FULL")
                self._migrate()
            except BaseException:
                self._conn.close()
                raise

    @property
    def path(self) -> Path:
        return self._path

    # -- jobs ------------------------------------------------------------------------------------

    def create(
        self,
        *,
        workflow: Mapping[str, Any],
        vram_hint_bytes: int | None = None,
        priority: int = 0,
        reason: str = "queued",
        family: str | None = None,
        width: int | None = None,
        height: int | None = None,
        batch: int | None = None,
        inputs: Sequence[StoredInput] = (),
        now: datetime,
        idempotency_key: str | None = None,
    ) -> JobRecord:
        """Write a new job in state "held" and return it once committed.

        Its `prompt_id` is made here and never changes, so dispatching it again after a crash
        names the same ComfyUI prompt. With `idempotency_key` (claimed before with `claim_key`),
        the key is bound to the job in the same transaction: a crash leaves either both or
        neither, never a job that a retry with the key would not find.
        """
        stamp = _timestamp(now)
        workflow_text = _to_json(workflow)
        record = JobRecord(
            job_id=str(uuid.uuid4()),
            prompt_id=str(uuid.uuid4()),
            state="held",
            # Read back from its JSON, so the record equals what get() will return.
            workflow=json.loads(workflow_text),
            vram_hint_bytes=vram_hint_bytes,
            priority=priority,
            created_at=_parse_timestamp(stamp),
            updated_at=_parse_timestamp(stamp),
            agent=None,
            reason=reason,
            progress=None,
            outputs=(),
            error=None,
            attempts=0,
            family=family,
            width=width,
            height=height,
            batch=batch,
            peak_bytes=None,
            inputs=tuple(inputs),
        )
        values: dict[str, Any] = {
            **{name: getattr(record, name) for name in _COLUMN_NAMES},
            "workflow": workflow_text,
            "created_at": stamp,
            "updated_at": stamp,
            "outputs": _to_json([]),
            "inputs": _to_json([item.wire() for item in inputs]),
        }
        marks = ", ".join(f":{name}" for name in _COLUMN_NAMES)
        with self._transaction("create job") as conn:
            conn.execute(f"INSERT INTO jobs ({_COLUMNS}) VALUES ({marks})", values)
            if idempotency_key is not None:
                conn.execute(
                    "UPDATE idempotency_keys SET job_id = ? WHERE key = ?",
                    (record.job_id, idempotency_key),
                )
        return record

    def get(self, job_id: str) -> JobRecord | None:
        """The job with `job_id`, or None when there is none."""
        rows = self._read(f"SELECT {_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,))
        return _record(rows[0]) if rows else None

    def update(
        self,
        job_id: str,
        *,
        now: datetime,
        state: JobState | Unset = UNSET,
        reason: str | Unset = UNSET,
        agent: str | Unset | None = UNSET,
        progress: Mapping[str, Any] | Unset | None = UNSET,
        outputs: Sequence[str] | Unset = UNSET,
        error: str | Unset | None = UNSET,
        attempts: int | Unset = UNSET,
        peak_bytes: int | Unset | None = UNSET,
    ) -> JobRecord:
        """Change only the given fields (and `updated_at`) in one transaction; return the result.

        Raises `NotFound` for an unknown job and `Conflict` for a transition that is not allowed
        (a final state never changes). A final job's other fields may still be filled in.
        """
        changes: dict[str, Any] = {"updated_at": _timestamp(now)}
        if not isinstance(state, Unset):
            changes["state"] = _check_state(state)
        if not isinstance(reason, Unset):
            changes["reason"] = reason
        if not isinstance(agent, Unset):
            changes["agent"] = agent
        if not isinstance(progress, Unset):
            changes["progress"] = None if progress is None else _to_json(progress)
        if not isinstance(outputs, Unset):
            if isinstance(outputs, str):
                raise TypeError("outputs must be a sequence of file names, not one string")
            changes["outputs"] = _to_json(list(outputs))
        if not isinstance(error, Unset):
            changes["error"] = error
        if not isinstance(attempts, Unset):
            if attempts < 0:
                raise ValueError(f"attempts must not be negative, got {attempts}")
            changes["attempts"] = attempts
        if not isinstance(peak_bytes, Unset):
            changes["peak_bytes"] = peak_bytes

        with self._transaction(f"update job {job_id}") as conn:
            row = conn.execute("SELECT state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"no job {job_id}")
            old = _check_state(row["state"])
            new = changes.get("state", old)
            if not transition_allowed(old, new):
                raise Conflict(f"job {job_id} is {old}; it cannot become {new}")
            assignments = ", ".join(f"{column} = ?" for column in changes)
            updated = conn.execute(
                f"UPDATE jobs SET {assignments} WHERE job_id = ? RETURNING {_COLUMNS}",
                (*changes.values(), job_id),
            ).fetchone()
            return _record(updated)

    def unfinished(self) -> builtins.list[JobRecord]:
        """Every job not in a final state, oldest first (ties in creation order): what to resume."""
        final = tuple(FINAL_JOB_STATES)
        marks = ", ".join("?" for _ in final)
        rows = self._read(
            f"SELECT {_COLUMNS} FROM jobs WHERE state NOT IN ({marks}) ORDER BY created_at, rowid",
            final,
        )
        return [_record(row) for row in rows]

    def list(
        self, *, states: Collection[JobState] | None = None, limit: int = 100
    ) -> builtins.list[JobRecord]:
        """Up to `limit` jobs, newest first (ties newest created first), optionally by state."""
        if limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}")
        if states is None:
            rows = self._read(
                f"SELECT {_COLUMNS} FROM jobs ORDER BY created_at DESC, rowid DESC LIMIT ?",
                (limit,),
            )
        else:
            wanted = tuple(_check_state(state) for state in states)
            if not wanted:
                return []
            marks = ", ".join("?" for _ in wanted)
            rows = self._read(
                f"SELECT {_COLUMNS} FROM jobs WHERE state IN ({marks}) "
                "ORDER BY created_at DESC, rowid DESC LIMIT ?",
                (*wanted, limit),
            )
        return [_record(row) for row in rows]

    def counts(self) -> dict[JobState, int]:
        """How many jobs are in each state; every state is present, zero if none."""
        counts: dict[JobState, int] = dict.fromkeys(JOB_STATES, 0)
        for row in self._read("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state", ()):
            counts[_check_state(row["state"])] = row["n"]
        return counts

    # -- idempotency keys ------------------------------------------------------------------------

    def claim_key(
        self,
        key: str,
        fingerprint: str,
        *,
        now: datetime,
        expires_after_s: float,
        stale_claim_s: float,
    ) -> KeyClaim:
        """Claim `key` for a request whose digest is `fingerprint`, in one transaction.

        A key older than `expires_after_s` is forgotten first. A claim never bound to a job
        within `stale_claim_s` (its request died with the process) may be taken over."""
        stamp = _timestamp(now)
        expired = _timestamp(now - timedelta(seconds=expires_after_s))
        stale = _timestamp(now - timedelta(seconds=stale_claim_s))
        with self._transaction(f"claim idempotency key {key!r}") as conn:
            conn.execute("DELETE FROM idempotency_keys WHERE claimed_at < ?", (expired,))
            row = conn.execute(
                "SELECT fingerprint, job_id, claimed_at FROM idempotency_keys WHERE key = ?",
                (key,),
            ).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO idempotency_keys (key, fingerprint, job_id, claimed_at) "
                    "VALUES (?, ?, NULL, ?)",
                    (key, fingerprint, stamp),
                )
                return KeyClaim("new")
            if row["fingerprint"] != fingerprint:
                return KeyClaim("mismatch", row["job_id"])
            if row["job_id"] is not None:
                return KeyClaim("replay", row["job_id"])
            if row["claimed_at"] >= stale:
                return KeyClaim("in_progress")
            conn.execute("UPDATE idempotency_keys SET claimed_at = ? WHERE key = ?", (stamp, key))
            return KeyClaim("new")

    def release_key(self, key: str) -> None:
        """Forget a claim whose request made no job (it was refused), so the key may be used
        again."""
        with self._transaction(f"release idempotency key {key!r}") as conn:
            conn.execute("DELETE FROM idempotency_keys WHERE key = ? AND job_id IS NULL", (key,))

    # -- learned values --------------------------------------------------------------------------

    def get_learned(self, kind: str) -> dict[str, Any]:
        """All values of one kind ("image_peaks", "llm_footprints", "speeds", ...) by key."""
        rows = self._read("SELECT key, value FROM learned WHERE kind = ? ORDER BY key", (kind,))
        return {row["key"]: json.loads(row["value"]) for row in rows}

    def put_learned(self, kind: str, key: str, value: Any) -> None:
        """Store (or replace) one JSON-serialisable value under (kind, key)."""
        text = _to_json(value)
        with self._transaction(f"store learned {kind}/{key}") as conn:
            conn.execute(_PUT_LEARNED, (kind, key, text))

    def put_learned_texts(self, values: Mapping[tuple[str, str], str]) -> None:
        """Store (or replace) several values, already JSON text, by (kind, key), in one
        transaction."""
        if not values:
            return
        with self._transaction(f"store {len(values)} learned value(s)") as conn:
            conn.executemany(
                _PUT_LEARNED, [(kind, key, text) for (kind, key), text in values.items()]
            )

    def hold_size(self, full: bool) -> None:
        """With `full`, the file may not grow by another page, as when its disk is full: SQLite
        then fails a write that needs one with SQLITE_FULL ("database or disk is full"), while a
        write that fits in the pages the file has still succeeds. For fault drills."""
        self._check_open()
        with _sqlite_errors("holding the size"):
            if full:
                pages = self._conn.execute("PRAGMA page_count").fetchone()[0]
                self._conn.execute(f"PRAGMA max_page_count = {int(pages)}")
            else:
                self._conn.execute(f"PRAGMA max_page_count = {_UNLIMITED_PAGES}")

    def close(self) -> None:
        """Close the connection; later calls raise `StoreError`. Closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        with _sqlite_errors("closing"):
            self._conn.close()

    # -- plumbing --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"job store {self._path} is closed")

    def _read(self, sql: str, params: Sequence[Any]) -> builtins.list[sqlite3.Row]:
        self._check_open()
        with _sqlite_errors("reading"):
            return self._conn.execute(sql, params).fetchall()

    @contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed when the block ends, rolled back if it raises."""
        self._check_open()
        with _sqlite_errors(what):
            # IMMEDIATE takes the write lock now, so a read-check-write (update) is atomic even
            # if another process opened the same file.
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.rollback()
                raise
            self._conn.execute("COMMIT")

    def _check_identity(self) -> None:
        application_id = self._conn.execute("PRAGMA application_id").fetchone()[0]
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if application_id == 0 and version == 0:
            tables = self._conn.execute(
                "SELECT COUNT(*) FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%'"
            ).fetchone()[0]
            if tables == 0:
                return  # a new, empty file: ours to set up
        if application_id != APPLICATION_ID:
            raise StoreError(f"job store: {self._path} is an SQLite file but not a job store")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"job store: {self._path} has schema {version}, newer than this code "
                f"({SCHEMA_VERSION}); refusing to touch it"
            )

    def _migrate(self) -> None:
        with self._transaction("migrating schema") as conn:
            # Read again under the write lock: another process may have migrated meanwhile.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for statements in _MIGRATIONS[version:]:
                for statement in statements:
                    conn.execute(statement)
            if version < SCHEMA_VERSION:
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


class AsyncJobStore:
    """`JobStore`'s calls as coroutines, run in order on one dedicated worker thread.

    The connection is made and used only on that thread. Opening starts at construction; await
    `ready()` (or use `async with`) to learn at startup whether the file could be opened. A call
    whose caller is cancelled still runs to completion on the worker: its write is not undone.
    Values given to `put_learned_soon` are written in batches, `learned_flush_s` after the first
    of a batch and at `close()`.
    """

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
        learned_flush_s: float = DEFAULT_LEARNED_FLUSH_S,
    ) -> None:
        self._path = path
        self._closed = False
        self.learned_flush_s = learned_flush_s
        # Learned values not written yet, as JSON text by (kind, key): the next batch.
        self._pending_learned: dict[tuple[str, str], str] = {}
        self._flush_timer: asyncio.TimerHandle | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job-store")
        # The first task on the one worker, so every later call finds it finished.
        self._opening: Future[JobStore] = self._executor.submit(
            JobStore, path, busy_timeout_s=busy_timeout_s
        )

    @property
    def path(self) -> Path:
        return self._path

    async def ready(self) -> None:
        """Wait until the store is open; raises `StoreError` if it could not be opened."""
        await self._call(lambda store: None)

    async def __aenter__(self) -> AsyncJobStore:
        await self.ready()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def create(
        self,
        *,
        workflow: Mapping[str, Any],
        vram_hint_bytes: int | None = None,
        priority: int = 0,
        reason: str = "queued",
        family: str | None = None,
        width: int | None = None,
        height: int | None = None,
        batch: int | None = None,
        inputs: Sequence[StoredInput] = (),
        now: datetime,
        idempotency_key: str | None = None,
    ) -> JobRecord:
        """Write a new held job (bound to `idempotency_key` in the same transaction, when
        given) and return its record."""
        return await self._call(
            lambda store: store.create(
                workflow=workflow,
                vram_hint_bytes=vram_hint_bytes,
                priority=priority,
                reason=reason,
                family=family,
                width=width,
                height=height,
                batch=batch,
                inputs=inputs,
                now=now,
                idempotency_key=idempotency_key,
            )
        )

    async def get(self, job_id: str) -> JobRecord | None:
        """The job with `job_id`, or None when there is none."""
        return await self._call(lambda store: store.get(job_id))

    async def update(
        self,
        job_id: str,
        *,
        now: datetime,
        state: JobState | Unset = UNSET,
        reason: str | Unset = UNSET,
        agent: str | Unset | None = UNSET,
        progress: Mapping[str, Any] | Unset | None = UNSET,
        outputs: Sequence[str] | Unset = UNSET,
        error: str | Unset | None = UNSET,
        attempts: int | Unset = UNSET,
        peak_bytes: int | Unset | None = UNSET,
    ) -> JobRecord:
        """Change the named fields of a job and return the new record; raises `NotFound` for
        an unknown job."""
        return await self._call(
            lambda store: store.update(
                job_id,
                now=now,
                state=state,
                reason=reason,
                agent=agent,
                progress=progress,
                outputs=outputs,
                error=error,
                attempts=attempts,
                peak_bytes=peak_bytes,
            )
        )

    async def unfinished(self) -> builtins.list[JobRecord]:
        """Every job not yet in a final state, oldest first: what a restart resumes."""
        return await self._call(lambda store: store.unfinished())

    async def list(
        self, *, states: Collection[JobState] | None = None, limit: int = 100
    ) -> builtins.list[JobRecord]:
        """The newest jobs, at most `limit`, optionally only those in `states`."""
        return await self._call(lambda store: store.list(states=states, limit=limit))

    async def counts(self) -> dict[JobState, int]:
        """How many jobs are in each state."""
        return await self._call(lambda store: store.counts())

    async def claim_key(
        self,
        key: str,
        fingerprint: str,
        *,
        now: datetime,
        expires_after_s: float,
        stale_claim_s: float,
    ) -> KeyClaim:
        """Claim an idempotency key for a request with `fingerprint`: new, a replay of a
        bound job, a mismatch, or still in progress."""
        return await self._call(
            lambda store: store.claim_key(
                key,
                fingerprint,
                now=now,
                expires_after_s=expires_after_s,
                stale_claim_s=stale_claim_s,
            )
        )

    async def release_key(self, key: str) -> None:
        """Drop a claim whose request failed before it made a job, so a retry may claim it
        again."""
        await self._call(lambda store: store.release_key(key))

    async def get_learned(self, kind: str) -> dict[str, Any]:
        """Every value learned under `kind`, by key."""
        return await self._call(lambda store: store.get_learned(kind))

    async def put_learned(self, kind: str, key: str, value: Any) -> None:
        """Store one learned value under (kind, key) and wait for its commit."""
        # Newer than a value pending under the same key, which must not overwrite it later.
        self._pending_learned.pop((kind, key), None)
        await self._call(lambda store: store.put_learned(kind, key, value))

    def put_learned_soon(self, kind: str, key: str, value: Any) -> None:
        """Store (or replace) one value under (kind, key) within `learned_flush_s`, in one
        transaction with every other value pending then; returns at once, without I/O.

        For values a crash may lose the latest of (a model's running speed average): nothing
        waits for a commit. Raises ValueError for a value JSON cannot hold, and `StoreError`
        once the store is closed."""
        if self._closed:
            raise StoreError(f"job store {self._path} is closed")
        self._pending_learned[(kind, key)] = _to_json(value)
        if self._flush_timer is None:
            loop = asyncio.get_running_loop()
            self._flush_timer = loop.call_later(self.learned_flush_s, self._flush_on_timer)

    async def flush_learned(self) -> None:
        """Write every learned value pending now; returns once they are committed."""
        written = self._write_pending()
        if written is not None:
            await written

    def _flush_on_timer(self) -> None:
        self._flush_timer = None
        written = self._write_pending()
        if written is not None:
            written.add_done_callback(_log_unwritten)

    def _write_pending(self) -> asyncio.Future[None] | None:
        """Hand the pending batch to the worker (after every call queued before); None when
        nothing is pending."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        batch, self._pending_learned = self._pending_learned, {}
        if not batch:
            return None
        return self._submit(lambda store: store.put_learned_texts(batch))

    async def close(self) -> None:
        """Write the learned values pending, close the connection on its thread and let the
        thread end. Closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.flush_learned()
        except StoreError as exc:
            log.warning("learned values lost at close: %s", exc)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._close_on_worker)
        finally:
            # Calls queued before close() ran before it (one worker, in order); none can follow.
            self._executor.shutdown(wait=False)

    async def abandon(self) -> None:
        """Stop as a killed process would: learned values still pending are lost, nothing more
        is written, and every later call raises `StoreError`. What was committed stays, exactly
        as after SIGKILL; the connection is closed on its thread so that no file stays open.
        For crash drills that reopen the same file in the same process."""
        if self._closed:
            return
        self._closed = True
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        self._pending_learned = {}
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._close_on_worker)
        finally:
            self._executor.shutdown(wait=False)

    async def hold_size(self, full: bool) -> None:
        """`JobStore.hold_size` on the worker: with `full` the file cannot grow, as on a full
        disk."""
        await self._call(lambda store: store.hold_size(full))

    def _close_on_worker(self) -> None:
        if self._opening.exception() is None:
            self._opening.result().close()

    def _call(self, work: Callable[[JobStore], T]) -> asyncio.Future[T]:
        if self._closed:
            raise StoreError(f"job store {self._path} is closed")
        return self._submit(work)

    def _submit(self, work: Callable[[JobStore], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._executor, self._on_worker, work)

    def _on_worker(self, work: Callable[[JobStore], T]) -> T:
        # Already finished: opening was the first task on this single worker. If it failed,
        # result() raises its StoreError again for every call.
        return work(self._opening.result())
