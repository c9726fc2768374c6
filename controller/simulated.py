"""The whole system on a simulated desktop, in one process: agent and controller on loopback.

Used by the demo and the benchmarks. Run it on a `gpu_agent.virtual_time.VirtualTimeLoop`: the
desktop, the agent and the controller then share one virtual clock, so every policy time
(minimum residency, longest hold, image yield) keeps its meaning in simulated seconds and every
figure is the same however busy the machine is.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from controller.daemon import RunningController, running_controller
from controller.settings import AgentEndpoint, ControllerSettings
from gpu_agent.daemon import RunningAgent, running_agent
from gpu_agent.settings import AgentSettings
from gpu_agent.sim.desktop import SimDesktop

AGENT_NAME = "desktop"
FIRST_SNAPSHOT_TIMEOUT_S = 10.0


@dataclass
class SimulatedStack:
    agent: RunningAgent
    controller: RunningController


@contextlib.asynccontextmanager
async def simulated_stack(
    desktop: SimDesktop,
    data_dir: Path,
    *,
    token: str,
    sample_interval_s: float,
    tick_interval_s: float,
    llm_wait_s: float,
) -> AsyncIterator[SimulatedStack]:
    """An agent on `desktop` (already started) and a controller following it, ready to use."""
    agent_settings = AgentSettings(
        port=0, simulate=True, sample_interval_s=sample_interval_s, token=token
    )
    async with running_agent(agent_settings, desktop) as agent:
        settings = ControllerSettings(
            port=0,
            data_dir=data_dir,
            agents=[AgentEndpoint(name=AGENT_NAME, url=agent.url, token=token)],
            token=token,
            tick_interval_s=tick_interval_s,
            llm_wait_s=llm_wait_s,
        )
        async with running_controller(settings) as controller:
            await controller.engine.links[AGENT_NAME].wait_for_snapshot(FIRST_SNAPSHOT_TIMEOUT_S)
            yield SimulatedStack(agent, controller)
