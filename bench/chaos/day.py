"""One chaos day (imperative shell): the studio's workload through the controller while the fault
schedule strikes, with the invariants checked as it runs and at the end.

Three kinds of task share one virtual clock: the workload (each arrival of `studio_day` a client:
LLM requests, half of them streamed, and image jobs submitted with an Idempotency-Key and
followed to their end, retrying through outages as a studio tool would), the fault driver
(applies and reverts each fault of the schedule at its time) and the monitor (every
`MONITOR_S`: out-of-memory failures and CPU spills, whether the system serves again after each
fault, tasks and open files). Every observation goes to the pure `InvariantChecker`; the first
violation stops the run, which then reports the seed, the simulated time and the recent events,
so `python -m bench chaos --seed N` replays it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.chaos.invariants import InvariantChecker, JobEnd, Violation
from bench.chaos.schedule import Fault, fault_schedule, kind_counts
from bench.chaos.stack import AGENT_NAME, ChaosStack, describe
from controller.daemon import STORE_FILE
from controller.images import attempt_prompt_id
from controller.store import JobStore
from gpu_agent.sim.desktop import SimDesktop
from gpu_agent.sim.workflows import SD15, SDXL, text_to_image
from gpu_agent.sim.workload import Arrival, ImageArrival, LlmArrival, studio_day
from gpu_common.clock import cpu_s
from gpu_common.virtual_time import run_virtual

TOKEN = "chaos-token"
# How often the monitor looks (simulated seconds).
MONITOR_S = 1.0
# The peak task count is taken every this many looks: listing the tasks costs more than a look.
TASK_COUNT_EVERY = 30
# A client's patience with one LLM request: beyond every limit the stack sets itself (a wait for
# room, a load, a long answer on a slow Ollama), so running into it means the request hung.
LLM_TIMEOUT_S = 900.0
# How long an LLM request waits for room before the controller answers 503.
LLM_WAIT_S = 30.0
# How often a client asks about its image job, and retries a refused or failed call.
POLL_S = 5.0
# After the last arrival, how long jobs may take to end before the unended count as lost.
DRAIN_S = 3600.0
# The ledger agrees with the GPU when it shows a figure the GPU had within its trust horizon.
LEDGER_TOLERANCE_BYTES = 16 * 1024**2
# After a fault ends, the system serves again within this many seconds free of other faults.
RECOVERY_BOUND_S = 300.0
# A foreign process that started this recently explains an out-of-memory failure or a spill:
# the controller may not have seen it before deciding, or the job was already running.
FOREIGN_WINDOW_S = 300.0
# Growth of tasks and open files from the start to the end of the day that counts as a leak.
TASK_GROWTH_LIMIT = 40
FILE_GROWTH_LIMIT = 40
RSS_GROWTH_LIMIT_MIB = 512
# Recent events kept for a violation's report.
RECENT_EVENTS = 40


@dataclass(frozen=True, slots=True)
class DayConfig:
    """What one chaos day runs: `span_s` seconds of `studio_day` from `start_s`, faults at
    `faults_per_day`, the agent sampling every `sample_interval_s`."""

    span_s: float
    faults_per_day: float
    sample_interval_s: float
    start_s: float = 0.0
    # Stop this far into the span (a replay up to a violation); None plays it all.
    until_s: float | None = None

    def arrivals(self, seed: int) -> list[Arrival]:
        """The seed's studio day within the span, its times counted from `start_s`."""
        end_s = self.start_s + min(self.span_s, self.until_s or self.span_s)
        return [
            dataclasses.replace(a, at_s=round(a.at_s - self.start_s, 3))
            for a in studio_day(seed=seed)
            if self.start_s <= a.at_s < end_s
        ]

    def faults(self, seed: int) -> list[Fault]:
        """The seed's fault schedule over the span (up to `until_s`)."""
        faults = fault_schedule(seed, self.span_s, self.faults_per_day)
        return [f for f in faults if self.until_s is None or f.at_s < self.until_s]


class ChaosStopped(Exception):
    """A violation ended the run early."""


@dataclass
class DayResult:
    """What one seed's day measured: the figures of `out/chaos.json` and some context."""

    seed: int
    figures: dict[str, Any]
    foreign_caused: dict[str, int]
    recovery_samples: dict[str, list[float]]
    stopped: dict[str, Any] | None
    simulated_s: float
    peaks: dict[str, int]
    cpu_s: float = 0.0


