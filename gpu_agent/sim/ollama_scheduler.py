"""Runners and the model scheduler of the emulated Ollama (simulated-desktop layer).

This is the part of `gpu_agent.sim.ollama` that has no HTTP in it: which runner serves a request,
when a model is loaded, partially offloaded, evicted, reloaded or expired, and what it holds on the
simulated GPU. It follows Ollama's `server/sched.go` as described in protocols.md A2/A4:

* loads are serialised; a request for a resident, compatible runner skips the queue;
* the GPU share of a new runner is planned from min(device free, total - Ollama's own use) minus
  `OLLAMA_GPU_OVERHEAD`; alone on the card it gets a best fit (the rest goes to the CPU); next to
  other runners it must fit in 80 % of that, or an idle runner (shortest keep-alive, then name) is
  evicted first; with none idle, the busy one with the shortest keep-alive is drained, then evicted;
* a runner whose `num_ctx` or `num_gpu` differs from a request's is unloaded and loaded again;
* the keep-alive clock starts when the last request on a runner ends; an unloaded runner keeps its
  memory for `unload_release_s` (Ollama waits for the VRAM to recover) and then disappears;
* with `zombie_runners` set, an unloaded runner disappears from the list but its process never
  exits, so its GPU memory stays taken until the server process itself goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any, Literal

from gpu_agent.sim.catalog import OllamaModelSpec
from gpu_agent.sim.clock import SimClock
from gpu_agent.sim.errors import SimOutOfMemory
from gpu_agent.sim.gpu import MIB, SimGpu

# Free memory Ollama leaves on a card when it fits layers of a model that does not fit whole.
HEADROOM_BYTES = 300 * MIB
# Next to other runners a new one must fit in this share of the available memory (sched.go).
EVICT_THRESHOLD = 0.8
# load_duration of a request whose runner is already resident, in simulated seconds.
RESIDENT_LOAD_S = (0.010, 0.060)
# Where `ollama pull` keeps blobs on a Linux install (scripts/install.sh runs as user ollama).
BLOB_DIR = "/usr/share/ollama/.ollama/models/blobs"
RUNNER_BINARY = "/usr/local/bin/ollama"
# Runner pids are fake: serve_pid + RUNNER_PID_OFFSET + spawn number, never reused.
RUNNER_PID_OFFSET = 10_000

RunnerState = Literal["loading", "ready", "stopping"]


@dataclass(frozen=True)
class OllamaSimSettings:
    """The server's environment: each field mirrors the `OLLAMA_*` variable named beside it."""

    keep_alive_s: float = 300.0  # OLLAMA_KEEP_ALIVE; negative = forever
    max_loaded_models: int = 3  # OLLAMA_MAX_LOADED_MODELS (auto: 3 x one GPU)
    num_parallel: int = 1  # OLLAMA_NUM_PARALLEL
    max_queue: int = 512  # OLLAMA_MAX_QUEUE
    default_num_ctx: int = 4096  # OLLAMA_CONTEXT_LENGTH (4k below 24 GiB of VRAM)
    unload_release_s: float = 1.0  # sim seconds from unload until the runner's memory is free
    gpu_overhead_bytes: int = 0  # OLLAMA_GPU_OVERHEAD
    version: str = "0.33.0-rc2"


@dataclass
class OllamaStats:
    """Counters over the emulator's life (not reset by a simulated restart)."""

    requests: int = 0  # generate/chat requests received
    embed_requests: int = 0  # /api/embed and /api/embeddings requests received
    loads: int = 0  # runners that finished loading
    cold_loads: int = 0  # of those, loads whose weights were not in the page cache
    unloads: int = 0  # runners that began unloading (expiry, explicit unload, eviction, reload)
    evictions: int = 0  # runners unloaded to make room for another model
    reloads: int = 0  # runners unloaded because a request changed num_ctx/num_gpu
    spilled_generations: int = 0  # generations served while size_vram < size
    rejected: int = 0  # requests answered 503 because the queue was full


@dataclass(frozen=True, slots=True)
class RunnerInfo:
    """One runner as tests and benchmarks see it. Times are simulated seconds."""

    model: str
    num_ctx: int
    size_bytes: int
    size_vram_bytes: int
    expires_at: float  # math.inf when pinned (keep_alive < 0)
    in_flight: int  # requests holding the runner, running or waiting for a slot
    pid: int
    stopping: bool
    loading: bool
    num_gpu: int  # -1 = automatic, 0 = CPU only


