"""The whole studio on loopback for integration tests: simulated desktop + agent + controller.

`running_stack()` starts an agent on a `SimDesktop` and a controller that schedules on it, waits
until the controller sees the agent healthy, and hands back a `Stack` with an authenticated HTTP
client for the controller.

The tests run on the virtual-time loop (see `tests/conftest.py`), so the desktop runs at speed 1
and every figure is realistic: a cold qwen2.5:7b load takes 3.5 simulated seconds, an SDXL image
at 20 steps about 9 s with its checkpoint load. Waiting costs no real time, so the settings are
production-like: the agent samples every 0.5 s, the controller plans every 0.25 s, and timeouts
are the ones a studio would configure (a model load may take 300 s, one HTTP call to the
controller 600 s, since an LLM request may wait for room). Deadlines in tests are simulated
seconds too, sized to the simulated work they wait for. Two deliberate departures from the
defaults: no minimum residency, so a scenario's eviction happens when its plan calls for it, and
LLM requests wait at most `LLM_WAIT_S` for room.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ollama

from controller.daemon import RunningController, running_controller
from controller.engine import Engine
from controller.settings import AgentEndpoint, ControllerSettings
from gpu_agent.daemon import RunningAgent, running_agent
from gpu_agent.settings import AgentSettings
from gpu_agent.sim.desktop import COMFYUI_PID, SimDesktop
from gpu_agent.sim.workflows import SD15, SDXL, text_to_image
from tests.waiting import wait_until

AGENT_NAME = "desk"
AGENT_TOKEN = "agent-t0ken"
CONTROLLER_TOKEN = "controller-t0ken"
AUTH = {"Authorization": f"Bearer {CONTROLLER_TOKEN}"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
# One HTTP call to the controller, in simulated seconds; generous, since an LLM request may wait
# for room behind a long generation or an image job.
HTTP_TIMEOUT_S = 600.0
# Until the controller first sees its agent healthy: a few telemetry samples and snapshots.
READY_TIMEOUT_S = 30.0
# How long the stack's LLM requests wait for room before a 503 (the production default is 30 s).
LLM_WAIT_S = 30.0
# The same wait on a stack whose tests expect that 503 soon, in simulated seconds.
IMPATIENT_WAIT_S = 5.0
# Default deadline of `Stack.wait_job`: a few SDXL images with their checkpoint load.
JOB_TIMEOUT_S = 120.0
# How often a test re-checks what it waits for (a job, the fleet): as often as a client would.
POLL_S = 0.1


def sd15(*, steps: int = 20, seed: int = 1) -> dict[str, Any]:
    """An SD1.5 text-to-image workflow at its native 512x512."""
    return text_to_image(SD15, width=512, height=512, steps=steps, seed=seed)


def sdxl(*, steps: int = 20, seed: int = 1) -> dict[str, Any]:
    """An SDXL text-to-image workflow at its native 1024x1024."""
    return text_to_image(SDXL, width=1024, height=1024, steps=steps, seed=seed)


def agent_settings(port: int = 0) -> AgentSettings:
    """The agent as the tests run it: simulated, sampling every 0.5 s, behind a token."""
    return AgentSettings(
        port=port,
        simulate=True,
        sample_interval_s=0.5,
        stale_after_s=5.0,
        request_timeout_s=10.0,
        load_timeout_s=300.0,
        token=AGENT_TOKEN,
    )


def controller_settings(data_dir: Path, agent_url: str, **overrides: Any) -> ControllerSettings:
    """The controller as the tests run it; `overrides` are any `ControllerSettings` fields."""
    values: dict[str, Any] = {
        "port": 0,
        "data_dir": data_dir,
        "agents": [AgentEndpoint(name=AGENT_NAME, url=agent_url, token=AGENT_TOKEN)],
        "token": CONTROLLER_TOKEN,
        "tick_interval_s": 0.25,
        "llm_wait_s": LLM_WAIT_S,
        "min_residency_s": 0.0,
        "stale_after_s": 10.0,
        "request_timeout_s": 60.0,
        "load_timeout_s": 300.0,
    }
    values.update(overrides)
    return ControllerSettings(**values)


@dataclass
class Stack:
    """A running desktop, agent and controller, with a client that carries the token."""

    desktop: SimDesktop
    agent: RunningAgent
    controller: RunningController
    http: httpx.AsyncClient

    @property
    def engine(self) -> Engine:
        return self.controller.engine

    @property
    def url(self) -> str:
        return self.controller.url

    def comfy_bytes(self) -> int:
        """ComfyUI's process memory on the simulated GPU, as NVML would show it."""
        return self.desktop.gpu.process_bytes(COMFYUI_PID)

    def resident(self) -> dict[str, tuple[int, int]]:
        """Loaded runners in the emulated Ollama: name -> (size, size on the GPU)."""
        return {
            r.model: (r.size_bytes, r.size_vram_bytes)
            for r in self.desktop.ollama.runners()
            if not r.stopping
        }

    async def submit(self, workflow: dict[str, Any], **fields: Any) -> dict[str, Any]:
        response = await self.http.post("/v1/images", json={"workflow": workflow, **fields})
        assert response.status_code == 202, response.text
        body: dict[str, Any] = response.json()
        return body

    async def job(self, job_id: str) -> dict[str, Any]:
        response = await self.http.get(f"/v1/images/{job_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def wait_job(
        self,
        job_id: str,
        states: frozenset[str] | str = FINAL_STATES,
        timeout_s: float = JOB_TIMEOUT_S,
    ) -> dict[str, Any]:
        """The job once its state is one of `states` (by default: any final state)."""
        wanted = frozenset({states}) if isinstance(states, str) else states

        async def reached() -> dict[str, Any] | None:
            job = await self.job(job_id)
            return job if job["state"] in wanted else None

        result: dict[str, Any] = await wait_until(
            reached, timeout_s=timeout_s, poll_s=POLL_S, what=f"job {job_id} in {sorted(wanted)}"
        )
        return result

    async def generate(self, model: str, prompt: str = "hello", **body: Any) -> httpx.Response:
        """A non-streamed `/api/generate` through the controller."""
        payload = {"model": model, "prompt": prompt, "stream": False, **body}
        return await self.http.post("/api/generate", json=payload)

    async def submit_unplaceable(self) -> dict[str, Any]:
        """A job that fits the card's budget on paper but never fits beside the desktop
        session's own memory, so it stays held (with its reason) until cancelled."""
        budget_bytes = (await self.fleet())["agents"][0]["budget_bytes"]
        return await self.submit(sd15(), vram_bytes=budget_bytes)

    async def fleet(self) -> dict[str, Any]:
        response = await self.http.get("/v1/fleet")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


