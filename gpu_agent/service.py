"""The agent's state and the operations that change the desktop (imperative shell).

`AgentService` ties the telemetry sampler, the Ollama adapter and the ComfyUI controller
together: it counts Ollama requests in flight per model, refuses to unload a busy model unless
forced, and only reports an unload or a `/free` as done once NVML shows the memory back. It
publishes events (snapshots on change, prompt and model events) to bounded subscriber queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from gpu_agent import __version__
from gpu_agent.comfyui import ComfyUIController, PromptEvent, PromptRecord
from gpu_agent.errors import (
    ComfyUIError,
    FreeTimeout,
    GpuAgentError,
    ModelNotFound,
    OllamaError,
    OllamaRejected,
    UnloadTimeout,
)
from gpu_agent.gpu.attribution import classify
from gpu_agent.ollama import AvailableModel, OllamaClient, RunningModel
from gpu_agent.prompt_peaks import PromptPeaks
from gpu_agent.telemetry import TelemetrySampler, TelemetrySnapshot
from gpu_common import clock
from gpu_common.errors import Conflict
from gpu_common.model_names import normalize_model_name
from gpu_common.probe import GpuReading
from gpu_common.schema import (
    FINAL_STATES,
    AgentEvent,
    AgentStatus,
    AvailableModelInfo,
    ComfyUIInfo,
    FreeRequest,
    FreeResult,
    GpuInfo,
    GpuProcessInfo,
    HostInfo,
    LoadRequest,
    LoadResult,
    OllamaInfo,
    OutputFileInfo,
    PromptInfo,
    ResidentModelInfo,
    TelemetryInfo,
    UnloadRequest,
    UnloadResult,
    UploadResult,
)

log = logging.getLogger(__name__)

# How often a confirmation loop re-reads NVML. Ollama's own VRAM-recovery wait polls every 250 ms.
CONFIRM_POLL_S = 0.02
# The periodic refresh re-reads Ollama's version and models on disk this often (`ollama pull` and
# `ollama rm` are rare); the running models it reads every time.
CATALOG_REFRESH_S = 10.0
# While a prompt runs, ComfyUI holds a /free until it ends (tens of seconds): poll it gently.
BUSY_POLL_S = 0.5
# An unload counts as confirmed once this share of the runner's VRAM is back (as Ollama judges it).
RECOVERED_SHARE = 0.75
# ComfyUI's torch allocator holding no more than this counts as "emptied".
TORCH_EMPTY_BYTES = 64 * 1024**2
# Devices whose memory ComfyUI reports as the machine's RAM (psutil), not as an allocator's:
# on them nothing a /free does shows in those figures.
RAM_DEVICE_TYPES = frozenset({"cpu", "mps"})
# Subscribers that fall this far behind lose their oldest events.
SUBSCRIBER_QUEUE = 256
# Finished prompts listed in the status snapshot.
RECENT_PROMPTS = 50
# Default longest silence between two snapshots on the event stream.
SNAPSHOT_HEARTBEAT_S = 2.5
# How often ComfyUI's memory is read while a prompt runs, for the prompt's peak: short enough
# to catch an SD1.5 image (a few seconds) several times over.
PEAK_INTERVAL_S = 0.5
# The reading that closes an ended prompt's peak is skipped after this long (a wedged driver).
PEAK_CLOSE_TIMEOUT_S = 2.0


@dataclass
class _OllamaState:
    reachable: bool = False
    error: str | None = "not checked yet"
    version: str | None = None
    checked_at: datetime | None = None
    available: list[AvailableModel] = field(default_factory=list)
    running: list[RunningModel] = field(default_factory=list)


@dataclass
class _ComfyState:
    reachable: bool = False
    queue_running: int = 0
    queue_pending: int = 0


def owner_bytes(snapshot: TelemetrySnapshot | None, owner: str) -> int | None:
    """GPU memory `owner` holds over every GPU, or None when there is no fresh reading."""
    if snapshot is None or snapshot.status != "ok" or not snapshot.gpus:
        return None
    return sum(per_gpu.get(owner, 0) for per_gpu in snapshot.memory_by_owner)


class AgentService:
    """Everything the HTTP API serves. Start it, use it, stop it."""

    def __init__(
        self,
        *,
        name: str,
        sampler: TelemetrySampler,
        ollama: OllamaClient,
        comfyui: ComfyUIController,
        sample_interval_s: float = 1.0,
        unload_timeout_s: float = 15.0,
        free_timeout_s: float = 120.0,
        clock: Callable[[], float] = clock.monotonic_s,
        wall: Callable[[], datetime] = clock.utc_now,
        snapshot_heartbeat_s: float = SNAPSHOT_HEARTBEAT_S,
        peak_interval_s: float = PEAK_INTERVAL_S,
    ) -> None:
        self.name = name
        self.sampler = sampler
        self.ollama = ollama
        self.comfyui = comfyui
        self.sample_interval_s = sample_interval_s
        self.unload_timeout_s = unload_timeout_s
        self.free_timeout_s = free_timeout_s
        # Longest silence on the event stream: an unchanged snapshot is sent again after this
        # long, so a listener can tell an idle agent from a dead one.
        self.snapshot_heartbeat_s = snapshot_heartbeat_s
        # While a prompt runs, ComfyUI's memory is read this often for its peak.
        self.peak_interval_s = peak_interval_s
        self._peaks = PromptPeaks()
        self._prompt_started = asyncio.Event()
        self._closing: set[asyncio.Task[None]] = set()
        # Durations we report (load time, unload wait) use `clock`; on the simulated desktop it is
        # the simulated clock, so figures stay true to the hardware being modelled.
        self._clock = clock
        self._wall = wall
        self.started_at = wall()
        self.in_flight: Counter[str] = Counter()
        self._ollama_state = _OllamaState()
        self._comfy_state = _ComfyState()
        # A dict, not a set: subscribers are served in the order they came, run after run.
        self._subscribers: dict[asyncio.Queue[AgentEvent], None] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._last_digest: tuple[Any, ...] | None = None
        self._ollama_lock = asyncio.Lock()
        # Models announced as resident (normalized name -> name as Ollama lists it), so each
        # load and unload is announced once however many readers notice it.
        self._announced: dict[str, str] = {}
        # Models a load or unload of ours is changing; that operation announces them itself.
        self._changing: set[str] = set()
        # Bumped whenever a load or unload reads or changes the runner list: a background
        # refresh that overlapped it holds an older list and must not overwrite it.
        self._running_epoch = 0
        # When Ollama's version and models on disk are next re-read by the periodic refresh.
        self._catalog_due_s = -math.inf
        comfyui.on_event = self._on_prompt_event

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start sampling and following ComfyUI, read Ollama once, then watch in the background."""
        await self.sampler.start()
        await self.comfyui.start()
        await self.refresh()
        self._tasks = [
            asyncio.create_task(self._watch(), name="agent-watch"),
            asyncio.create_task(self._publish_snapshots(), name="agent-snapshots"),
            asyncio.create_task(self._watch_prompt_peaks(), name="agent-prompt-peaks"),
        ]

    async def stop(self) -> None:
        """Stop the background tasks, ComfyUI follower and sampler, and close the Ollama client."""
        tasks = [*self._tasks, *self._closing]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.comfyui.stop()
        await self.sampler.stop()
        await self.ollama.aclose()

    async def refresh(self, *, full: bool = True) -> None:
        """Re-read Ollama's and ComfyUI's state now. With `full=False` Ollama's version and
        models on disk are re-read only every `CATALOG_REFRESH_S`: they change rarely, while the
        running models change with every request."""
        await asyncio.gather(self._refresh_ollama(full=full), self._refresh_comfyui())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.sample_interval_s)
            await self.refresh(full=False)

    async def _refresh_ollama(self, *, full: bool) -> None:
        state = self._ollama_state
        epoch = self._running_epoch
        now_s = clock.monotonic_s()
        catalog_due = full or not state.reachable or now_s >= self._catalog_due_s
        try:
            if catalog_due:
                version, available, running = await asyncio.gather(
                    self.ollama.version(), self.ollama.available(), self.ollama.running()
                )
                self._catalog_due_s = now_s + CATALOG_REFRESH_S
            else:
                version, available = state.version or "", state.available
                running = await self.ollama.running()
        except OllamaError as exc:
            if state.reachable:
                log.warning("Ollama unreachable: %s", exc)
            state.reachable, state.error = False, str(exc)
            state.running = []
            return
        if not state.reachable:
            log.info("Ollama reachable (version %s)", version)
        state.reachable, state.error, state.version = True, None, version
        state.available = available
        state.checked_at = self._wall()
        if epoch != self._running_epoch:
            return  # a load or unload read the runners meanwhile; its list is fresher
        state.running = running
        self._announce_changes(running)

    def _announce_changes(self, running: list[RunningModel]) -> None:
        """Announce models that appeared in or left Ollama's list since the last announcement,
        except those a load or unload of ours is changing (it announces them, with details)."""
        listed = {normalize_model_name(m.name): m.name for m in running}
        for key in sorted(listed.keys() - self._announced.keys() - self._changing):
            self._publish_model_event("loaded", listed[key])
        for key in sorted(self._announced.keys() - listed.keys() - self._changing):
            self._publish_model_event("unloaded", self._announced[key])

    async def _refresh_comfyui(self) -> None:
        state = self._comfy_state
        try:
            state.queue_running, state.queue_pending = await self.comfyui.queue_counts()
        except ComfyUIError as exc:
            if state.reachable:
                log.warning("ComfyUI unreachable: %s", exc)
            state.reachable = False
            return
        if not state.reachable:
            log.info("ComfyUI reachable")
        state.reachable = True

    # -- events ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[AgentEvent]]:
        """A queue receiving every event from now on, starting with a snapshot."""
        queue: asyncio.Queue[AgentEvent] = asyncio.Queue(SUBSCRIBER_QUEUE)
        queue.put_nowait(AgentEvent(type="snapshot", at=self._wall(), status=self.status()))
        self._subscribers[queue] = None
        try:
            yield queue
        finally:
            self._subscribers.pop(queue, None)

    def _publish(self, event: AgentEvent) -> None:
        for queue in self._subscribers:
            if queue.full():
                # A slow reader loses its oldest event rather than stalling the agent.
                queue.get_nowait()
            queue.put_nowait(event)

    def _publish_model_event(self, kind: str, model: str, **detail: Any) -> None:
        key = normalize_model_name(model)
        if kind == "loaded":
            if key in self._announced:
                return
            self._announced[key] = model
        elif kind == "unloaded" and self._announced.pop(key, None) is None:
            return  # never announced as resident, or already announced gone
        log.info("model %s: %s %s", model, kind, detail or "")
        self._publish(
            AgentEvent(
                type="model", at=self._wall(), event=kind, model=model, detail=detail or None
            )
        )

    def _on_prompt_event(self, event: PromptEvent) -> None:
        if event.kind == "started":
            self._prompt_started.set()
        if event.kind == "finished":
            log.info(
                "prompt %s %s: %s", event.record.prompt_id, event.record.state, event.record.reason
            )
            if self._peaks.begin_close(event.record.prompt_id):
                # The end goes out with the peak made final by one more reading.
                task = asyncio.create_task(self._close_peak(event))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
                return
        self._publish_prompt_event(event)

    async def _close_peak(self, event: PromptEvent) -> None:
        comfyui_bytes = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(PEAK_CLOSE_TIMEOUT_S):
                comfyui_bytes = await self.sampler.owner_bytes_now("comfyui")
        self._peaks.close(event.record.prompt_id, comfyui_bytes)
        self._publish_prompt_event(event)

    def _publish_prompt_event(self, event: PromptEvent) -> None:
        self._publish(
            AgentEvent(
                type="prompt", at=self._wall(), event=event.kind, prompt=self._info(event.record)
            )
        )

    async def _watch_prompt_peaks(self) -> None:
        """Read ComfyUI's memory every `peak_interval_s` while a prompt runs, for its peak;
        asleep while none does."""
        while True:
            running = [r.prompt_id for r in self.comfyui.records() if r.state == "running"]
            if not running:
                self._prompt_started.clear()
                await self._prompt_started.wait()
                continue
            comfyui_bytes = await self.sampler.owner_bytes_now("comfyui")
            if comfyui_bytes is not None:
                self._peaks.observe(running, comfyui_bytes)
            await asyncio.sleep(self.peak_interval_s)

    def _info(self, record: PromptRecord) -> PromptInfo:
        return prompt_info(record, peak_vram_bytes=self._peaks.peak(record.prompt_id))

    async def _publish_snapshots(self) -> None:
        """A snapshot whenever the status changes, and at least every `snapshot_heartbeat_s`
        (also while the sampler is stalled: the growing telemetry age then says so)."""
        seq = 0
        last_sent_s = -math.inf
        while True:
            try:
                snapshot = await self.sampler.wait_for(seq, timeout_s=self.snapshot_heartbeat_s)
                seq = snapshot.seq
            except TimeoutError:
                pass
            status = self.status()
            digest = _digest(status)
            now_s = clock.monotonic_s()
            if digest != self._last_digest or now_s - last_sent_s >= self.snapshot_heartbeat_s:
                self._last_digest = digest
                last_sent_s = now_s
                self._publish(AgentEvent(type="snapshot", at=status.now, status=status))

    # -- status ---------------------------------------------------------------------------

    def status(self) -> AgentStatus:
        """A snapshot from cached state: no I/O, so `/status` and scrapes answer at once."""
        return AgentStatus(
            agent=self.name,
            version=__version__,
            started_at=self.started_at,
            now=self._wall(),
            telemetry=self._telemetry_info(),
            ollama=self._ollama_info(),
            comfyui=self._comfyui_info(),
        )

    def _telemetry_info(self) -> TelemetryInfo:
        snap = self.sampler.latest
        if snap is None:
            return TelemetryInfo(
                status="no_gpu",
                reason="no sample taken yet",
                backend=None,
                driver_version=None,
                taken_at=None,
                age_s=None,
                sample_interval_s=self.sample_interval_s,
                gpus=[],
                host=None,
            )
        return TelemetryInfo(
            status=snap.status,
            reason=snap.reason,
            backend=snap.backend,
            driver_version=snap.driver_version,
            taken_at=snap.taken_at,
            age_s=round(snap.age_s(clock.monotonic_s()), 3),
            sample_interval_s=self.sample_interval_s,
            gpus=[
                gpu_info(g, owners)
                for g, owners in zip(snap.gpus, snap.memory_by_owner, strict=True)
            ],
            host=HostInfo(**dataclasses.asdict(snap.host)) if snap.host is not None else None,
        )

    def _ollama_info(self) -> OllamaInfo:
        state = self._ollama_state
        return OllamaInfo(
            reachable=state.reachable,
            error=state.error,
            version=state.version,
            checked_at=state.checked_at,
            available=[AvailableModelInfo(**dataclasses.asdict(m)) for m in state.available],
            resident=[
                ResidentModelInfo(
                    name=m.name,
                    size_bytes=m.size_bytes,
                    vram_bytes=m.vram_bytes,
                    context_length=m.context_length,
                    expires_at=m.expires_at,
                    in_flight=self.in_flight.get(normalize_model_name(m.name), 0),
                    offloaded=m.vram_bytes < m.size_bytes,
                )
                for m in state.running
            ],
            in_flight={k: v for k, v in self.in_flight.items() if v > 0},
        )

    def _comfyui_info(self) -> ComfyUIInfo:
        records = self.comfyui.records()
        live = [r for r in records if r.state not in FINAL_STATES]
        done = [r for r in records if r.state in FINAL_STATES][-RECENT_PROMPTS:]
        age = self.comfyui.last_message_age_s
        return ComfyUIInfo(
            reachable=self._comfy_state.reachable,
            connection=self.comfyui.connection,
            last_message_age_s=round(age, 3) if age is not None else None,
            queue_running=self._comfy_state.queue_running,
            queue_pending=self._comfy_state.queue_pending,
            prompts=[self._info(r) for r in live + done],
        )

    # -- Ollama ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def track_request(self, model: str | None) -> Iterator[None]:
        """Count a request to `model` as in flight for as long as the block runs."""
        if not model:
            yield
            return
        key = normalize_model_name(model)
        self.in_flight[key] += 1
        try:
            yield
        finally:
            self.in_flight[key] -= 1
            if self.in_flight[key] <= 0:
                del self.in_flight[key]

    @contextlib.contextmanager
    def _changing_model(self, model: str) -> Iterator[None]:
        key = normalize_model_name(model)
        self._changing.add(key)
        try:
            yield
        finally:
            self._changing.discard(key)

    async def _find_running(self, model: str) -> RunningModel | None:
        key = normalize_model_name(model)
        running = await self.ollama.running()
        self._running_epoch += 1
        self._ollama_state.running = running
        return next((m for m in running if normalize_model_name(m.name) == key), None)

    async def _load_model(self, request: LoadRequest) -> None:
        """Ask Ollama to load the model the way its kind needs: an embedding model through
        /api/embed. An Ollama too old to list capabilities says so by refusing generate."""
        key = normalize_model_name(request.model)
        listed = next(
            (m for m in self._ollama_state.available if normalize_model_name(m.name) == key),
            None,
        )
        embedding = listed is not None and listed.embedding
        try:
            await self.ollama.load(
                request.model,
                keep_alive=request.keep_alive,
                num_ctx=request.num_ctx,
                embedding=embedding,
            )
        except OllamaRejected as exc:
            if embedding or "does not support generate" not in str(exc):
                raise
            await self.ollama.load(
                request.model,
                keep_alive=request.keep_alive,
                num_ctx=request.num_ctx,
                embedding=True,
            )

    async def load(self, request: LoadRequest) -> LoadResult:
        """Load a model; returns once Ollama lists it, with the load time and its footprint."""
        async with self._ollama_lock:
            with self._changing_model(request.model):
                already = await self._find_running(request.model)
                before = owner_bytes(await self.sampler.sample_now(), "ollama")
                started = self._clock()
                await self._load_model(request)
                load_time_s = self._clock() - started
                loaded = await self._find_running(request.model)
                after = owner_bytes(await self.sampler.sample_now(), "ollama")
        if loaded is None:
            raise ModelNotFound(f"Ollama accepted the load of {request.model} but does not list it")
        delta = after - before if after is not None and before is not None else None
        if already is None:
            self._publish_model_event(
                "loaded",
                loaded.name,
                load_time_s=round(load_time_s, 3),
                vram_bytes=loaded.vram_bytes,
            )
        return LoadResult(
            model=loaded.name,
            already_resident=already is not None,
            load_time_s=round(load_time_s, 4),
            size_bytes=loaded.size_bytes,
            vram_bytes=loaded.vram_bytes,
            context_length=loaded.context_length,
            nvml_delta_bytes=delta,
        )

    async def unload(self, request: UnloadRequest) -> UnloadResult:
        """Unload a model and wait until NVML shows its memory back (or Ollama stops listing it
        when there is no GPU reading). A model with requests in flight needs `force`."""
        key = normalize_model_name(request.model)
        busy = self.in_flight.get(key, 0)
        if busy and not request.force:
            raise Conflict(
                f"{request.model} has {busy} request(s) in flight; pass force=true to unload anyway"
            )
        async with self._ollama_lock:
            with self._changing_model(request.model):
                runner = await self._find_running(request.model)
                if runner is None:
                    # Ask anyway: Ollama answers 404 for a model it does not have at all.
                    await self.ollama.unload(request.model)
                    return UnloadResult(
                        model=request.model,
                        was_resident=False,
                        freed_bytes=0,
                        wait_s=0.0,
                        confirmed_by="ollama",
                    )
                baseline = owner_bytes(await self.sampler.sample_now(), "ollama")
                started = self._clock()
                await self.ollama.unload(request.model)
                freed, confirmed_by = await self._await_unloaded(runner, baseline, started)
                # The memory is back, so the model is gone, whether or not Ollama was re-read.
                state = self._ollama_state
                state.running = [m for m in state.running if normalize_model_name(m.name) != key]
                self._running_epoch += 1
        wait_s = round(self._clock() - started, 4)
        self._publish_model_event("unloaded", runner.name, freed_bytes=freed, wait_s=wait_s)
        return UnloadResult(
            model=runner.name,
            was_resident=True,
            freed_bytes=freed,
            wait_s=wait_s,
            confirmed_by=confirmed_by,
        )

    async def _await_unloaded(
        self, runner: RunningModel, baseline: int | None, started: float
    ) -> tuple[int, str]:
        deadline = clock.monotonic_s() + self.unload_timeout_s
        target = RECOVERED_SHARE * runner.vram_bytes
        freed = 0
        while True:
            now_bytes = owner_bytes(await self.sampler.sample_now(), "ollama")
            if baseline is not None and now_bytes is not None and runner.vram_bytes > 0:
                freed = max(0, baseline - now_bytes)
                if freed >= target:
                    return freed, "nvml"
            elif await self._find_running(runner.name) is None:
                # No GPU reading (or a CPU-only runner): Ollama's own listing is all we have.
                return runner.vram_bytes, "ollama"
            if clock.monotonic_s() >= deadline:
                raise UnloadTimeout(
                    f"asked Ollama to unload {runner.name} {self._clock() - started:.1f} s ago, "
                    f"but NVML shows only {freed} of its {runner.vram_bytes} bytes released"
                )
            await asyncio.sleep(CONFIRM_POLL_S)

    # -- ComfyUI --------------------------------------------------------------------------

    async def submit_prompt(self, workflow: dict[str, Any], prompt_id: str | None) -> PromptInfo:
        """Queue a workflow on ComfyUI, idempotently per id (see `ComfyUIController.submit`)."""
        return self._info(await self.comfyui.submit(workflow, prompt_id))

    async def get_prompt(self, prompt_id: str) -> PromptInfo | None:
        """The prompt's state, or None when neither this agent nor its ComfyUI knows it (one
        submitted before the agent restarted is found in ComfyUI and followed again)."""
        record = await self.comfyui.find(prompt_id)
        return self._info(record) if record is not None else None

    async def cancel_prompt(self, prompt_id: str) -> PromptInfo:
        """Dequeue or interrupt the prompt; raises `PromptNotFound` for an id never submitted."""
        return self._info(await self.comfyui.cancel(prompt_id))

    async def upload(
        self,
        data: bytes,
        filename: str,
        *,
        mask_of: dict[str, str] | None,
        folder_type: str,
        subfolder: str,
        overwrite: bool,
        content_type: str,
    ) -> UploadResult:
        """Upload a picture to ComfyUI (`/upload/image`, or `/upload/mask` onto `mask_of`)."""
        result = await self.comfyui.upload(
            data,
            filename,
            mask_of=mask_of,
            folder_type=folder_type,
            subfolder=subfolder,
            overwrite=overwrite,
            content_type=content_type,
        )
        log.info("uploaded %s to ComfyUI as %s", filename, result.reference())
        return result

    async def free(self, request: FreeRequest) -> FreeResult:
        """Ask ComfyUI to free memory and wait until it has: ComfyUI applies `/free` only after
        the running prompt, so this can take as long as that prompt.

        On a CPU (or Apple) device ComfyUI reports the machine's RAM as its memory, which no
        `/free` gives back: there its own answer confirms the free, once no prompt runs."""
        started = self._clock()
        first = owner_bytes(await self.sampler.sample_now(), "comfyui")
        peak_nvml = first or 0
        peak_reserved = 0
        stats = await self.comfyui.system_stats()
        await self.comfyui.free(
            unload_models=request.unload_models, free_memory=request.free_memory
        )
        if _on_ram_device(stats):
            return await self._free_confirmed_by_comfyui(started)
        deadline = clock.monotonic_s() + self.free_timeout_s
        while True:
            stats = await self.comfyui.system_stats()
            reserved = _torch_reserved_bytes(stats)
            running, _ = await self.comfyui.queue_counts()
            nvml_now = owner_bytes(await self.sampler.sample_now(), "comfyui")
            peak_reserved = max(peak_reserved, reserved)
            if nvml_now is not None:
                peak_nvml = max(peak_nvml, nvml_now)
            if running == 0 and reserved <= TORCH_EMPTY_BYTES:
                if nvml_now is None:
                    return FreeResult(
                        freed_bytes=peak_reserved,
                        wait_s=round(self._clock() - started, 4),
                        confirmed_by="comfyui",
                    )
                freed = max(0, peak_nvml - nvml_now)
                if freed >= RECOVERED_SHARE * max(0, peak_reserved - TORCH_EMPTY_BYTES):
                    return FreeResult(
                        freed_bytes=freed,
                        wait_s=round(self._clock() - started, 4),
                        confirmed_by="nvml",
                    )
            if clock.monotonic_s() >= deadline:
                held = "a prompt is running and " if running else ""
                raise FreeTimeout(
                    f"asked ComfyUI to free memory {self._clock() - started:.1f} s ago, but "
                    f"{held}its allocator still holds {reserved} bytes"
                )
            await asyncio.sleep(BUSY_POLL_S if running else CONFIRM_POLL_S)

    async def _free_confirmed_by_comfyui(self, started: float) -> FreeResult:
        """ComfyUI took the /free (200); it applies it once the running prompt ends."""
        deadline = clock.monotonic_s() + self.free_timeout_s
        while True:
            running, _ = await self.comfyui.queue_counts()
            if running == 0:
                return FreeResult(
                    freed_bytes=0,
                    wait_s=round(self._clock() - started, 4),
                    confirmed_by="comfyui",
                )
            if clock.monotonic_s() >= deadline:
                raise FreeTimeout(
                    f"asked ComfyUI (on its CPU) to free memory {self._clock() - started:.1f} s "
                    "ago, but a prompt is still running"
                )
            await asyncio.sleep(BUSY_POLL_S)