class ApiError(Exception):
    """An error answer of the emulated server: HTTP status plus Ollama's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


QUEUE_FULL = "server busy, please try again.  maximum pending requests exceeded"


class _Runner:
    """A loaded (or loading, or stopping) model and its fake `ollama runner` process."""

    def __init__(
        self,
        spec: OllamaModelSpec,
        *,
        num_ctx: int,
        num_gpu: int,
        pid: int,
        size_bytes: int,
        size_vram_bytes: int,
        session_s: float,
        num_parallel: int,
        now: float,
    ) -> None:
        self.spec = spec
        self.num_ctx = num_ctx
        self.num_gpu = num_gpu
        self.pid = pid
        self.size_bytes = size_bytes
        self.size_vram_bytes = size_vram_bytes
        self.session_s = session_s
        self.state: RunnerState = "loading"
        self.draining = False  # unload as soon as the last request ends, take no new ones
        self.dead = False  # the server process went away; nothing may touch it any more
        self.in_flight = 0
        self.expires_at = now + session_s
        self.expiry_task: asyncio.Task[None] | None = None
        self.slots = asyncio.Semaphore(num_parallel)
        self.settled = asyncio.Event()  # loading finished, one way or the other
        self.released = asyncio.Event()  # memory returned, gone from the list

    def info(self, now: float) -> RunnerInfo:
        expires_at = self.expires_at
        if self.state != "stopping" and (self.in_flight > 0 or self.state == "loading"):
            # Ollama shows now + session for a runner whose timer has not started yet.
            expires_at = now + self.session_s
        return RunnerInfo(
            model=self.spec.name,
            num_ctx=self.num_ctx,
            size_bytes=self.size_bytes,
            size_vram_bytes=self.size_vram_bytes,
            expires_at=expires_at,
            in_flight=self.in_flight,
            pid=self.pid,
            stopping=self.state == "stopping",
            loading=self.state == "loading",
            num_gpu=self.num_gpu,
        )


@dataclass(frozen=True, slots=True)
class Lease:
    """A request's hold on a runner. `load_s` is its load_duration in simulated seconds."""

    spec: OllamaModelSpec
    num_ctx: int
    size_bytes: int
    size_vram_bytes: int
    load_s: float

    @property
    def spilled(self) -> bool:
        """Part of the model runs on the CPU."""
        return self.size_vram_bytes < self.size_bytes

    @property
    def offload_fraction(self) -> float:
        """Share of the weights in system RAM: what is not on the GPU is weights first."""
        on_cpu = self.size_bytes - self.size_vram_bytes
        return min(1.0, max(0.0, on_cpu / self.spec.weights_bytes))


