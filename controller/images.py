"""Image jobs (imperative shell): durable queue, admission by the core, dispatch, follow-up.

Every job is in the store before the API answers 202. `_schedule()` asks `plan_images()` which
held jobs may run where, promises their memory in the ledger, then dispatches each (after the
room plan: unloads confirmed on the GPU, ComfyUI freed). Prompt events from the agents move jobs
on; a reconcile pass asks the agent directly about any job that has been quiet, so a missed event,
an agent restart or a controller restart never loses a job. The prompt id sent to the agent is
fixed per attempt (`attempt_prompt_id`) and the agent looks it up in ComfyUI before posting it
again, so no attempt runs twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controller.domain.admission import Admit, plan_images
from controller.domain.footprints import ImageKey
from controller.domain.types import ImageJob, RunningImage
from controller.domain.workflows import image_key
from controller.errors import AgentError, AgentRejected
from controller.pulse import Pulse
from controller.schema import ImageJobInfo, ProgressInfo
from controller.store import UNSET, JobRecord, JobState, Unset
from gpu_common.errors import BadRequest, Conflict, NotFound
from gpu_common.schema import FINAL_STATES, OOM_REASON, PromptInfo

if TYPE_CHECKING:
    from controller.engine import Engine

log = logging.getLogger(__name__)

# A dispatched job with no news for this long is asked about directly.
QUIET_S = 2.0
# How often the reconcile pass runs.
RECONCILE_EVERY_S = 1.0
# After an out-of-memory failure the job's footprint is raised by this factor before a retry.
OOM_GROWTH = 1.25


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


class ImageScheduler:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._jobs: dict[str, JobRecord] = {}
        self._progress: dict[str, ProgressInfo] = {}
        self._by_prompt: dict[str, str] = {}
        self._last_news: dict[str, float] = {}
        self._cancelling: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._counts: Counter[str] = Counter()
        # Last state written per unfinished job, in the order the store applied the writes.
        self._states: dict[str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None
        self._reconcile_soon = False
        self.outputs_dir = engine.settings.data_dir / "outputs"
        self.changes = Pulse()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        engine = self._engine
        self._counts = Counter(await engine.store.counts())
        now = engine.clock()
        for record in await engine.store.unfinished():
            self._jobs[record.job_id] = record
            self._by_prompt[attempt_prompt_id(record)] = record.job_id
            if record.state in ("dispatched", "running") and record.agent in engine.books:
                # Hold its memory until the agent tells us how it ended; ask it at once.
                peak = self.expected_peak(record)
                engine.books[record.agent].start_image(
                    RunningImage(record.job_id, peak, record.family or "none", now), peak, 0
                )
                self._last_news[record.job_id] = -math.inf
        if self._jobs:
            log.info("resuming %d unfinished image jobs", len(self._jobs))
        self._loop = asyncio.create_task(self._run(), name="image-scheduler")

    async def stop(self) -> None:
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
        task.add_done_callback(self._tasks.discard)

    async def _run(self) -> None:
        engine = self._engine
        last_reconcile = -math.inf
        while True:
            mark = engine.pulse.mark()
            try:
                await self._schedule()
                if self._reconcile_soon or engine.clock() - last_reconcile >= RECONCILE_EVERY_S:
                    self._reconcile_soon = False
                    last_reconcile = engine.clock()
                    await self._reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("image scheduling pass failed; trying again")
            await engine.pulse.wait(engine.settings.tick_interval_s, mark)

    # -- queries --------------------------------------------------------------------------

    def held(self) -> list[JobRecord]:
        return sorted(
            (r for r in self._jobs.values() if r.state == "held"),
            key=lambda r: (r.created_at, r.job_id),
        )

    def counts(self) -> dict[str, int]:
        return {state: n for state, n in sorted(self._counts.items()) if n}

    def key_of(self, record: JobRecord) -> ImageKey:
        return ImageKey(
            record.family or "none", record.width or 1024, record.height or 1024, record.batch or 1
        )

    def expected_peak(self, record: JobRecord) -> int:
        return self._engine.knowledge.image_peak(self.key_of(record), record.vram_hint_bytes)[0]

    async def get(self, job_id: str) -> JobRecord:
        record = self._jobs.get(job_id) or await self._engine.store.get(job_id)
        if record is None:
            raise NotFound(f"no image job {job_id}")
        return record

    def info(self, record: JobRecord) -> ImageJobInfo:
        progress = self._progress.get(record.job_id)
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
            error=record.error,
            attempts=record.attempts,
            vram_bytes=record.peak_bytes or self.expected_peak(record),
            created_at=record.created_at,
            updated_at=record.updated_at,
        )

    def output_path(self, record: JobRecord, index: int) -> Path:
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
        self, workflow: dict[str, Any], *, vram_hint_bytes: int | None, priority: int
    ) -> JobRecord:
        for node_id, node in workflow.items():
            if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
                raise BadRequest(f"workflow node {node_id!r} has no class_type")
            if not isinstance(node.get("inputs", {}), dict):
                raise BadRequest(f"workflow node {node_id!r}: inputs must be an object")
        key = image_key(workflow)
        engine = self._engine
        record = await engine.store.create(
            workflow=workflow,
            vram_hint_bytes=vram_hint_bytes,
            priority=priority,
            reason="waiting for GPU memory",
            family=key.family,
            width=key.width,
            height=key.height,
            batch=key.batch,
            now=engine.wall(),
        )
        self._jobs[record.job_id] = record
        self._by_prompt[record.prompt_id] = record.job_id
        self._counts[record.state] += 1
        peak, source = engine.knowledge.image_peak(key, vram_hint_bytes)
        log.info(
            "image job %s accepted: %s, %d bytes (%s)", record.job_id, key.encode(), peak, source
        )
        engine.pulse.fire()
        self.changes.fire()
        return record

    async def cancel(self, job_id: str) -> JobRecord:
        # Under the planning lock, a held job cannot be admitted while it is being cancelled.
        async with self._engine.plan_lock:
            record = await self.get(job_id)
            if record.final:
                return record
            if record.state == "held":
                return await self._set(record, state="cancelled", reason="cancelled by the caller")
        assert record.agent is not None
        self._cancelling.add(job_id)
        try:
            prompt = await self._engine.links[record.agent].cancel(attempt_prompt_id(record))
        except AgentRejected as exc:
            if exc.status != 404:
                raise
            # Not at the agent yet: the dispatch sees the flag and cancels instead of submitting.
            return await self.get(job_id)
        await self._apply(job_id, record.agent, prompt)
        return await self.get(job_id)

    async def _set(
        self,
        record: JobRecord,
        *,
        state: JobState | Unset = UNSET,
        reason: str | Unset = UNSET,
        agent: str | Unset | None = UNSET,
        progress: dict[str, Any] | Unset | None = UNSET,
        outputs: list[str] | Unset = UNSET,
        error: str | Unset | None = UNSET,
        attempts: int | Unset = UNSET,
        peak_bytes: int | Unset | None = UNSET,
    ) -> JobRecord:
        updated = await self._engine.store.update(
            record.job_id,
            now=self._engine.wall(),
            state=state,
            reason=reason,
            agent=agent,
            progress=progress,
            outputs=outputs,
            error=error,
            attempts=attempts,
            peak_bytes=peak_bytes,
        )
        # The state before this write is the last one written, which may be newer than the
        # `record` the caller holds (a cancel can land while a dispatch is being recorded).
        before = self._states.get(record.job_id, record.state)
        self._states[record.job_id] = updated.state
        if updated.state != before:
            self._counts[before] -= 1
            self._counts[updated.state] += 1
            log.info(
                "image job %s: %s -> %s (%s)",
                record.job_id,
                before,
                updated.state,
                updated.reason,
            )
        if updated.final:
            self._states.pop(record.job_id, None)
            self._jobs.pop(record.job_id, None)
            self._progress.pop(record.job_id, None)
            self._last_news.pop(record.job_id, None)
            self._cancelling.discard(record.job_id)
        else:
            self._jobs[record.job_id] = updated
        self.changes.fire()
        self._engine.pulse.fire()
        return updated

    # -- scheduling -----------------------------------------------------------------------

    async def _schedule(self) -> None:
        engine = self._engine
        admitted: list[tuple[JobRecord, Admit]] = []
        holds: list[tuple[JobRecord, str]] = []
        impossible: list[tuple[JobRecord, str]] = []
        async with engine.plan_lock:
            held = self.held()
            if not held:
                for book in engine.books.values():
                    book.drain_since = None
                return
            now = engine.clock()
            age_base = engine.wall()
            states = {s.name: s for s in engine.states(now)}
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
                engine.policy,
                llm_waiting_since=engine.llm.waiting_since,
            )
            engine.decisions += 1
            drains: dict[str, float] = {}
            for decision in decisions:
                record = self._jobs[decision.job_id]
                if isinstance(decision, Admit):
                    job = by_id[decision.job_id]
                    book = engine.books[decision.agent]
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
            for name, book in engine.books.items():
                book.drain_since = drains.get(name)
        for record, decision in admitted:
            try:
                updated = await self._set(
                    record,
                    state="dispatched",
                    agent=decision.agent,
                    reason=decision.reason,
                    attempts=record.attempts + 1,
                )
            except Conflict:
                # Cancelled between the decision and this write: give its promise back.
                book = engine.books[decision.agent]
                book.finish_image(None)
                book.unloading.difference_update(decision.room.unload)
                continue
            self._by_prompt[attempt_prompt_id(updated)] = record.job_id
            self._last_news[record.job_id] = engine.clock()
            self._spawn(self._dispatch(updated, decision))
        if holds:
            # A held job's reason changes with every pass (what runs, what is free, how long it
            # waited): it is served from memory, not written to the store each time. A restart
            # recomputes it on the first pass.
            for record, reason in holds:
                if record.job_id in self._jobs:
                    self._jobs[record.job_id] = dataclasses.replace(record, reason=reason)
            self.changes.fire()
        for record, reason in impossible:
            await self._set(record, state="failed", reason=reason, error=reason)

    async def _dispatch(self, record: JobRecord, admit: Admit) -> None:
        engine = self._engine
        link = engine.links[admit.agent]
        try:
            async with engine.action_locks[admit.agent]:
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
                    await engine.refresh(admit.agent)
            if record.job_id in self._cancelling:
                engine.books[admit.agent].finish_image(None)
                current = self._jobs.get(record.job_id)
                if current is not None:
                    await self._set(current, state="cancelled", reason="cancelled by the caller")
                return
            prompt = await link.submit(record.workflow, attempt_prompt_id(record))
        except AgentRejected as exc:
            if exc.status == 400:
                engine.books[admit.agent].finish_image(None)
                await self._set(
                    record,
                    state="failed",
                    reason="ComfyUI rejected the workflow",
                    error=exc.agent_message,
                )
            else:
                await self._requeue(record, f"dispatch to {admit.agent} refused: {exc}")
            return
        except AgentError as exc:
            await self._requeue(record, f"dispatch to {admit.agent} failed: {exc}")
            return
        finally:
            book = engine.books[admit.agent]
            book.unloading.difference_update(admit.room.unload)
            book.freeing_comfy -= int(admit.room.free_comfy)
            engine.pulse.fire()
        if record.job_id in self._cancelling and prompt.state not in FINAL_STATES:
            # A cancel arrived while the submission was on its way: carry it out now.
            with contextlib.suppress(AgentError):
                prompt = await link.cancel(attempt_prompt_id(record))
        await self._apply(record.job_id, admit.agent, prompt)

    async def _requeue(self, record: JobRecord, why: str) -> None:
        """Back to held (the memory promise is dropped) unless it has been tried enough."""
        current = self._jobs.get(record.job_id)
        if current is None or current.final:
            return
        if current.agent is not None:
            self._engine.books[current.agent].finish_image(None)
        if current.attempts >= self._engine.settings.max_image_attempts:
            await self._set(
                current,
                state="failed",
                reason=f"gave up after {current.attempts} attempts: {why}",
                error=why,
            )
        else:
            await self._set(current, state="held", agent=None, reason=f"{why}; will retry")

    # -- following ------------------------------------------------------------------------

    def agent_reconnected(self, agent: str) -> None:
        """The event stream from `agent` (re)opened: news of its jobs may have been lost
        meanwhile, so the next pass asks it about each of them instead of waiting `QUIET_S`."""
        for record in self._jobs.values():
            if record.agent == agent and record.state in ("dispatched", "running"):
                self._last_news[record.job_id] = -math.inf
                self._reconcile_soon = True

    def on_prompt(self, agent: str, prompt: PromptInfo) -> None:
        job_id = self._by_prompt.get(prompt.prompt_id)
        if job_id is not None and job_id in self._jobs:
            self._spawn(self._apply(job_id, agent, prompt))

    async def _apply(self, job_id: str, agent: str, prompt: PromptInfo) -> None:
        lock = self._locks.setdefault(job_id, asyncio.Lock())
        async with lock:
            try:
                await self._apply_locked(job_id, agent, prompt)
            finally:
                if job_id not in self._jobs:
                    self._locks.pop(job_id, None)

    async def _apply_locked(self, job_id: str, agent: str, prompt: PromptInfo) -> None:
        record = self._jobs.get(job_id)
        if record is None or record.final or record.agent != agent:
            return
        if prompt.prompt_id != attempt_prompt_id(record):
            return  # news of an earlier attempt, which has been settled already
        engine = self._engine
        self._last_news[job_id] = engine.clock()
        self._progress[job_id] = ProgressInfo(
            node=prompt.node,
            step=prompt.step,
            steps=prompt.steps,
            nodes_done=prompt.nodes_done,
            nodes_total=prompt.nodes_total,
        )
        self.changes.fire()
        book = engine.books[agent]
        if prompt.state == "pending":
            if record.reason != f"queued in ComfyUI on {agent}":
                await self._set(record, reason=f"queued in ComfyUI on {agent}")
        elif prompt.state == "running":
            if record.state == "dispatched":
                await self._set(record, state="running", reason=f"running on {agent}")
        elif prompt.state == "succeeded":
            try:
                outputs = await self._fetch_outputs(record, agent, len(prompt.outputs))
            except AgentError as exc:
                log.warning("job %s: cannot fetch outputs yet: %s", job_id, exc)
                return  # the reconcile pass asks again
            peak = book.finish_image(record.family)
            if peak:
                await engine.knowledge.record_image_peak(self.key_of(record), peak)
            await self._set(
                record,
                state="succeeded",
                reason=f"finished on {agent} with {len(outputs)} output(s)",
                outputs=outputs,
                progress=self._progress[job_id].model_dump(),
                peak_bytes=peak,
            )
        elif prompt.state == "failed":
            if prompt.reason == OOM_REASON:
                # Our footprint was too small: learn a larger one (never more than a whole
                # budget, or the job could never run again), then try again.
                budgets = [s.budget_bytes for s in engine.states(engine.clock()) if s.total_bytes]
                grown = int(self.expected_peak(record) * OOM_GROWTH)
                if budgets:
                    grown = min(grown, max(budgets))
                await engine.knowledge.record_image_peak(self.key_of(record), grown)
                await self._requeue(record, f"ran out of GPU memory on {agent}")
                return
            book.finish_image(record.family)
            await self._set(
                record,
                state="failed",
                reason=f"failed on {agent}: {prompt.reason or 'error'}",
                error=prompt.error or prompt.reason,
            )
        elif prompt.state in ("interrupted", "cancelled"):
            book.finish_image(record.family)
            why = (
                "cancelled by the caller"
                if job_id in self._cancelling
                else "interrupted on the desktop"
            )
            await self._set(record, state="cancelled", reason=why)
        elif prompt.state == "unknown":
            await self._requeue(record, f"ComfyUI on {agent} restarted and lost it")

    async def _fetch_outputs(self, record: JobRecord, agent: str, count: int) -> list[str]:
        link = self._engine.links[agent]
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
        engine = self._engine
        now = engine.clock()
        for record in list(self._jobs.values()):
            if record.state not in ("dispatched", "running") or record.agent is None:
                continue
            if now - self._last_news.get(record.job_id, -math.inf) < QUIET_S:
                continue
            link = engine.links.get(record.agent)
            if link is None:
                await self._set(
                    record, state="failed", reason=f"agent {record.agent} is no longer configured"
                )
                continue
            healthy, _ = link.health()
            if not healthy:
                continue  # its jobs wait for it
            try:
                prompt = await link.prompt(attempt_prompt_id(record))
                if prompt is None:
                    # The agent restarted and forgot it; the same id again is safe (it asks
                    # ComfyUI first), and runs it only if ComfyUI never had it.
                    prompt = await link.submit(record.workflow, attempt_prompt_id(record))
            except AgentRejected as exc:
                await self._set(
                    record,
                    state="failed",
                    reason="ComfyUI rejected the workflow",
                    error=exc.agent_message,
                )
                continue
            except AgentError as exc:
                log.info("reconcile of job %s deferred: %s", record.job_id, exc)
                continue
            await self._apply(record.job_id, record.agent, prompt)


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".part")
    temporary.write_bytes(data)
    temporary.replace(path)
