"""Image jobs (imperative shell): durable queue, admission by the core, dispatch, follow-up.

Every job is in the store before the API answers 202. `_schedule()` asks `plan_images()` which
held jobs may run where, promises their memory in the ledger, then dispatches each (after the
room plan: unloads confirmed on the GPU, ComfyUI freed). Prompt events from the agents move jobs
on; a reconcile pass asks the agent directly about any job that has been quiet, so a missed event,
an agent restart or a controller restart never loses a job. The prompt id sent to the agent is
fixed per attempt (`attempt_prompt_id`) and the agent looks it up in ComfyUI before posting it
again, so no attempt runs twice.

A job's input pictures (img2img, inpainting) are kept by `InputFiles` in the data folder and
uploaded to the agent's ComfyUI at every submission (`controller.image_inputs`), the workflow
then naming the files ComfyUI stored; a job retried after a restart uploads them again.

What each event does to a job is decided in the core (`controller.domain.image_jobs.transition`)
and returned as actions; this module gathers the events, performs the actions and keeps one
`TrackedJob` per unfinished job.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from controller.agents import AgentLink
from controller.domain.admission import Admit, plan_images
from controller.domain.footprints import ImageKey
from controller.domain.image_jobs import (
    Admitted,
    AgentGone,
    CancelAtAgent,
    CancelRequested,
    Dispatch,
    DispatchFailed,
    Event,
    FetchOutputs,
    Forget,
    GiveBack,
    GrowFootprint,
    ImageJobState,
    InputsUnusable,
    JobUpdate,
    PromptNews,
    ReleaseRun,
    Requeue,
    Retry,
    RoomMade,
    Store,
    Submit,
    SubmitAnswered,
    Transition,
    Unplaceable,
    UploadInputs,
    WorkflowRejected,
    oom_footprint,
    transition,
)
from controller.domain.types import ImageJob, PolicyConfig, RunningImage
from controller.domain.workflows import image_key
from controller.errors import AgentError, AgentRejected, StoreError
from controller.fleet import Fleet
from controller.image_inputs import InputFiles, InputUnusable, NewInput, describe, upload_inputs
from controller.knowledge import Knowledge
from controller.pulse import Pulse
from controller.schema import ImageJobInfo, ProgressInfo
from controller.store import FINAL_JOB_STATES, UNSET, AsyncJobStore, JobRecord
from gpu_common.errors import BadRequest, Conflict, NotFound
from gpu_common.schema import OOM_REASON, PromptInfo

log = logging.getLogger(__name__)

# A dispatched job with no news for this long is asked about directly.
QUIET_S = 2.0
# How often the reconcile pass runs.
RECONCILE_EVERY_S = 1.0
# How many ended jobs `ImageScheduler.recent` keeps, newest first, for the dashboard.
RECENT_JOBS = 50


def attempt_prompt_id(record: JobRecord) -> str:
    """The ComfyUI prompt id of the job's current attempt.

    The first attempt uses the id fixed when the job was created; each retry gets its own id,
    derived from it, because ComfyUI (and the agent) remember an id's outcome and would answer
    a retry under the old id with the old failure. Derived, not stored, so it is the same after a
    restart, and resubmitting it stays idempotent.
    """
    if record.attempts <= 1:
        return record.prompt_id
    return str(uuid.uuid5(uuid.UUID(record.prompt_id), f"attempt-{record.attempts}"))


def _safe_name(filename: str) -> str:
    """A file name that cannot leave its folder, whatever ComfyUI (or an impostor) sent."""
    name = "".join(ch for ch in Path(filename).name if ch.isalnum() or ch in "._-")
    return name if name.strip(".") else "output"


@dataclass(eq=False)
class TrackedJob:
    """What the scheduler keeps in memory of one unfinished image job.

    `record` is the latest stored record (a held job's reason is refreshed in memory on every
    pass, not written); `progress` the latest progress its agent reported; `last_news_at` when
    the agent last spoke of it (minus infinity: ask at once); `cancelling` whether the caller
    asked to cancel it while it was out at an agent. News of the job is applied under `lock`, one
    event at a time. `prompt_ids` are the ids its attempts were sent under. `unstored` is news
    (agent, prompt) whose change the store refused (its disk full): it is applied again on the
    next reconcile pass rather than asked for, since the agent may forget it meanwhile; `fetched`
    the output files already copied for a prompt, by its id, so they are not fetched again.
    `dispatching` is set while a dispatch (making room, then submitting) is under way: the
    reconcile pass leaves such a job alone.
    """

    record: JobRecord
    progress: ProgressInfo | None = None
    last_news_at: float = -math.inf
    cancelling: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    prompt_ids: set[str] = field(default_factory=set)
    unstored: tuple[str, PromptInfo] | None = None
    fetched: dict[str, list[str]] = field(default_factory=dict)
    dispatching: bool = False

    def view(self) -> ImageJobState:
        """The job as the core's transitions see it."""
        return _view(self.record, cancelling=self.cancelling)