def workflow_for(arrival: ImageArrival) -> dict[str, Any]:
    """The ComfyUI workflow of an image arrival."""
    if arrival.family == "sdxl":
        return text_to_image(SDXL, steps=arrival.steps, seed=arrival.seed, prefix="chaos")
    return text_to_image(SD15, width=512, height=512, steps=arrival.steps, seed=arrival.seed,
                         prefix="chaos")  # fmt: skip


def open_files() -> int:
    """File descriptors this process holds (sockets included)."""
    return len(os.listdir("/proc/self/fd"))


def rss_mib() -> int:
    """This process's resident memory, in MiB."""
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") // 1024**2


class ChaosDay:
    """One seed's day on a started desktop and stack; `run()` returns its `DayResult`."""

    def __init__(
        self, seed: int, config: DayConfig, desktop: SimDesktop, stack: ChaosStack
    ) -> None:
        self.seed = seed
        self.config = config
        self.desktop = desktop
        self.stack = stack
        self.checker = InvariantChecker(
            recovery_bound_s=RECOVERY_BOUND_S, llm_timeout_s=LLM_TIMEOUT_S
        )
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_EVENTS)
        self.loop = asyncio.get_running_loop()
        self.t0 = self.loop.time()
        self.stopped = asyncio.Event()
        self.first_violation: Violation | None = None
        self.applied: list[Fault] = []
        self.foreign_news_at = -float("inf")
        self._tainted_runners: set[int] = set()
        self._gpu_history: collections.deque[tuple[float, int]] = collections.deque()
        self.peaks = {"tasks": 0, "open_files": 0, "rss_mib": 0}
        self._crash_windows: list[tuple[float, float]] = []
        self._accepted: dict[int, str] = {}

    def now(self) -> float:
        """Simulated seconds since the day began."""
        return self.loop.time() - self.t0

    def event(self, what: str, **detail: Any) -> None:
        """Note an event for a violation's report."""
        self.recent.append({"at_s": round(self.now(), 3), "event": what, **detail})

    def note(self, found: Sequence[Violation]) -> None:
        """Record violations; the first stops the run."""
        for violation in found:
            self.event("violation", invariant=violation.invariant, detail=violation.detail)
            if self.first_violation is None:
                self.first_violation = violation
                self.stopped.set()

    # -- the day ------------------------------------------------------------------------------

    async def run(self, arrivals: list[Arrival], faults: list[Fault]) -> DayResult:
        """Play the arrivals and the faults, then drain and check the end."""
        tasks_at_start = len(asyncio.all_tasks())
        files_at_start = open_files()
        rss_at_start = rss_mib()
        limits = httpx.Limits(max_connections=400, keepalive_expiry=None)
        async with httpx.AsyncClient(
            base_url=self.stack.controller_url,
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=httpx.Timeout(LLM_TIMEOUT_S, connect=10.0),
            limits=limits,
        ) as http:
            work = asyncio.ensure_future(self._workload(http, arrivals))
            chaos = asyncio.ensure_future(self._faults(faults))
            monitor = asyncio.ensure_future(self._monitor())
            stop: asyncio.Future[Any] = asyncio.ensure_future(self.stopped.wait())
            both: asyncio.Future[Any] = asyncio.gather(work, chaos)
            try:
                await asyncio.wait([stop, both], return_when="FIRST_COMPLETED")
            finally:
                tasks = (work, chaos, monitor, stop, both)
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if not self.stopped.is_set():
                await self._check_end(tasks_at_start, files_at_start, rss_at_start)
        return self._result()

    async def _workload(self, http: httpx.AsyncClient, arrivals: list[Arrival]) -> None:
        async def one(index: int, arrival: Arrival) -> None:
            await asyncio.sleep(max(0.0, self.t0 + arrival.at_s - self.loop.time()))
            if isinstance(arrival, LlmArrival):
                await self._llm(http, index, arrival)
            else:
                await self._image(http, index, arrival)

        await asyncio.gather(*(one(i, a) for i, a in enumerate(arrivals)))

    async def _faults(self, faults: list[Fault]) -> None:
        steps: list[tuple[float, int, int, Fault]] = []
        for fault_id, fault in enumerate(faults):
            steps.append((fault.at_s, 1, fault_id, fault))
            steps.append((fault.end_s, 0 if fault.duration_s else 2, fault_id, fault))
        # At one instant: reverts first, then applies, then single blows' ends.
        steps.sort(key=lambda step: (step[0], step[1], step[2]))
        for at_s, order, fault_id, fault in steps:
            await asyncio.sleep(max(0.0, self.t0 + at_s - self.loop.time()))
            if order == 1:
                self.applied.append(fault)
                self.checker.fault_began(self.now(), fault_id, fault.kind)
                self.event("fault", **describe(fault))
                if fault.kind == "foreign_vram":
                    self.foreign_news_at = self.now()
                if fault.kind == "controller_crash":
                    self._crash_windows.append((self.now(), float("inf")))
                await self.stack.apply(fault_id, fault)
                if not fault.duration_s:
                    await self.stack.revert(fault_id, fault)
                    self.checker.fault_ended(self.now(), fault_id)
            elif order == 0:
                await self.stack.revert(fault_id, fault)
                self.checker.fault_ended(self.now(), fault_id)
                self.event("fault ended", kind=fault.kind)
                if fault.kind == "controller_crash":
                    start, _ = self._crash_windows[-1]
                    self._crash_windows[-1] = (start, self.now())

    # -- clients ------------------------------------------------------------------------------

    def _crashed_between(self, start: float, end: float) -> bool:
        return any(began <= end and ended >= start for began, ended in self._crash_windows)

    async def _llm(self, http: httpx.AsyncClient, index: int, arrival: LlmArrival) -> None:
        stream = index % 2 == 1
        body = {
            "model": arrival.intent,
            "prompt": arrival.prompt,
            "stream": stream,
            "options": {"num_predict": arrival.output_tokens, "seed": index},
        }
        started = self.now()
        try:
            outcome, detail = await self._ask(http, body, stream)
        except httpx.TimeoutException as exc:
            outcome, detail = "hung", type(exc).__name__
        except httpx.TransportError as exc:
            if self._crashed_between(started, self.now()):
                outcome, detail = "error", f"controller crashed: {type(exc).__name__}"
            else:
                outcome, detail = "unclear", f"connection failed: {type(exc).__name__}: {exc}"
        self.event("llm", index=index, outcome=outcome, detail=detail[:120])
        self.note(self.checker.llm_answered(self.now(), index, outcome, detail))

    async def _ask(
        self, http: httpx.AsyncClient, body: dict[str, Any], stream: bool
    ) -> tuple[str, str]:
        if not stream:
            response = await http.post("/api/generate", json=body)
            return _judge_lines(response.status_code, [response.text])
        async with http.stream("POST", "/api/generate", json=body) as response:
            lines = [line async for line in response.aiter_lines() if line.strip()]
        return _judge_lines(response.status_code, lines)

    async def _image(self, http: httpx.AsyncClient, index: int, arrival: ImageArrival) -> None:
        key = f'"chaos-{self.seed}-{index}"'
        body = {"workflow": workflow_for(arrival)}
        job_id: str | None = None
        while job_id is None:
            try:
                response = await http.post(
                    "/v1/images", json=body, headers={"Idempotency-Key": key}
                )
                if response.status_code in (200, 202):
                    job_id = str(response.json()["id"])
                    break
                if response.status_code < 500 and response.status_code != 409:
                    detail = f"image {index} refused: {response.text}"
                    self.note(self.checker.refused(self.now(), detail))
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(POLL_S)
        self._accepted[index] = job_id
        self.note(self.checker.job_accepted(self.now(), job_id))
        self.event("image accepted", index=index, job=job_id)
        while True:
            await asyncio.sleep(POLL_S)
            try:
                response = await http.get(f"/v1/images/{job_id}")
            except httpx.TransportError:
                continue
            if response.status_code != 200:
                continue
            job = response.json()
            self.note(self.checker.job_seen(self.now(), job_id, job["state"], job["reason"]))
            if job["state"] in ("succeeded", "failed", "cancelled"):
                self.event("image ended", job=job_id, state=job["state"], reason=job["reason"])
                return

    # -- the monitor --------------------------------------------------------------------------

    async def _monitor(self) -> None:
        comfy = self.desktop.comfyui.stats
        ollama = self.desktop.ollama.stats
        oom_seen, spill_seen = comfy.failed_oom, ollama.spilled_generations
        ticks = 0
        while True:
            await asyncio.sleep(MONITOR_S)
            now = self.now()
            if comfy.failed_oom > oom_seen:
                count, oom_seen = comfy.failed_oom - oom_seen, comfy.failed_oom
                foreign = now - self.foreign_news_at <= FOREIGN_WINDOW_S
                self.event("comfyui oom", count=count, foreign=foreign, **self._memory_view())
                self.note(self.checker.out_of_memory(now, count, foreign=foreign))
            spilled_runners = self._spilled_runners(now)
            if ollama.spilled_generations > spill_seen:
                count, spill_seen = (
                    ollama.spilled_generations - spill_seen,
                    ollama.spilled_generations,
                )
                foreign = bool(spilled_runners & self._tainted_runners) or (
                    now - self.foreign_news_at <= FOREIGN_WINDOW_S
                )
                self.event("ollama spill", count=count, foreign=foreign, **self._memory_view())
                self.note(self.checker.spilled(now, count, foreign=foreign))
            self.note(self.checker.tick(now, MONITOR_S, self.serving(now)))
            ticks += 1
            if ticks % TASK_COUNT_EVERY == 0:
                self.peaks["tasks"] = max(self.peaks["tasks"], len(asyncio.all_tasks()))

    def _memory_view(self) -> dict[str, Any]:
        """The GPU as it is and as the controller sees it, for the events log."""
        mib = 1024**2
        view: dict[str, Any] = {
            "gpu_used_mib": self.desktop.gpu.used_bytes() // mib,
            "foreign_mib": self.stack.foreign_bytes() // mib,
            "runners": [
                f"{r.model} {r.size_vram_bytes // mib}/{r.size_bytes // mib} MiB"
                for r in self.desktop.ollama.runners()
            ],
            "processes": [
                f"{pid} {name} {used // mib}" for pid, name, used in self.desktop.gpu.holders()
            ],
        }
        controller = self.stack.controller
        if controller is not None:
            engine = controller.engine
            state = engine.fleet.state_of(AGENT_NAME, engine.clock())
            view["ledger_used_mib"] = state.used_bytes // mib
            view["ledger_pending_mib"] = state.pending_bytes // mib
        return view

    def _spilled_runners(self, now: float) -> set[int]:
        spilled = {
            r.pid
            for r in self.desktop.ollama.runners()
            if not r.loading and r.size_vram_bytes < r.size_bytes
        }
        if now - self.foreign_news_at <= FOREIGN_WINDOW_S:
            self._tainted_runners |= spilled
        return spilled

    def serving(self, now: float) -> bool:
        """Whether the controller runs and sees a healthy agent with both services reachable,
        and its ledger shows a GPU figure the GPU really had within the trust horizon."""
        used = self.desktop.gpu.used_bytes()
        history = self._gpu_history
        history.append((now, used))
        horizon = self.stack.stale_after_s
        while history and history[0][0] < now - horizon:
            history.popleft()
        controller = self.stack.controller
        if controller is None:
            return False
        engine = controller.engine
        link = engine.links[AGENT_NAME]
        status = link.status
        if status is None or not status.ollama.reachable or not status.comfyui.reachable:
            return False
        state = engine.fleet.state_of(AGENT_NAME, engine.clock())
        if not state.healthy:
            return False
        return any(abs(state.used_bytes - seen) <= LEDGER_TOLERANCE_BYTES for _, seen in history)

    # -- the end ------------------------------------------------------------------------------

    async def _check_end(self, tasks_at_start: int, files_at_start: int, rss_at_start: int) -> None:
        now = self.now()
        # Give the system its bound to serve again after the last faults, looking as often
        # as the monitor did.
        deadline = now + RECOVERY_BOUND_S
        serving = self.serving(self.now())
        while not serving and self.now() < deadline:
            await asyncio.sleep(MONITOR_S)
            serving = self.serving(self.now())
        if serving:
            self.checker.tick(self.now(), 0.0, serving=True)
        self.note(self.checker.unrecovered(self.now()))
        stored = self._stored_jobs()
        stats = self.desktop.comfyui.stats
        self.note(
            self.checker.jobs_at_end(
                self.now(), stored, stats.ends_by_prompt, stats.successes_by_prompt
            )
        )
        tasks, files = len(asyncio.all_tasks()), open_files()
        self.peaks["open_files"] = files
        self.note(
            self.checker.bounded(self.now(), "tasks", tasks_at_start, tasks, TASK_GROWTH_LIMIT)
        )
        self.note(
            self.checker.bounded(self.now(), "open files", files_at_start, files, FILE_GROWTH_LIMIT)
        )
        rss = rss_mib()
        self.peaks["rss_mib"] = rss
        self.note(
            self.checker.bounded(self.now(), "RSS MiB", rss_at_start, rss, RSS_GROWTH_LIMIT_MIB)
        )
        self.event(
            "end",
            tasks=f"{tasks_at_start} -> {tasks}",
            open_files=f"{files_at_start} -> {files}",
            rss_mib=f"{rss_at_start} -> {rss}",
        )

    def _stored_jobs(self) -> dict[str, JobEnd]:
        store = JobStore(self.stack.data_dir / STORE_FILE)
        try:
            records = store.list(limit=1_000_000)
        finally:
            store.close()
        ends = {}
        for record in records:
            prompt_ids = tuple(
                attempt_prompt_id(dataclasses.replace(record, attempts=attempt))
                for attempt in range(1, max(1, record.attempts) + 1)
            )
            ends[record.job_id] = JobEnd(record.state, record.reason, prompt_ids)
        return ends

    def _result(self) -> DayResult:
        figures = self.checker.figures(kind_counts(self.applied))
        stopped = None
        if self.first_violation is not None:
            stopped = {
                "seed": self.seed,
                "at_s": self.first_violation.at_s,
                "invariant": self.first_violation.invariant,
                "detail": self.first_violation.detail,
                "recent_events": list(self.recent),
            }
        return DayResult(
            seed=self.seed,
            figures=figures,
            foreign_caused={
                "oom": self.checker.oom["foreign"],
                "spill": self.checker.spill["foreign"],
            },
            recovery_samples={
                k: [round(v, 3) for v in vs] for k, vs in self.checker.recovery_s.items()
            },
            stopped=stopped,
            simulated_s=round(self.now(), 3),
            peaks=dict(self.peaks),
        )


