"""The telemetry sampler (service layer): GPU and host readings on a steady beat.

A background task reads the GPU probe and the host every `interval_s` and publishes an immutable
`TelemetrySnapshot`. Readers take `latest`, wait for the next snapshot with `wait_for`, or force a
fresh one with `sample_now` (after an unload, to confirm the memory really came back).

Blocking calls (NVML, psutil) run in worker threads, never on the event loop. The snapshot says how
much to trust it:

* `ok`: the GPUs were read just now;
* `degraded`: a probe exists but the read failed (driver gone mid-run); no GPU readings are given,
  because stale memory figures presented as fresh would let the scheduler overcommit the card;
* `no_gpu`: no probe could be made (no driver); the factory is tried again every `retry_init_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from gpu_agent.gpu.attribution import ProcessLookup, attribute, describe_pid, name_processes
from gpu_agent.host import HostReading, read_host
from gpu_common import clock
from gpu_common.errors import ProbeError
from gpu_common.probe import GpuProbe, GpuReading

log = logging.getLogger(__name__)

TelemetryStatus = Literal["ok", "degraded", "no_gpu"]


@dataclass(frozen=True, slots=True)
class TelemetrySnapshot:
    """Everything the agent knows about its GPUs and host at one instant.

    `taken_monotonic_s` is read just before the probe is called, so every figure in the snapshot
    describes the machine at that time or later. `memory_by_owner` has one dict per GPU, in the
    order of `gpus`, mapping "ollama", "comfyui" and "other" to bytes.
    """

    seq: int
    taken_at: datetime
    taken_monotonic_s: float
    status: TelemetryStatus
    reason: str | None
    gpus: tuple[GpuReading, ...]
    memory_by_owner: tuple[dict[str, int], ...]
    host: HostReading | None
    backend: str | None
    driver_version: str | None

    def age_s(self, now_monotonic_s: float) -> float:
        """Seconds since the snapshot was taken, by the sampler's monotonic clock."""
        return max(0.0, now_monotonic_s - self.taken_monotonic_s)


@dataclass(frozen=True, slots=True)
class _GpuSample:
    """What one worker-thread visit to the probe brought back."""

    gpus: tuple[GpuReading, ...]
    memory_by_owner: tuple[dict[str, int], ...]
    driver_version: str | None