async def wait_agent_healthy(engine: Engine, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Until every agent link has a fresh snapshot that lists the models Ollama offers."""

    def ready() -> bool:
        for link in engine.links.values():
            if not link.health()[0] or link.status is None or not link.status.ollama.available:
                return False
        return True

    await wait_until(
        ready, timeout_s=timeout_s, poll_s=POLL_S, what="the controller to see its agent healthy"
    )


@contextlib.asynccontextmanager
async def running_controller_on(
    agent_url: str, data_dir: Path, **overrides: Any
) -> AsyncIterator[tuple[RunningController, httpx.AsyncClient]]:
    """A controller scheduling on the agent at `agent_url`, ready, with a client."""
    settings = controller_settings(data_dir, agent_url, **overrides)
    async with running_controller(settings) as controller:
        await wait_agent_healthy(controller.engine)
        async with httpx.AsyncClient(
            base_url=controller.url, headers=AUTH, timeout=HTTP_TIMEOUT_S, trust_env=False
        ) as http:
            yield controller, http


@contextlib.asynccontextmanager
async def running_stack(
    desktop: SimDesktop, data_dir: Path, **overrides: Any
) -> AsyncIterator[Stack]:
    """An agent on `desktop` (started by the caller) and a controller on it, both ready."""
    async with (
        running_agent(agent_settings(), desktop) as agent,
        running_controller_on(agent.url, data_dir, **overrides) as (controller, http),
    ):
        yield Stack(desktop=desktop, agent=agent, controller=controller, http=http)


def ollama_client(stack: Stack) -> ollama.AsyncClient:
    """The official Ollama client, pointed at the stack's controller with its token."""
    return ollama.AsyncClient(host=stack.url, headers=AUTH, timeout=HTTP_TIMEOUT_S)


async def ndjson_lines(response: httpx.Response) -> list[dict[str, Any]]:
    """Every JSON object of an NDJSON response, read to its end."""
    lines = []
    async for line in response.aiter_lines():
        if line.strip():
            lines.append(json.loads(line))
    return lines


def free_port() -> int:
    """A TCP port free on loopback now (for a server started in another process)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def drain(task: asyncio.Task[Any]) -> None:
    """Cancel `task` if it is still running and wait for it to end."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