def _on_ram_device(stats: dict[str, Any]) -> bool:
    """Whether every device ComfyUI lists reports the machine's RAM (`--cpu`, Apple's mps)."""
    devices = [d for d in stats.get("devices") or [] if isinstance(d, dict)]
    return bool(devices) and all(d.get("type") in RAM_DEVICE_TYPES for d in devices)


def _torch_reserved_bytes(stats: dict[str, Any]) -> int:
    devices = stats.get("devices") or []
    return sum(int(d.get("torch_vram_total") or 0) for d in devices if isinstance(d, dict))


def _digest(status: AgentStatus) -> tuple[Any, ...]:
    """What counts as a change worth a new snapshot: not the clock, not sub-MiB jitter."""
    tel = status.telemetry
    gpus = tuple(
        (
            g.memory_used_bytes >> 20,
            g.utilization_gpu_percent,
            g.temperature_c,
            round(g.power_w or 0),
        )
        for g in tel.gpus
    )
    resident = tuple((m.name, m.vram_bytes, m.in_flight) for m in status.ollama.resident)
    prompts = tuple((p.prompt_id, p.state, p.node, p.step) for p in status.comfyui.prompts)
    return (
        tel.status,
        tel.reason,
        gpus,
        status.ollama.reachable,
        resident,
        status.comfyui.reachable,
        status.comfyui.connection,
        status.comfyui.queue_running,
        status.comfyui.queue_pending,
        prompts,
    )