class TelemetrySampler:
    """Samples a `GpuProbe` and the host periodically and publishes `TelemetrySnapshot`s.

    `probe_factory` makes the probe (e.g. `NvmlProbe`) and raises `ProbeError` when there is no
    GPU to read. `monotonic` stamps snapshots (inject a clock in tests); `wall_clock` gives
    `taken_at`. `process_lookup` names GPU processes the probe leaves anonymous.
    """

    def __init__(
        self,
        probe_factory: Callable[[], GpuProbe],
        *,
        interval_s: float = 1.0,
        host_reader: Callable[[], HostReading] = read_host,
        monotonic: Callable[[], float] = clock.monotonic_s,
        retry_init_s: float = 10.0,
        wall_clock: Callable[[], datetime] = clock.utc_now,
        process_lookup: ProcessLookup = describe_pid,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        if retry_init_s < 0:
            raise ValueError(f"retry_init_s must not be negative, got {retry_init_s}")
        self._probe_factory = probe_factory
        self._interval_s = interval_s
        self._host_reader = host_reader
        self._monotonic = monotonic
        self._retry_init_s = retry_init_s
        self._wall_clock = wall_clock
        self._process_lookup = process_lookup
        self._probe: GpuProbe | None = None
        self._probe_failed_at: float | None = None
        self._probe_failure: str | None = None
        self._seq = 0
        self._latest: TelemetrySnapshot | None = None
        self._host_failing = False
        self._task: asyncio.Task[None] | None = None
        # One sample at a time, so sequence numbers follow the order the readings were taken.
        self._sampling = asyncio.Lock()
        self._published = asyncio.Condition()

    @property
    def latest(self) -> TelemetrySnapshot | None:
        """The most recent snapshot, or `None` before the first sample."""
        return self._latest

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Take a first sample (so `latest` is set), then keep sampling in the background."""
        if self.running:
            return
        await self.sample_now()
        self._task = asyncio.create_task(self._run(), name="telemetry-sampler")

    async def stop(self) -> None:
        """Stop sampling and close the probe. Idempotent; `start()` may be called again."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        async with self._sampling:
            probe, self._probe = self._probe, None
            if probe is not None:
                await asyncio.to_thread(probe.close)

    async def sample_now(self) -> TelemetrySnapshot:
        """Take and publish one sample immediately, whether or not the sampler is running."""
        async with self._sampling:
            snapshot = await self._take()
            # Published while still holding the sampling lock, so `latest` never goes backwards.
            self._latest = snapshot
        async with self._published:
            self._published.notify_all()
        return snapshot

    async def owner_bytes_now(self, owner: str) -> int | None:
        """GPU memory `owner` (a process class such as "comfyui") holds now on all GPUs, read
        without publishing a snapshot; None when the GPU cannot be read."""
        probe = await self._ensure_probe(self._monotonic())
        if probe is None:
            return None
        try:
            sample = await asyncio.to_thread(self._read_gpus, probe)
        except Exception:
            # The periodic sample reports why the GPU cannot be read; a peak reading is skipped.
            log.debug("GPU read for the %s peak failed", owner, exc_info=True)
            return None
        return sum(owners.get(owner, 0) for owners in sample.memory_by_owner)

    async def wait_for(self, seq_after: int, timeout_s: float) -> TelemetrySnapshot:
        """The first snapshot with `seq > seq_after`; raises `TimeoutError` after `timeout_s`."""

        def arrived() -> bool:
            return self._latest is not None and self._latest.seq > seq_after

        async with asyncio.timeout(timeout_s), self._published:
            await self._published.wait_for(arrived)
            assert self._latest is not None
            return self._latest

    # -- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self._interval_s
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            try:
                await self.sample_now()
            except Exception:
                # A bug in a reader must not end telemetry for the life of the daemon.
                log.exception("telemetry sample failed")
            next_at += self._interval_s
            if next_at < loop.time():
                next_at = loop.time() + self._interval_s  # fell behind: skip, do not burst

    async def _take(self) -> TelemetrySnapshot:
        taken_monotonic_s = self._monotonic()
        taken_at = self._wall_clock()
        status: TelemetryStatus
        reason: str | None = None
        gpu_sample: _GpuSample | None = None
        probe = await self._ensure_probe(taken_monotonic_s)
        if probe is None:
            status, reason = "no_gpu", self._probe_failure
        else:
            try:
                gpu_sample = await asyncio.to_thread(self._read_gpus, probe)
                status = "ok"
            except ProbeError as exc:
                status, reason = "degraded", f"GPU read failed: {exc}"
            except Exception as exc:
                status, reason = "degraded", f"GPU read failed: {type(exc).__name__}: {exc}"
                log.debug("unexpected error reading the GPU probe", exc_info=True)
        host = await self._read_host()
        self._seq += 1
        snapshot = TelemetrySnapshot(
            seq=self._seq,
            taken_at=taken_at,
            taken_monotonic_s=taken_monotonic_s,
            status=status,
            reason=reason,
            gpus=gpu_sample.gpus if gpu_sample else (),
            memory_by_owner=gpu_sample.memory_by_owner if gpu_sample else (),
            host=host,
            backend=probe.backend if probe is not None else None,
            driver_version=gpu_sample.driver_version if gpu_sample else None,
        )
        self._log_transition(self._latest, snapshot)
        return snapshot

    async def _ensure_probe(self, now_s: float) -> GpuProbe | None:
        """The probe, making it if there is none and the retry interval has passed."""
        if self._probe is not None:
            return self._probe
        failed_at = self._probe_failed_at
        if failed_at is not None and now_s - failed_at < self._retry_init_s:
            return None
        try:
            self._probe = await asyncio.to_thread(self._probe_factory)
        except Exception as exc:
            self._probe_failed_at = now_s
            if isinstance(exc, ProbeError):
                self._probe_failure = str(exc)
            else:
                self._probe_failure = f"GPU probe could not be made: {type(exc).__name__}: {exc}"
                log.debug("unexpected error making the GPU probe", exc_info=True)
            return None
        self._probe_failed_at = None
        self._probe_failure = None
        return self._probe

    def _read_gpus(self, probe: GpuProbe) -> _GpuSample:
        """Runs in a worker thread: the probe and psutil lookups both block."""
        gpus = tuple(name_processes(gpu, self._process_lookup) for gpu in probe.read())
        by_owner = tuple(
            {str(owner): nbytes for owner, nbytes in attribute(gpu, self._process_lookup).items()}
            for gpu in gpus
        )
        return _GpuSample(gpus, by_owner, probe.driver_version())

    async def _read_host(self) -> HostReading | None:
        try:
            host = await asyncio.to_thread(self._host_reader)
        except Exception:
            if not self._host_failing:
                log.warning("host readings unavailable", exc_info=True)
            self._host_failing = True
            return None
        if self._host_failing:
            log.info("host readings available again")
        self._host_failing = False
        return host

    @staticmethod
    def _log_transition(previous: TelemetrySnapshot | None, current: TelemetrySnapshot) -> None:
        """Log when the status or its reason changes; steady state stays quiet."""
        if previous is not None and (previous.status, previous.reason) == (
            current.status,
            current.reason,
        ):
            return
        if current.status == "ok":
            names = ", ".join(gpu.name for gpu in current.gpus) or "none"
            log.info(
                "GPU telemetry ok: backend %s, driver %s, GPUs: %s",
                current.backend,
                current.driver_version,
                names,
            )
        elif current.status == "degraded":
            log.warning("GPU telemetry degraded: %s", current.reason)
        else:
            log.warning("no GPU telemetry: %s", current.reason)
