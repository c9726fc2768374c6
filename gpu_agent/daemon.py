"""The agent daemon's lifecycle (imperative shell): build, serve, notify systemd, shut down.

Order on start: (simulated desktop) -> telemetry, Ollama and ComfyUI links -> HTTP server -> first
sample -> `READY=1`. While running, `WATCHDOG=1` goes out only while samples are fresh, so a hung
sampler makes systemd restart us. On stop: `STOPPING=1` -> stop accepting -> close the links.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from gpu_agent.api import create_app
from gpu_agent.comfyui import ComfyUIController
from gpu_agent.ollama import OllamaClient
from gpu_agent.sdnotify import SystemdNotifier, should_ping_watchdog
from gpu_agent.service import AgentService
from gpu_agent.settings import AgentSettings
from gpu_agent.telemetry import TelemetrySampler
from gpu_common import clock as clock_mod
from gpu_common.probe import GpuProbe

if TYPE_CHECKING:
    from gpu_agent.sim.desktop import SimDesktop

log = logging.getLogger(__name__)

# Longest wait for the first telemetry sample before READY=1 is sent anyway (saying why).
FIRST_SAMPLE_TIMEOUT_S = 10.0


@dataclass
class RunningAgent:
    """What `running_agent` yields: the service, where it listens, and its simulated desktop."""

    service: AgentService
    url: str
    ollama_url: str
    comfyui_url: str
    desktop: SimDesktop | None = None


def _nvml_factory() -> Callable[[], GpuProbe]:
    def make() -> GpuProbe:
        from gpu_agent.gpu.nvml import NvmlProbe

        return NvmlProbe()

    return make


@contextlib.asynccontextmanager
async def running_agent(
    settings: AgentSettings,
    desktop: SimDesktop | None = None,
    *,
    rng: random.Random | None = None,
) -> AsyncIterator[RunningAgent]:
    """Start the whole agent; stop it on exit. With `simulate` it runs on a simulated desktop:
    `desktop` when given (already started, owned by the caller), else one of its own. `rng`
    draws the jitter of the ComfyUI reconnects (a seeded one replays a simulated run exactly)."""
    async with contextlib.AsyncExitStack() as stack:
        clock: Callable[[], float] | None = None
        if settings.simulate or desktop is not None:
            if desktop is None:
                from gpu_agent.sim.desktop import SimDesktop

                desktop = SimDesktop(speed=settings.sim_speed)
                await desktop.start()
                stack.push_async_callback(desktop.stop)
            ollama_url, comfyui_url = desktop.ollama_url, desktop.comfyui_url
            probe = desktop.probe

            def probe_factory() -> GpuProbe:
                return probe

            clock = desktop.clock.now
        else:
            ollama_url, comfyui_url = settings.ollama_url, settings.comfyui_url
            probe_factory = _nvml_factory()

        sampler = TelemetrySampler(probe_factory, interval_s=settings.sample_interval_s)
        ollama = OllamaClient(
            ollama_url,
            request_timeout_s=settings.request_timeout_s,
            load_timeout_s=settings.load_timeout_s,
        )
        # ComfyUI is polled on the agent's sampling beat, and a websocket that has been silent
        # with prompts outstanding is distrusted after as long as stale telemetry would be.
        comfyui = ComfyUIController(
            comfyui_url,
            client_id=settings.comfyui_client_id,
            request_timeout_s=settings.request_timeout_s,
            poll_interval_s=settings.sample_interval_s,
            quiet_after_s=settings.stale_after_s,
            rng=rng,
        )
        service = AgentService(
            name=socket.gethostname(),
            sampler=sampler,
            ollama=ollama,
            comfyui=comfyui,
            sample_interval_s=settings.sample_interval_s,
            unload_timeout_s=settings.unload_timeout_s,
            free_timeout_s=settings.free_timeout_s,
            peak_interval_s=settings.prompt_peak_interval_s,
            clock=clock or clock_mod.monotonic_s,
            # Twice within the staleness limit, so an idle agent never looks stale to a
            # listener that uses the same limit.
            snapshot_heartbeat_s=settings.stale_after_s / 2,
        )
        await service.start()
        stack.push_async_callback(service.stop)

        app = create_app(
            service,
            token=settings.effective_token(),
            max_body_bytes=settings.max_body_bytes,
            max_upload_bytes=settings.max_upload_bytes,
            allowed_hosts=settings.allowed_hosts,
            bind_host=settings.host,
        )
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        url = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
        log.info("agent listening on %s (ollama %s, comfyui %s)", url, ollama_url, comfyui_url)
        yield RunningAgent(
            service=service,
            url=url,
            ollama_url=ollama_url,
            comfyui_url=comfyui_url,
            desktop=desktop,
        )


def _status_line(service: AgentService, *, stale: bool = False) -> str:
    status = service.status()
    tel = status.telemetry
    # Without a number in it, so a stale spell changes the line once, not at every tick.
    telemetry = "telemetry stale, watchdog paused" if stale else f"telemetry {tel.status}"
    if tel.gpus:
        gpu = tel.gpus[0]
        memory = f"{gpu.memory_used_bytes / 2**30:.1f}/{gpu.memory_total_bytes / 2**30:.1f} GiB"
    else:
        memory = f"no GPU ({tel.reason})"
    models = ", ".join(m.name for m in status.ollama.resident) or "none"
    return (
        f"{telemetry}; {memory}; models: {models}; "
        f"comfyui {status.comfyui.connection}, queue {status.comfyui.queue_running}+"
        f"{status.comfyui.queue_pending}"
    )


async def serve(
    settings: AgentSettings,
    stop: asyncio.Event,
    *,
    notifier: SystemdNotifier | None = None,
    on_ready: Callable[[RunningAgent], None] | None = None,
) -> None:
    """Run the agent until `stop` is set, keeping systemd informed."""
    notifier = notifier or SystemdNotifier()
    async with running_agent(settings) as agent:
        service = agent.service
        try:
            await service.sampler.wait_for(0, timeout_s=FIRST_SAMPLE_TIMEOUT_S)
        except TimeoutError:
            log.warning("no telemetry sample within %.0f s; ready anyway", FIRST_SAMPLE_TIMEOUT_S)
        notifier.ready(_status_line(service))
        if on_ready is not None:
            on_ready(agent)
        interval_s = notifier.watchdog_interval_s() or settings.sample_interval_s
        last_line = ""
        while not stop.is_set():
            latest = service.sampler.latest
            age = latest.age_s(clock_mod.monotonic_s()) if latest is not None else None
            fresh = should_ping_watchdog(age, settings.stale_after_s)
            if fresh:
                notifier.watchdog()
            line = _status_line(service, stale=not fresh)
            if line != last_line:
                notifier.status(line)
                last_line = line
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval_s):
                    await stop.wait()
        notifier.stopping("shutting down")