def gpu_info(reading: GpuReading, by_owner: dict[str, int]) -> GpuInfo:
    return GpuInfo(
        index=reading.index,
        uuid=reading.uuid,
        name=reading.name,
        memory_total_bytes=reading.memory_total_bytes,
        memory_used_bytes=reading.memory_used_bytes,
        memory_free_bytes=reading.memory_free_bytes,
        memory_reserved_bytes=reading.memory_reserved_bytes,
        utilization_gpu_percent=reading.utilization_gpu_percent,
        utilization_memory_percent=reading.utilization_memory_percent,
        temperature_c=reading.temperature_c,
        power_w=reading.power_w,
        power_limit_w=reading.power_limit_w,
        memory_by_owner_bytes=dict(by_owner),
        processes=[
            GpuProcessInfo(
                pid=p.pid, owner=classify(p.name, p.cmdline), name=p.name, used_bytes=p.used_bytes
            )
            for p in reading.processes
        ],
    )


def prompt_info(record: PromptRecord, *, peak_vram_bytes: int | None = None) -> PromptInfo:
    """A prompt record on the wire, with ComfyUI's measured peak while it ran if known."""
    return PromptInfo(
        prompt_id=record.prompt_id,
        state=record.state,
        submitted_at=record.submitted_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        node=record.node,
        step=record.step,
        steps=record.steps,
        nodes_done=record.nodes_done,
        nodes_total=record.nodes_total,
        outputs=[OutputFileInfo(**dataclasses.asdict(o)) for o in record.outputs],
        error=record.error,
        error_type=record.error_type,
        reason=record.reason,
        peak_vram_bytes=peak_vram_bytes,
    )


__all__ = ["AgentService", "GpuAgentError", "owner_bytes", "prompt_info"]