class OllamaScheduler:
    """Runner state of one life of the Ollama server process (a restart makes a new one)."""

    def __init__(
        self,
        *,
        clock: SimClock,
        gpu: SimGpu,
        settings: OllamaSimSettings,
        stats: OllamaStats,
        page_cache: set[str],
        pids: itertools.count[int],
        rng: random.Random,
    ) -> None:
        self._clock = clock
        self._gpu = gpu
        self._settings = settings
        self._stats = stats
        self._page_cache = page_cache
        self._pids = pids
        self._rng = rng
        self._runners: dict[str, _Runner] = {}
        self._load_lock = asyncio.Lock()
        self._queued = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.zombie_runners = False
        # Runners Ollama forgot whose processes still hold GPU memory.
        self._zombies: list[_Runner] = []

    # -- inspection ------------------------------------------------------------------------

    def runners(self) -> list[RunnerInfo]:
        """The runners Ollama lists now (zombies not included), in load order."""
        now = self._clock.now()
        return [runner.info(now) for runner in self._runners.values()]

    @property
    def queued(self) -> int:
        """Requests admitted but not yet running (waiting for a runner or a slot)."""
        return self._queued

    # -- requests --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(
        self,
        spec: OllamaModelSpec,
        *,
        num_ctx: int,
        num_gpu: int,
        keep_alive_s: float,
        need_slot: bool = True,
    ) -> AsyncIterator[Lease]:
        """Hold a runner for `spec` (loading it if needed) and, with `need_slot`, one of its
        `num_parallel` slots. Raises `ApiError` 503 when the queue is full, 500 if it cannot load.
        """
        if self._queued >= self._settings.max_queue:
            self._stats.rejected += 1
            raise ApiError(503, QUEUE_FULL)
        requested_at = self._clock.now()
        self._queued += 1
        waiting = True
        try:
            runner, resident_s = await self._obtain(spec, num_ctx, num_gpu, keep_alive_s)
            try:
                # A resident runner reports its drawn hand-over time, so event-loop latency at a
                # high clock speed does not inflate it; a load or a wait is measured.
                load_s = self._clock.now() - requested_at if resident_s is None else resident_s
                if need_slot:
                    await runner.slots.acquire()
                self._queued -= 1
                waiting = False
                try:
                    yield Lease(
                        spec=spec,
                        num_ctx=runner.num_ctx,
                        size_bytes=runner.size_bytes,
                        size_vram_bytes=runner.size_vram_bytes,
                        load_s=load_s,
                    )
                finally:
                    if need_slot:
                        runner.slots.release()
            finally:
                self._finish(runner)
        finally:
            if waiting:
                self._queued -= 1

    def expire(self, model: str) -> None:
        """Explicit unload (`keep_alive: 0` without a prompt): now if idle, else when done."""
        runner = self._runners.get(model)
        if runner is None or runner.state == "stopping":
            return
        self._cancel_expiry(runner)
        runner.session_s = 0.0
        runner.expires_at = self._clock.now()
        if runner.in_flight == 0 and runner.state == "ready":
            self._unload(runner)

    async def close(self, *, release_memory: bool) -> None:
        """Cancel every background task; with `release_memory` every runner dies at once."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if release_memory:
            for runner in [*self._runners.values(), *self._zombies]:
                runner.dead = True
                self._gpu.detach(runner.pid)
                runner.settled.set()
                runner.released.set()
            self._runners.clear()
            self._zombies.clear()

    # -- scheduling ------------------------------------------------------------------------

    async def _obtain(
        self, spec: OllamaModelSpec, num_ctx: int, num_gpu: int, keep_alive_s: float
    ) -> tuple[_Runner, float | None]:
        """The runner for a request, claimed; with the hand-over time if it was resident."""
        runner = self._runners.get(spec.name)
        if runner is not None and self._usable(runner, num_ctx, num_gpu):
            return runner, await self._claim_resident(runner, keep_alive_s)
        async with self._load_lock:
            while True:
                runner = self._runners.get(spec.name)
                if runner is not None:
                    if runner.state == "loading":
                        await runner.settled.wait()
                        continue
                    if self._usable(runner, num_ctx, num_gpu):
                        break
                    if runner.state == "ready" and not runner.draining:
                        self._stats.reloads += 1
                        self._drain(runner)
                    await runner.released.wait()
                    continue
                stopping = next((r for r in self._runners.values() if r.state == "stopping"), None)
                if stopping is not None:
                    # Ollama waits for the VRAM of an unloading runner to recover before it plans.
                    await stopping.released.wait()
                    continue
                victim = self._victim(spec, num_ctx, num_gpu)
                if victim is not None:
                    self._stats.evictions += 1
                    self._drain(victim)
                    await victim.released.wait()
                    continue
                runner = self._spawn(spec, num_ctx, num_gpu, keep_alive_s)
                task = self._spawn_task(self._load(runner))
                try:
                    # The load goes on if this request is cancelled, as the scheduler's would.
                    await asyncio.shield(task)
                except BaseException:
                    self._finish(runner)
                    raise
                return runner, None
        await self._claim_resident(runner, keep_alive_s)
        return runner, None

    async def _claim_resident(self, runner: _Runner, keep_alive_s: float) -> float:
        """Claim a loaded runner; returns the simulated seconds the hand-over took."""
        self._claim(runner, keep_alive_s)
        handover_s = self._rng.uniform(*RESIDENT_LOAD_S)
        try:
            await self._clock.sleep(handover_s)
        except BaseException:
            self._finish(runner)
            raise
        return handover_s

    @staticmethod
    def _usable(runner: _Runner, num_ctx: int, num_gpu: int) -> bool:
        return (
            runner.state == "ready"
            and not runner.draining
            and runner.num_ctx == num_ctx
            and runner.num_gpu == num_gpu
        )

    def _available_bytes(self) -> int:
        own = sum(self._gpu.process_bytes(r.pid) for r in self._runners.values())
        free = min(self._gpu.free_bytes(), self._gpu.total_bytes - own)
        return free - self._settings.gpu_overhead_bytes

    def _parallel(self, spec: OllamaModelSpec) -> int:
        """Slots of a runner for `spec`: OLLAMA_NUM_PARALLEL, but always 1 for an embedding
        model, as Ollama loads them."""
        return 1 if spec.embedding else self._settings.num_parallel

    def _victim(self, spec: OllamaModelSpec, num_ctx: int, num_gpu: int) -> _Runner | None:
        """The runner to unload before `spec` can load, or None if it can load now."""
        if not self._runners:
            return None
        gpu_bytes = 0 if num_gpu == 0 else spec.required_bytes(num_ctx, self._parallel(spec))
        full = len(self._runners) >= self._settings.max_loaded_models
        if not full and gpu_bytes <= EVICT_THRESHOLD * self._available_bytes():
            return None
        idle = [r for r in self._runners.values() if r.in_flight == 0 and not r.draining]
        pool = idle or list(self._runners.values())
        return min(pool, key=lambda r: (r.session_s, r.spec.name))

    def _spawn(
        self, spec: OllamaModelSpec, num_ctx: int, num_gpu: int, keep_alive_s: float
    ) -> _Runner:
        """Start a runner process and take its GPU share; the caller holds the load lock."""
        size = spec.required_bytes(num_ctx, self._parallel(spec))
        if num_gpu == 0:
            size_vram = 0
        elif self._runners:
            size_vram = size  # `_victim` made sure it fits next to the others
        else:
            size_vram = max(0, min(size, self._available_bytes() - HEADROOM_BYTES))
        pid = next(self._pids)
        port = self._rng.randint(32768, 60999)
        cmdline = (
            RUNNER_BINARY,
            "runner",
            "--model",
            f"{BLOB_DIR}/sha256-{spec.digest}",
            "--port",
            str(port),
        )
        self._gpu.attach(pid, "ollama", cmdline)
        try:
            self._gpu.set_allocation(pid, size_vram)
        except SimOutOfMemory as exc:
            self._gpu.detach(pid)
            raise ApiError(
                500, "llama runner process has terminated: cudaMalloc failed: out of memory"
            ) from exc
        runner = _Runner(
            spec,
            num_ctx=num_ctx,
            num_gpu=num_gpu,
            pid=pid,
            size_bytes=size,
            size_vram_bytes=size_vram,
            session_s=keep_alive_s,
            num_parallel=self._parallel(spec),
            now=self._clock.now(),
        )
        runner.in_flight = 1
        self._runners[spec.name] = runner
        return runner

    async def _load(self, runner: _Runner) -> None:
        spec = runner.spec
        # Weights still in the page cache load at PCIe speed instead of disk speed.
        cold = spec.name not in self._page_cache
        with self._gpu.working("load"):
            await self._clock.sleep(spec.load_cold_s if cold else spec.load_warm_s)
        self._page_cache.add(spec.name)
        runner.state = "ready"
        runner.settled.set()
        self._stats.loads += 1
        self._stats.cold_loads += cold
        if runner.in_flight == 0:
            self._idle(runner)

    # -- runner life -----------------------------------------------------------------------

    def _claim(self, runner: _Runner, keep_alive_s: float) -> None:
        self._cancel_expiry(runner)
        runner.session_s = keep_alive_s
        runner.in_flight += 1

    def _finish(self, runner: _Runner) -> None:
        if runner.dead:
            return
        runner.in_flight -= 1
        if runner.in_flight == 0 and runner.state == "ready":
            self._idle(runner)

    def _idle(self, runner: _Runner) -> None:
        """The last request ended: start the keep-alive clock (or unload at once)."""
        if runner.draining or runner.session_s == 0:
            self._unload(runner)
            return
        if math.isinf(runner.session_s):
            runner.expires_at = math.inf
            return
        runner.expires_at = self._clock.now() + runner.session_s
        runner.expiry_task = self._spawn_task(self._expire_at(runner, runner.expires_at))

    async def _expire_at(self, runner: _Runner, sim_t: float) -> None:
        await self._clock.sleep_until(sim_t)
        runner.expiry_task = None
        if runner.in_flight == 0 and runner.state == "ready":
            self._unload(runner)

    def _drain(self, runner: _Runner) -> None:
        """Unload `runner` once its requests are done; it takes no new ones meanwhile."""
        runner.draining = True
        runner.session_s = 0.0
        self._cancel_expiry(runner)
        if runner.in_flight == 0 and runner.state == "ready":
            self._unload(runner)

    def _unload(self, runner: _Runner) -> None:
        if runner.state == "stopping" or runner.dead:
            return
        self._cancel_expiry(runner)
        runner.state = "stopping"
        runner.expires_at = self._clock.now()
        self._stats.unloads += 1
        self._spawn_task(self._release_later(runner))

    async def _release_later(self, runner: _Runner) -> None:
        await self._clock.sleep(self._settings.unload_release_s)
        if self.zombie_runners:
            # Ollama gives up waiting for the VRAM to recover and forgets the runner anyway.
            self._zombies.append(runner)
        else:
            self._gpu.detach(runner.pid)
        if self._runners.get(runner.spec.name) is runner:
            del self._runners[runner.spec.name]
        runner.settled.set()
        runner.released.set()

    @staticmethod
    def _cancel_expiry(runner: _Runner) -> None:
        if runner.expiry_task is not None:
            runner.expiry_task.cancel()
            runner.expiry_task = None

    def _spawn_task(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