def _view(record: JobRecord, *, cancelling: bool = False) -> ImageJobState:
    return ImageJobState(
        job_id=record.job_id,
        state=record.state,
        reason=record.reason,
        attempts=record.attempts,
        agent=record.agent,
        family=record.family,
        prompt_id=attempt_prompt_id(record),
        cancelling=cancelling,
        inputs=len(record.inputs),
    )


class ImageScheduler:
    """The durable image job queue: admission under the planning lock, dispatch to agents,
    following each job to its end.

    Built from what it uses: the job `store`, the agents (`fleet`), the learned footprints
    (`knowledge`), the admission `policy`, the `plan_lock` and `pulse` it shares with the LLM
    router, the `clock` and `wall` clock, and `llm_waiting_since`, which says since when the
    longest-waiting LLM request has waited for room (None: none waits). Finished jobs' files go
    under `outputs_dir`; the scheduling loop runs at least every `tick_interval_s`, and a job is
    dispatched at most `max_attempts` times.
    """

    def __init__(
        self,
        store: AsyncJobStore,
        fleet: Fleet,
        knowledge: Knowledge,
        *,
        policy: PolicyConfig,
        plan_lock: asyncio.Lock,
        pulse: Pulse,
        clock: Callable[[], float],
        wall: Callable[[], datetime],
        llm_waiting_since: Callable[[], float | None],
        outputs_dir: Path,
        tick_interval_s: float,
        max_attempts: int,
        inputs: InputFiles | None = None,
    ) -> None:
        self._store = store
        self._fleet = fleet
        self._knowledge = knowledge
        self._policy = policy
        self._plan_lock = plan_lock
        self._pulse = pulse
        self._clock = clock
        self._wall = wall
        self._llm_waiting_since = llm_waiting_since
        self._tick_interval_s = tick_interval_s
        self._max_attempts = max_attempts
        self.outputs_dir = outputs_dir
        self.inputs = inputs or InputFiles(outputs_dir.parent / "inputs")
        self._jobs: dict[str, TrackedJob] = {}
        # Which job each prompt id sent to an agent belongs to.
        self._by_prompt: dict[str, str] = {}
        self._counts: Counter[str] = Counter()
        # The latest jobs to end, newest first.
        self.recent: deque[JobRecord] = deque(maxlen=RECENT_JOBS)
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None
        self._reconcile_soon = False
        # Admission plans made, for the metrics.
        self.decisions = 0
        self.changes = Pulse()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Resume the unfinished jobs from the store and start the scheduling loop."""
        self._counts = Counter(await self._store.counts())
        self.recent.extend(await self._store.list(states=FINAL_JOB_STATES, limit=RECENT_JOBS))
        now = self._clock()
        for record in await self._store.unfinished():
            self._track(record)
            if record.state in ("dispatched", "running") and record.agent in self._fleet.books:
                # Hold its memory until the agent tells us how it ended; ask it at once (a new
                # `TrackedJob` has had no news).
                peak = self.expected_peak(record)
                self._fleet.books[record.agent].start_image(
                    RunningImage(record.job_id, peak, record.family or "none", now), peak, 0
                )
        if self._jobs:
            log.info("resuming %d unfinished image jobs", len(self._jobs))
        self._loop = asyncio.create_task(self._run(), name="image-scheduler")

    async def stop(self) -> None:
        """Stop the scheduling loop and every dispatch or follow-up under way."""
        tasks = [t for t in (self._loop, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._loop = None

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        # A dispatch or follow-up that failed unexpectedly is logged here, with its traceback,
        # not left to asyncio's "exception was never retrieved" at garbage collection.
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("image scheduler task failed: %r", exc, exc_info=exc)

    async def _run(self) -> None:
        last_reconcile = -math.inf
        while True:
            mark = self._pulse.mark()
            try:
                await self._schedule()
                if self._reconcile_soon or self._clock() - last_reconcile >= RECONCILE_EVERY_S:
                    self._reconcile_soon = False
                    last_reconcile = self._clock()
                    await self._reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("image scheduling pass failed; trying again")
            await self._pulse.wait(self._tick_interval_s, mark)

    # -- queries --------------------------------------------------------------------------

    def held(self) -> list[JobRecord]:
        """The jobs waiting for GPU memory, oldest first."""
        return sorted(
            (t.record for t in self._jobs.values() if t.record.state == "held"),
            key=lambda r: (r.created_at, r.job_id),
        )

    def active(self) -> list[JobRecord]:
        """The jobs out at an agent (dispatched or running), oldest first."""
        return sorted(
            (t.record for t in self._jobs.values() if t.record.state in ("dispatched", "running")),
            key=lambda r: (r.created_at, r.job_id),
        )

    def counts(self) -> dict[str, int]:
        """How many jobs are in each state (states with none left out)."""
        return {state: n for state, n in sorted(self._counts.items()) if n}

    def key_of(self, record: JobRecord) -> ImageKey:
        """The kind of image the job makes, which its learned footprint is kept under."""
        return ImageKey(
            record.family or "none", record.width or 1024, record.height or 1024, record.batch or 1
        )

    def expected_peak(self, record: JobRecord) -> int:
        """The memory the job is expected to need at its peak, in bytes."""
        return self._knowledge.image_peak(self.key_of(record), record.vram_hint_bytes)[0]

    async def get(self, job_id: str) -> JobRecord:
        """The job's latest record; `NotFound` if there is no such job."""
        tracked = self._jobs.get(job_id)
        record = tracked.record if tracked is not None else await self._store.get(job_id)
        if record is None:
            raise NotFound(f"no image job {job_id}")
        return record

    def info(self, record: JobRecord) -> ImageJobInfo:
        """The job as the API shows it, with its latest progress."""
        tracked = self._jobs.get(record.job_id)
        progress = tracked.progress if tracked is not None else None
        if progress is None and record.progress:
            progress = ProgressInfo.model_validate(record.progress)
        return ImageJobInfo(
            id=record.job_id,
            state=record.state,
            reason=record.reason,
            agent=record.agent,
            priority=record.priority,
            progress=progress,
            outputs=[f"/v1/images/{record.job_id}/outputs/{n}" for n in range(len(record.outputs))],
            inputs=[item.name for item in record.inputs],
            error=record.error,
            attempts=record.attempts,
            vram_bytes=record.peak_bytes or self.expected_peak(record),
            created_at=record.created_at,
            updated_at=record.updated_at,
        )

    def output_path(self, record: JobRecord, index: int) -> Path:
        """Where output file `index` of a finished job is kept; `NotFound` past its outputs."""
        if not 0 <= index < len(record.outputs):
            raise NotFound(f"job {record.job_id} has {len(record.outputs)} outputs, not #{index}")
        return self.outputs_dir / record.job_id / record.outputs[index]

    async def watch(self, job_id: str) -> AsyncIterator[ImageJobInfo]:
        """The job's state each time it changes, ending with its final state."""
        last: ImageJobInfo | None = None
        while True:
            mark = self.changes.mark()
            record = await self.get(job_id)
            info = self.info(record)
            if info != last:
                last = info
                yield info
            if record.final:
                return
            await self.changes.wait(15.0, mark)

    # -- changes --------------------------------------------------------------------------

    async def submit(
        self,
        workflow: dict[str, Any],
        *,
        vram_hint_bytes: int | None,
        priority: int,
        idempotency_key: str | None = None,
        inputs: Sequence[NewInput] = (),
    ) -> JobRecord:
        """Store a new job, held until the admission policy places it; `BadRequest` for a
        workflow whose nodes are malformed. Its input pictures (checked by the caller) are
        made durable before the job is; a claimed `idempotency_key` is bound to the job as it
        is stored."""
        for node_id, node in workflow.items():
            if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
                raise BadRequest(f"workflow node {node_id!r} has no class_type")
            if not isinstance(node.get("inputs", {}), dict):
                raise BadRequest(f"workflow node {node_id!r}: inputs must be an object")
        key = image_key(workflow)
        if inputs:
            await self.inputs.save(inputs)
        record = await self._store.create(
            workflow=workflow,
            inputs=[item.stored for item in inputs],
            vram_hint_bytes=vram_hint_bytes,
            priority=priority,
            reason="waiting for GPU memory",
            family=key.family,
            width=key.width,
            height=key.height,
            batch=key.batch,
            now=self._wall(),
            idempotency_key=idempotency_key,
        )
        self._track(record)
        self._counts[record.state] += 1
        peak, source = self._knowledge.image_peak(key, vram_hint_bytes)
        log.info(
            "image job %s accepted: %s, %d bytes (%s); inputs: %s",
            record.job_id,
            key.encode(),
            peak,
            source,
            describe(record.inputs),
        )
        self._pulse.fire()
        self.changes.fire()
        return record

    async def cancel(self, job_id: str) -> JobRecord:
        """Cancel the job: at once while it is held, through its agent once dispatched.
        Returns its record as it is then (a job that ended stays as it ended)."""
        # Under the planning lock, a held job cannot be admitted while it is being cancelled.
        async with self._plan_lock:
            record = await self.get(job_id)
            tracked = self._jobs.get(job_id)
            job = tracked.view() if tracked is not None else _view(record)
            change = self._decide(job_id, CancelRequested(), job=job)
            if not _has(change, CancelAtAgent):
                return await self._carry_out(record, change) or record
        assert record.agent is not None
        try:
            prompt = await self._fleet.links[record.agent].cancel(attempt_prompt_id(record))
        except AgentRejected as exc:
            if exc.status != 404:
                raise
            # Not at the agent yet: the dispatch sees the flag and cancels instead of submitting.
            return await self.get(job_id)
        await self._apply(job_id, record.agent, prompt)
        return await self.get(job_id)

    # -- transitions ----------------------------------------------------------------------

    def _track(self, record: JobRecord) -> TrackedJob:
        tracked = TrackedJob(record)
        self._jobs[record.job_id] = tracked
        self._remember_prompt(tracked)
        return tracked

    def _remember_prompt(self, tracked: TrackedJob) -> None:
        prompt_id = attempt_prompt_id(tracked.record)
        tracked.prompt_ids.add(prompt_id)
        self._by_prompt[prompt_id] = tracked.record.job_id

    def _forget(self, job_id: str) -> None:
        tracked = self._jobs.pop(job_id, None)
        if tracked is not None:
            for prompt_id in tracked.prompt_ids:
                self._by_prompt.pop(prompt_id, None)

    def _decide(self, job_id: str, event: Event, *, job: ImageJobState | None = None) -> Transition:
        """The core's transition for `event` on the job as tracked now (or as `job` says), with
        what it says of the job's memory-only fields noted at once."""
        tracked = self._jobs.get(job_id)
        if job is None and tracked is not None:
            job = tracked.view()
        change = transition(job, event, self._clock(), max_attempts=self._max_attempts)
        if tracked is not None:
            tracked.cancelling = change.cancelling
            if change.news_at is not None:
                tracked.last_news_at = change.news_at
        log.debug("image job %s: %s", job_id, change.reason)
        return change

    async def _carry_out(
        self, record: JobRecord, change: Transition, *, admit: Admit | None = None
    ) -> JobRecord | None:
        """Perform `change`'s actions in order, for the job `record` is the latest known
        record of; returns the record last written, if any.

        `Submit` and `CancelAtAgent` are left to the caller, whose flow continues with the
        agent's answer; `Dispatch` and `GiveBack` need the admission (`admit`).
        """
        outputs: list[str] | None = None
        peak: int | None = None
        stored: JobRecord | None = None
        ended: JobRecord | None = None
        for action in change.actions:
            if ended is not None and isinstance(
                action, (FetchOutputs, GrowFootprint, Retry, Store, Dispatch)
            ):
                continue
            if isinstance(action, FetchOutputs):
                assert record.agent is not None
                tracked = self._jobs.get(record.job_id)
                prompt_id = attempt_prompt_id(record)
                copied = tracked.fetched.get(prompt_id) if tracked is not None else None
                if copied is not None and len(copied) == action.count:
                    outputs = copied
                    continue
                try:
                    outputs = await self._fetch_outputs(record, record.agent, action.count)
                except AgentError as exc:
                    log.warning("job %s: cannot fetch outputs yet: %s", record.job_id, exc)
                    return stored  # the reconcile pass asks again
                if tracked is not None:
                    tracked.fetched[prompt_id] = outputs
            elif isinstance(action, ReleaseRun):
                peak = self._fleet.books[action.agent].finish_image(action.family)
                # Only the agent's readings taken during the run are learned: the snapshots
                # the ledger saw may all have missed a short job, and a peak learned too low
                # admits the next one into an out-of-memory failure.
                if action.learn_peak_bytes:
                    peak = action.learn_peak_bytes
                    await self._knowledge.record_image_peak(self.key_of(record), peak)
            elif isinstance(action, GrowFootprint):
                now = self._clock()
                budgets = [s.budget_bytes for s in self._fleet.states(now) if s.total_bytes]
                grown = oom_footprint(self.expected_peak(record), budgets)
                await self._knowledge.record_image_peak(self.key_of(record), grown)
            elif isinstance(action, Retry):
                await self._requeue(record.job_id, action.why)
            elif isinstance(action, Store):
                try:
                    stored = await self._set(record, action.update, outputs=outputs, peak=peak)
                except Conflict:
                    # The store has the last word: a job it holds as ended (cancelled while
                    # this decision was on its way) stays as it ended.
                    latest = await self._store.get(record.job_id)
                    if latest is None or not latest.final:
                        raise
                    log.info(
                        "image job %s ended as %s before %r could be stored; dropped",
                        record.job_id,
                        latest.state,
                        action.update.state,
                    )
                    # What would act on the job is skipped; what gives resources back is not.
                    stored = ended = latest
            elif isinstance(action, Forget):
                self._forget(record.job_id)
            elif isinstance(action, Dispatch):
                assert admit is not None
                assert stored is not None
                tracked = self._jobs.get(record.job_id)
                if tracked is not None:
                    self._remember_prompt(tracked)
                    tracked.dispatching = True
                self._spawn(self._dispatch(stored, admit))
            elif isinstance(action, GiveBack):
                assert admit is not None
                self._give_back(admit)
        if ended is not None:
            self._forget(record.job_id)
            self.changes.fire()
        return stored

    async def _set(
        self, record: JobRecord, update: JobUpdate, *, outputs: list[str] | None, peak: int | None
    ) -> JobRecord:
        """Write `update` (and with it a finished job's outputs, progress and peak)."""
        tracked = self._jobs.get(record.job_id)
        progress = tracked.progress if tracked is not None else None
        result = update.with_result
        updated = await self._store.update(
            record.job_id,
            now=self._wall(),
            state=update.state if update.state is not None else UNSET,
            reason=update.reason if update.reason is not None else UNSET,
            agent=None if update.clear_agent else (update.agent or UNSET),
            progress=progress.model_dump() if result and progress is not None else UNSET,
            outputs=outputs if result and outputs is not None else UNSET,
            error=update.error if update.error is not None else UNSET,
            attempts=update.attempts if update.attempts is not None else UNSET,
            peak_bytes=peak if result else UNSET,
        )
        # The state before this write is the last one written, which may be newer than the
        # `record` the caller holds (a cancel can land while a dispatch is being recorded).
        tracked = self._jobs.get(record.job_id)
        before = tracked.record.state if tracked is not None else record.state
        if updated.state != before:
            self._counts[before] -= 1
            self._counts[updated.state] += 1
            if updated.final:
                self.recent.appendleft(updated)
            log.info(
                "image job %s: %s -> %s (%s)", record.job_id, before, updated.state, updated.reason
            )
        if tracked is not None:
            tracked.record = updated
        elif not updated.final:
            self._track(updated)
        self.changes.fire()
        self._pulse.fire()
        return updated

    def _give_back(self, admit: Admit) -> None:
        """Drop what an admission promised on its agent: the job will not be dispatched."""
        book = self._fleet.books[admit.agent]
        book.finish_image(None, ran=False)
        book.unloading.difference_update(admit.room.unload)
        book.freeing_comfy -= int(admit.room.free_comfy)

    async def _requeue(self, job_id: str, why: str) -> None:
        """Back to held (the memory promise is dropped) unless it has been tried enough."""
        tracked = self._jobs.get(job_id)
        if tracked is None:
            return
        await self._carry_out(tracked.record, self._decide(job_id, Requeue(why)))

    # -- scheduling -----------------------------------------------------------------------

    async def _schedule(self) -> None:
        fleet = self._fleet
        admitted: list[tuple[JobRecord, Admit]] = []
        holds: list[tuple[JobRecord, str]] = []
        impossible: list[tuple[JobRecord, str]] = []
        async with self._plan_lock:
            held = self.held()
            if not held:
                for book in fleet.books.values():
                    book.drain_since = None
                return
            now = self._clock()
            age_base = self._wall()
            states = {s.name: s for s in fleet.states(now)}
            jobs = [
                ImageJob(
                    r.job_id,
                    self.expected_peak(r),
                    r.family or "none",
                    r.priority,
                    now - (age_base - r.created_at).total_seconds(),
                )
                for r in held
            ]
            by_id = {j.job_id: j for j in jobs}
            decisions = plan_images(
                jobs,
                list(states.values()),
                now,
                self._policy,
                llm_waiting_since=self._llm_waiting_since(),
            )
            self.decisions += 1
            drains: dict[str, float] = {}
            for decision in decisions:
                record = self._jobs[decision.job_id].record
                if isinstance(decision, Admit):
                    job = by_id[decision.job_id]
                    book = fleet.books[decision.agent]
                    agent = states[decision.agent]
                    book.start_image(
                        RunningImage(job.job_id, job.peak_bytes, job.family, now),
                        decision.need_bytes,
                        # What ComfyUI holds once the plan is carried out, so only the job's
                        # own growth beyond it counts as shown.
                        agent.comfy_floor_bytes if decision.room.free_comfy else agent.comfy_bytes,
                    )
                    book.unloading.update(decision.room.unload)
                    book.freeing_comfy += int(decision.room.free_comfy)
                    admitted.append((record, decision))
                elif decision.impossible:
                    impossible.append((record, decision.reason))
                else:
                    if decision.drain_agent is not None:
                        since = by_id[decision.job_id].submitted_at
                        drains[decision.drain_agent] = min(
                            drains.get(decision.drain_agent, since), since
                        )
                    if decision.reason != record.reason:
                        holds.append((record, decision.reason))
            for name, book in fleet.books.items():
                book.drain_since = drains.get(name)
        for record, decision in admitted:
            change = self._decide(record.job_id, Admitted(decision.agent, decision.reason))
            try:
                await self._carry_out(record, change, admit=decision)
            except Conflict:
                # Cancelled between the decision and this write: give its promise back.
                self._give_back(decision)
        if holds:
            # A held job's reason changes with every pass (what runs, what is free, how long it
            # waited): it is served from memory, not written to the store each time. A restart
            # recomputes it on the first pass.
            for record, reason in holds:
                tracked = self._jobs.get(record.job_id)
                if tracked is not None:
                    tracked.record = dataclasses.replace(tracked.record, reason=reason)
            self.changes.fire()
        for record, reason in impossible:
            await self._carry_out(record, self._decide(record.job_id, Unplaceable(reason)))

    async def _dispatch(self, record: JobRecord, admit: Admit) -> None:
        fleet = self._fleet
        link = fleet.links[admit.agent]
        try:
            async with fleet.action_locks[admit.agent]:
                for model in admit.room.unload:
                    await link.unload(model)
                    log.info("unloaded %s on %s for image job %s", model, link.name, record.job_id)
                if admit.room.free_comfy:
                    await link.free()
                    log.info(
                        "freed ComfyUI's cache on %s for image job %s", link.name, record.job_id
                    )
                if not admit.room.empty:
                    # The marks below come off only once the status shows the changes.
                    await fleet.refresh(admit.agent)
            change = self._decide(record.job_id, RoomMade(admit.agent))
            if not _has(change, Submit):
                await self._carry_out(self._latest(record), change)
                return
            workflow = record.workflow
            if _has(change, UploadInputs):
                workflow = await self._with_inputs(link, record)
            prompt = await link.submit(workflow, attempt_prompt_id(record))
        except InputUnusable as exc:
            await self._dispatch_ended(record, InputsUnusable(str(exc)))
            return
        except AgentRejected as exc:
            event: Event
            if exc.status == 400:
                event = WorkflowRejected(admit.agent, exc.agent_message)
            else:
                event = DispatchFailed(f"dispatch to {admit.agent} refused: {exc}")
            await self._dispatch_ended(record, event)
            return
        except AgentError as exc:
            await self._dispatch_ended(
                record, DispatchFailed(f"dispatch to {admit.agent} failed: {exc}")
            )
            return
        finally:
            if (tracked := self._jobs.get(record.job_id)) is not None:
                tracked.dispatching = False
            book = fleet.books[admit.agent]
            book.unloading.difference_update(admit.room.unload)
            book.freeing_comfy -= int(admit.room.free_comfy)
            self._pulse.fire()
        answered = self._decide(record.job_id, SubmitAnswered(prompt.state))
        if _has(answered, CancelAtAgent):
            # A cancel arrived while the submission was on its way: carry it out now.
            with contextlib.suppress(AgentError):
                prompt = await link.cancel(attempt_prompt_id(record))
        await self._apply(record.job_id, admit.agent, prompt)

    async def _dispatch_ended(self, record: JobRecord, event: Event) -> None:
        """A dispatch that did not submit: carry out what `event` decides. When the store
        refuses the write (its disk full), the job stays dispatched there; the reconcile pass
        finds its prompt unknown and plans it again."""
        try:
            await self._carry_out(self._latest(record), self._decide(record.job_id, event))
        except StoreError as exc:
            log.warning("image job %s: %s; not stored (%s)", record.job_id, event, exc)

    async def _with_inputs(self, link: AgentLink, record: JobRecord) -> dict[str, Any]:
        """The job's workflow once its pictures are on `link`'s ComfyUI, naming them."""
        workflow = await upload_inputs(link, self.inputs, record.workflow, record.inputs)
        log.info(
            "uploaded %d input picture(s) of image job %s to %s",
            len(record.inputs),
            record.job_id,
            link.name,
        )
        return workflow

    def _latest(self, record: JobRecord) -> JobRecord:
        """The job's latest record: the tracked one, else (the job ended) `record`."""
        tracked = self._jobs.get(record.job_id)
        return tracked.record if tracked is not None else record

    # -- following ------------------------------------------------------------------------

    def agent_reconnected(self, agent: str) -> None:
        """The event stream from `agent` (re)opened: news of its jobs may have been lost
        meanwhile, so the next pass asks it about each of them instead of waiting `QUIET_S`."""
        for tracked in self._jobs.values():
            record = tracked.record
            if record.agent == agent and record.state in ("dispatched", "running"):
                tracked.last_news_at = -math.inf
                self._reconcile_soon = True

    def on_prompt(self, agent: str, prompt: PromptInfo) -> None:
        """An agent's event about one of its prompts: the job it belongs to moves on."""
        job_id = self._by_prompt.get(prompt.prompt_id)
        if job_id is not None and job_id in self._jobs:
            self._spawn(self._apply(job_id, agent, prompt))

    async def _apply(self, job_id: str, agent: str, prompt: PromptInfo) -> None:
        tracked = self._jobs.get(job_id)
        if tracked is None:
            return  # it ended: whatever the agent says now changes nothing
        async with tracked.lock:
            await self._apply_locked(job_id, agent, prompt)

    async def _apply_locked(self, job_id: str, agent: str, prompt: PromptInfo) -> None:
        tracked = self._jobs.get(job_id)
        if tracked is None:
            return
        news = PromptNews(
            agent=agent,
            prompt_id=prompt.prompt_id,
            state=prompt.state,
            reason=prompt.reason,
            error=prompt.error,
            outputs=len(prompt.outputs),
            oom=prompt.reason == OOM_REASON,
            peak_vram_bytes=prompt.peak_vram_bytes,
        )
        change = self._decide(job_id, news)
        if change.news_at is not None:
            tracked.progress = ProgressInfo(
                node=prompt.node,
                step=prompt.step,
                steps=prompt.steps,
                nodes_done=prompt.nodes_done,
                nodes_total=prompt.nodes_total,
            )
            self.changes.fire()
        try:
            await self._carry_out(tracked.record, change)
        except StoreError as exc:
            # Keep the news: the agent that gave it may forget it (a restart) before the store
            # takes writes again, and asking then would run the prompt a second time.
            if tracked.unstored is None:
                log.warning("image job %s: news kept to store again: %s", job_id, exc)
            tracked.unstored = (agent, prompt)
            return
        if tracked.unstored is not None and tracked.unstored[1].prompt_id == prompt.prompt_id:
            tracked.unstored = None

    async def _fetch_outputs(self, record: JobRecord, agent: str, count: int) -> list[str]:
        link = self._fleet.links[agent]
        folder = self.outputs_dir / record.job_id
        names = []
        for index in range(count):
            data, filename, _ = await link.output(attempt_prompt_id(record), index)
            name = f"{index:02d}-{_safe_name(filename)}"
            await asyncio.to_thread(_write_file, folder / name, data)
            names.append(name)
        return names

    async def _reconcile(self) -> None:
        """Ask agents directly about dispatched jobs that have been quiet."""
        now = self._clock()
        for record in [t.record for t in self._jobs.values()]:
            if record.state not in ("dispatched", "running") or record.agent is None:
                continue
            tracked = self._jobs.get(record.job_id)
            if tracked is not None and tracked.unstored is not None:
                await self._apply(record.job_id, *tracked.unstored)
                continue
            if tracked is not None and tracked.dispatching:
                continue  # its dispatch is still making room or submitting
            last_news_at = tracked.last_news_at if tracked is not None else -math.inf
            if now - last_news_at < QUIET_S:
                continue
            link = self._fleet.links.get(record.agent)
            if link is None:
                gone = self._decide(record.job_id, AgentGone())
                await self._carry_out(self._latest(record), gone)
                continue
            healthy, _ = link.health()
            if not healthy:
                continue  # its jobs wait for it
            try:
                prompt = await link.prompt(attempt_prompt_id(record))
                if prompt is None and record.state == "dispatched":
                    # Neither the agent nor its ComfyUI has it: the dispatch never arrived
                    # (the controller stopped or the link broke while it made room). Its room
                    # may not have been made, so the job is planned again.
                    await self._requeue(
                        record.job_id, f"its dispatch to {record.agent} never arrived"
                    )
                    continue
                if prompt is None:
                    # The agent restarted and forgot it; the same id again is safe (it asks
                    # ComfyUI first), and runs it only if ComfyUI never had it. Its pictures
                    # go up again first: a restarted ComfyUI may have lost its input folder.
                    workflow = record.workflow
                    if record.inputs:
                        workflow = await self._with_inputs(link, record)
                    prompt = await link.submit(workflow, attempt_prompt_id(record))
            except InputUnusable as exc:
                lost = InputsUnusable(str(exc))
                await self._carry_out(self._latest(record), self._decide(record.job_id, lost))
                continue
            except AgentRejected as exc:
                rejected = WorkflowRejected(record.agent, exc.agent_message)
                await self._carry_out(self._latest(record), self._decide(record.job_id, rejected))
                continue
            except AgentError as exc:
                log.info("reconcile of job %s deferred: %s", record.job_id, exc)
                continue
            await self._apply(record.job_id, record.agent, prompt)


def _has(change: Transition, kind: type) -> bool:
    return any(isinstance(action, kind) for action in change.actions)


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".part")
    temporary.write_bytes(data)
    temporary.replace(path)
