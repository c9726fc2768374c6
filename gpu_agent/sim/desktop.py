"""The simulated desktop: one simulated GPU, an emulated Ollama and an emulated ComfyUI.

This is the stand-in for the studio's Linux desktop that every test, the demo and the benchmarks
run against. Both emulators draw on the same `SimGpu`, so using them without coordination reproduces
the real trouble: a resident qwen2.5:14b leaves an SDXL job to fail out of memory, and a resident
SDXL checkpoint pushes a newly loaded LLM partly onto the CPU.

The servers are real aiohttp servers on loopback; `restart_comfyui()` and `stop_ollama()` close
their sockets for real, so clients see genuine outages.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from gpu_agent.sim.catalog import Catalog
from gpu_agent.sim.clock import SimClock
from gpu_agent.sim.comfyui import ComfyUIEmulator, ComfyUISimSettings
from gpu_agent.sim.gpu import MIB, RTX_4070_SUPER, GpuSpec, SimGpu, SimGpuProbe
from gpu_agent.sim.ollama import OllamaEmulator, OllamaSimSettings
from gpu_agent.sim.server import LoopbackServer


@dataclass(frozen=True, slots=True)
class DesktopProcess:
    """A process that holds GPU memory before any AI work starts (the desktop session)."""

    pid: int
    name: str
    cmdline: tuple[str, ...]
    vram_bytes: int


# 600 MiB at desktop idle, as measured on 4070-class cards with Xorg and a compositor running.
DESKTOP_SESSION: tuple[DesktopProcess, ...] = (
    DesktopProcess(1201, "Xorg", ("/usr/lib/xorg/Xorg", "vt2", "-displayfd", "3"), 400 * MIB),
    DesktopProcess(1388, "gnome-shell", ("/usr/bin/gnome-shell",), 136 * MIB),
    DesktopProcess(2417, "firefox", ("/usr/lib/firefox/firefox",), 64 * MIB),
)

OLLAMA_SERVE_PID = 2001
COMFYUI_PID = 4001


class SimDesktop:
    """A whole simulated GPU desktop. Use as `async with SimDesktop(speed=50) as desk: ...`."""

    def __init__(
        self,
        *,
        speed: float = 1.0,
        seed: int = 0,
        data_dir: Path | None = None,
        host: str = "127.0.0.1",
        ollama_port: int = 0,
        comfyui_port: int = 0,
        catalog: Catalog | None = None,
        gpu_spec: GpuSpec = RTX_4070_SUPER,
        ollama_settings: OllamaSimSettings | None = None,
        comfyui_settings: ComfyUISimSettings | None = None,
        desktop_session: tuple[DesktopProcess, ...] = DESKTOP_SESSION,
    ) -> None:
        self.clock = SimClock(speed)
        self.catalog = catalog or Catalog()
        self.gpu = SimGpu(self.clock, gpu_spec)
        self.probe = SimGpuProbe([self.gpu])
        self._owns_data_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="gpu-sim-"))
        self._desktop_session = desktop_session
        self.ollama = OllamaEmulator(
            clock=self.clock,
            gpu=self.gpu,
            catalog=self.catalog,
            seed=seed,
            settings=ollama_settings or OllamaSimSettings(),
            serve_pid=OLLAMA_SERVE_PID,
        )
        self.comfyui = ComfyUIEmulator(
            clock=self.clock,
            gpu=self.gpu,
            catalog=self.catalog,
            output_dir=self.data_dir / "comfyui-output",
            seed=seed,
            settings=comfyui_settings or ComfyUISimSettings(),
            pid=COMFYUI_PID,
        )
        self.ollama_server = LoopbackServer(self.ollama.make_app, host=host, port=ollama_port)
        self.comfyui_server = LoopbackServer(self.comfyui.make_app, host=host, port=comfyui_port)

    @property
    def ollama_url(self) -> str:
        return self.ollama_server.url

    @property
    def comfyui_url(self) -> str:
        return self.comfyui_server.url

    async def start(self) -> None:
        """Put the desktop session's processes on the GPU, then start Ollama and ComfyUI."""
        for proc in self._desktop_session:
            self.gpu.attach(proc.pid, proc.name, proc.cmdline, compute=False)
            self.gpu.allocate(proc.pid, proc.vram_bytes)
        await self.ollama_server.start()
        await self.comfyui.start_process()
        await self.comfyui_server.start()

    async def stop(self) -> None:
        """Close both servers and emulators; removes the data directory if it made it."""
        await self.comfyui_server.stop()
        await self.ollama_server.stop()
        await self.comfyui.close()
        await self.ollama.close()
        if self._owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    async def __aenter__(self) -> SimDesktop:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- faults ---------------------------------------------------------------------------

    async def stop_comfyui(self) -> None:
        """ComfyUI's process dies: the port closes, queue, history and GPU memory are gone."""
        await self.comfyui_server.stop()
        await self.comfyui.kill_process()

    async def start_comfyui(self) -> None:
        """ComfyUI comes back on the same port, empty, as after `systemctl restart`."""
        await self.comfyui.start_process()
        await self.comfyui_server.start()

    async def restart_comfyui(self, downtime_real_s: float = 0.0) -> None:
        """`stop_comfyui()`, stay down `downtime_real_s` seconds, then `start_comfyui()`."""
        await self.stop_comfyui()
        if downtime_real_s > 0:
            await asyncio.sleep(downtime_real_s)
        await self.start_comfyui()

    async def stop_ollama(self) -> None:
        """Ollama's server dies: connections are cut at once, runners' memory is released and the
        port closes. Reset first, so no stream finishes gracefully during the crash."""
        await self.ollama.reset()
        await self.ollama_server.stop()

    async def start_ollama(self) -> None:
        """Ollama's server comes back on the same port, with no model loaded."""
        await self.ollama_server.start()

    def open_foreign_process(
        self, pid: int, name: str, cmdline: tuple[str, ...], vram_bytes: int
    ) -> int:
        """A process outside the stack (a game, a browser, someone's script) starts on the GPU
        and takes `vram_bytes`, or what is free when less is (as a game lowers its texture
        budget); returns the bytes it took. `close_foreign_process(pid)` gives them back."""
        self.gpu.attach(pid, name, cmdline)
        taken = max(0, min(vram_bytes, self.gpu.free_bytes()))
        self.gpu.allocate(pid, taken)
        return taken

    def close_foreign_process(self, pid: int) -> None:
        """The foreign process `pid` exits: its memory is free again."""
        self.gpu.detach(pid)

    async def restart_ollama(self, downtime_real_s: float = 0.0) -> None:
        """`stop_ollama()`, stay down `downtime_real_s` seconds, then `start_ollama()`."""
        await self.stop_ollama()
        if downtime_real_s > 0:
            await asyncio.sleep(downtime_real_s)
        await self.start_ollama()
