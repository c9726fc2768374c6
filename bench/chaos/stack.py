"""The whole stack on one simulated desktop, with every fault of the chaos day carried out through
the seams the simulator and the services expose (imperative shell).

The agent listens on a fixed port, so it can be restarted; the controller reaches it through a
`LinkProxy`, so the link can be cut or delayed; the controller can crash (`RunningController.
crash()`: no clean shutdown) and is then started again on the same data folder and port. The
desktop's faults are its own API: ComfyUI restarted, websockets dropped or silent, Ollama slow,
hung, failing mid-stream, down or restarted, NVML failing or stale, foreign processes on the GPU.
The store's disk fills through `AsyncJobStore.hold_size`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from pathlib import Path
from typing import Any, Generic, TypeVar

from bench.chaos.proxy import LinkProxy
from bench.chaos.schedule import FOREIGN_PROCESSES, Fault
from controller.daemon import RunningController, running_controller
from controller.settings import AgentEndpoint, ControllerSettings
from gpu_agent.daemon import RunningAgent, running_agent
from gpu_agent.settings import AgentSettings
from gpu_agent.sim.desktop import SimDesktop
from gpu_agent.sim.errors import SimOutOfMemory
from gpu_common.errors import ServiceError

log = logging.getLogger(__name__)

AGENT_NAME = "desktop"
# Process ids of foreign GPU processes: far from the desktop session's and the services'.
FOREIGN_PID_BASE = 30_000
# A ComfyUI that failed to start (no room for its CUDA context) is started again this often.
COMFYUI_RESTART_S = 10.0


T = TypeVar("T")


class _Running(Generic[T]):
    """One entered async context (an agent, a controller) that can be left and entered again."""

    def __init__(self) -> None:
        self.context: contextlib.AbstractAsyncContextManager[T] | None = None
        self.value: T | None = None

    async def enter(self, context: contextlib.AbstractAsyncContextManager[T]) -> T:
        self.context = context
        self.value = await context.__aenter__()
        return self.value

    async def leave(self) -> None:
        context, self.context, self.value = self.context, None, None
        if context is not None:
            await context.__aexit__(None, None, None)


class ChaosStack:
    """A desktop (started by the caller), an agent on it, a link proxy and a controller."""

    def __init__(
        self,
        desktop: SimDesktop,
        data_dir: Path,
        *,
        token: str,
        sample_interval_s: float,
        stale_after_s: float,
        seed: int = 0,
    ) -> None:
        self.desktop = desktop
        # Seeded reconnect jitter on both sides, so a seed replays its day exactly.
        self._rng = random.Random(f"chaos-stack-{seed}")
        self.data_dir = data_dir
        self._token = token
        self._agent_settings = AgentSettings(
            port=0,
            simulate=True,
            sample_interval_s=sample_interval_s,
            stale_after_s=stale_after_s,
            token=token,
        )
        # The controller trusts snapshots as long as the agent does, and no less than its default.
        self.stale_after_s = max(
            stale_after_s, float(ControllerSettings.model_fields["stale_after_s"].default)
        )
        self._controller_settings: ControllerSettings | None = None
        self._agent: _Running[RunningAgent] = _Running()
        self._controller: _Running[RunningController] = _Running()
        self.proxy: LinkProxy | None = None
        # Who holds Ollama or ComfyUI down: a restart inside a longer outage ends with it.
        self._ollama_down: set[int] = set()
        self._foreign: dict[int, int] = {}
        self._store_full: set[int] = set()
        self._comfyui_retry: asyncio.Task[None] | None = None
        self.controller_starts = 0

    @property
    def controller(self) -> RunningController | None:
        """The controller running now; None while crashed."""
        return self._controller.value

    @property
    def agent(self) -> RunningAgent | None:
        """The agent running now; None while it restarts."""
        return self._agent.value

    @property
    def controller_url(self) -> str:
        assert self._controller_settings is not None
        return f"http://127.0.0.1:{self._controller_settings.port}"

    def foreign_bytes(self) -> int:
        """GPU memory foreign processes hold now."""
        return sum(self.desktop.gpu.process_bytes(pid) for pid in self._foreign.values())

    async def start(self, *, llm_wait_s: float) -> None:
        """Start the agent, the proxy in front of it and the controller, on ports of their own
        that they keep through restarts."""
        agent = await self._agent.enter(
            running_agent(self._agent_settings, self.desktop, rng=self._rng)
        )
        port = int(agent.url.rsplit(":", 1)[1])
        self._agent_settings = self._agent_settings.model_copy(update={"port": port})
        self.proxy = LinkProxy(agent.url)
        await self.proxy.restore()
        settings = ControllerSettings(
            port=0,
            data_dir=self.data_dir,
            agents=[AgentEndpoint(name=AGENT_NAME, url=self.proxy.url, token=self._token)],
            token=self._token,
            llm_wait_s=llm_wait_s,
            stale_after_s=self.stale_after_s,
        )
        controller = await self._controller.enter(running_controller(settings, rng=self._rng))
        port = int(controller.url.rsplit(":", 1)[1])
        self._controller_settings = settings.model_copy(update={"port": port})
        self.controller_starts = 1

    async def stop(self) -> None:
        """Stop everything that runs, in order, whatever the faults left."""
        if self._comfyui_retry is not None:
            self._comfyui_retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._comfyui_retry
        await self._controller.leave()
        if self.proxy is not None:
            await self.proxy.cut()
        await self._agent.leave()
        for pid in list(self._foreign):
            self.desktop.close_foreign_process(pid)
        self._foreign.clear()

    # -- faults -----------------------------------------------------------------------------

    async def apply(self, fault_id: int, fault: Fault) -> None:
        """Begin fault `fault_id` (for a single blow: strike it)."""
        desktop = self.desktop
        kind, params = fault.kind, fault.params
        if kind == "comfyui_restart":
            await desktop.stop_comfyui()
        elif kind == "comfyui_ws_drop":
            await desktop.comfyui.drop_websockets()
        elif kind == "comfyui_ws_silent":
            desktop.comfyui.faults.websocket_silent = True
        elif kind == "ollama_slow":
            desktop.ollama.faults.response_delay_s = float(params["delay_s"])
        elif kind == "ollama_hang":
            desktop.ollama.faults.hang()
        elif kind == "ollama_midstream":
            desktop.ollama.faults.fail_stream_after_tokens = int(params["after_tokens"])
        elif kind in ("ollama_down", "ollama_restart"):
            if not self._ollama_down:
                await desktop.stop_ollama()
            self._ollama_down.add(fault_id)
        elif kind == "nvml_failing":
            desktop.probe.failing = True
        elif kind == "nvml_stale":
            desktop.probe.stale = True
        elif kind == "foreign_vram":
            name, cmdline = _foreign_process(str(params["process"]))
            pid = FOREIGN_PID_BASE + fault_id
            desktop.open_foreign_process(pid, name, cmdline, int(params["vram_bytes"]))
            self._foreign[fault_id] = pid
        elif kind == "agent_restart":
            await self._agent.leave()
        elif kind == "controller_crash":
            running = self._controller.value
            if running is not None:
                await running.crash()
            await self._controller.leave()
        elif kind == "link_cut":
            assert self.proxy is not None
            await self.proxy.cut()
        elif kind == "link_delay":
            assert self.proxy is not None
            self.proxy.delay_s = float(params["delay_s"])
        elif kind == "store_full":
            self._store_full.add(fault_id)
            await self._hold_store_size(True)
        else:
            raise ValueError(f"unknown fault kind {kind!r}")

    async def revert(self, fault_id: int, fault: Fault) -> None:
        """End fault `fault_id`: what it broke works again (a single blow needs nothing)."""
        desktop = self.desktop
        kind = fault.kind
        if kind == "comfyui_restart":
            await self._start_comfyui()
        elif kind == "comfyui_ws_silent":
            desktop.comfyui.faults.websocket_silent = False
        elif kind == "ollama_slow":
            desktop.ollama.faults.response_delay_s = 0.0
        elif kind == "ollama_hang":
            desktop.ollama.faults.unhang()
        elif kind == "ollama_midstream":
            desktop.ollama.faults.fail_stream_after_tokens = None
        elif kind in ("ollama_down", "ollama_restart"):
            self._ollama_down.discard(fault_id)
            if not self._ollama_down:
                await desktop.start_ollama()
        elif kind == "nvml_failing":
            desktop.probe.failing = False
        elif kind == "nvml_stale":
            desktop.probe.stale = False
        elif kind == "foreign_vram":
            desktop.close_foreign_process(self._foreign.pop(fault_id))
        elif kind == "agent_restart":
            await self._agent.enter(running_agent(self._agent_settings, desktop, rng=self._rng))
        elif kind == "controller_crash":
            assert self._controller_settings is not None
            await self._controller.enter(
                running_controller(self._controller_settings, rng=self._rng)
            )
            self.controller_starts += 1
            if self._store_full:
                await self._hold_store_size(True)
        elif kind == "link_cut":
            assert self.proxy is not None
            await self.proxy.restore()
        elif kind == "link_delay":
            assert self.proxy is not None
            self.proxy.delay_s = 0.0
        elif kind == "store_full":
            self._store_full.discard(fault_id)
            if not self._store_full:
                await self._hold_store_size(False)

    async def _start_comfyui(self) -> None:
        """Start ComfyUI; when the GPU has no room for its CUDA context it exits at once, and
        is started again every `COMFYUI_RESTART_S`, as systemd's `Restart=always` would."""
        if self._comfyui_retry is not None and not self._comfyui_retry.done():
            return
        try:
            await self.desktop.start_comfyui()
        except SimOutOfMemory:
            log.warning("ComfyUI could not start (GPU full); trying again")
            self._comfyui_retry = asyncio.create_task(self._retry_comfyui())

    async def _retry_comfyui(self) -> None:
        while True:
            await asyncio.sleep(COMFYUI_RESTART_S)
            with contextlib.suppress(SimOutOfMemory):
                await self.desktop.start_comfyui()
                return

    async def _hold_store_size(self, full: bool) -> None:
        running = self._controller.value
        if running is None:
            return  # crashed: the next controller starts with the disk as it is then
        with contextlib.suppress(ServiceError):
            await running.engine.store.hold_size(full)


def _foreign_process(name: str) -> tuple[str, tuple[str, ...]]:
    for process, cmdline, _, _ in FOREIGN_PROCESSES:
        if process == name:
            return process, cmdline
    raise ValueError(f"unknown foreign process {name!r}")


def describe(fault: Fault) -> dict[str, Any]:
    """A fault as plain values, for the recent-events log of a violation."""
    return {"kind": fault.kind, "at_s": fault.at_s, "duration_s": fault.duration_s,
            **fault.params}  # fmt: skip