def _judge_lines(status: int, lines: list[str]) -> tuple[str, str]:
    """An LLM answer's outcome from its status and body lines: "ok", "error" (clear) or
    "unclear"."""
    if not lines:
        return "unclear", f"status {status} with an empty body"
    try:
        last = json.loads(lines[-1])
    except ValueError:
        return "unclear", f"status {status}, not JSON: {lines[-1][:120]}"
    if not isinstance(last, dict):
        return "unclear", f"status {status}, not an object: {lines[-1][:120]}"
    error = last.get("error")
    if error:
        message = error.get("message") if isinstance(error, dict) else error
        if isinstance(message, str) and message.strip():
            return "error", f"{status}: {message}"
        return "unclear", f"status {status}, an error without a message: {lines[-1][:120]}"
    if status == 200 and last.get("done") is True:
        return "ok", "done"
    return "unclear", f"status {status}, cut off after {len(lines)} lines: {lines[-1][:120]}"


async def chaos_day(seed: int, config: DayConfig, data_dir: Path) -> DayResult:
    """One seed's day, from a fresh desktop and stack to the end checks."""
    arrivals = config.arrivals(seed)
    faults = config.faults(seed)
    desktop = SimDesktop(seed=seed, data_dir=data_dir / "desktop")
    await desktop.start()
    stack = ChaosStack(
        desktop,
        data_dir / "controller",
        token=TOKEN,
        sample_interval_s=config.sample_interval_s,
        stale_after_s=3 * config.sample_interval_s,
        seed=seed,
    )
    try:
        await stack.start(llm_wait_s=LLM_WAIT_S)
        day = ChaosDay(seed, config, desktop, stack)
        return await day.run(arrivals, faults)
    finally:
        await stack.stop()
        await desktop.stop()


def run_seed(seed: int, config: DayConfig) -> DayResult:
    """One seed's day on a fresh virtual-time loop, in a folder of its own."""
    started = cpu_s()
    with tempfile.TemporaryDirectory(prefix=f"chaos-{seed}-") as tmp:
        result = run_virtual(chaos_day(seed, config, Path(tmp)))
    result.cpu_s = round(cpu_s() - started, 1)
    return result
