"""The whole system on a simulated desktop, in one process: agent and controller on loopback.

Used by the demo and the benchmarks. Run it on a `gpu_common.virtual_time.VirtualTimeLoop`: the
desktop, the agent and the controller then share one virtual clock, so every policy time
(minimum residency, longest hold, image yield) keeps its meaning in simulated seconds and every
figure is the same however busy the machine is.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
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
    """The running agents (one per desktop, in order) and the controller following them."""

    agents: list[RunningAgent]
    controller: RunningController

    @property
    def agent(self) -> RunningAgent:
        """The first (for one desktop, the only) agent."""
        return self.agents[0]


def agent_names(count: int) -> list[str]:
    """The controller's names for `count` simulated desktops' agents."""
    return [AGENT_NAME] if count == 1 else [f"{AGENT_NAME}-{i + 1}" for i in range(count)]


@contextlib.asynccontextmanager
async def simulated_stack(
    desktops: SimDesktop | Sequence[SimDesktop],
    data_dir: Path,
    *,
    token: str,
    sample_interval_s: float = 1.0,
    tick_interval_s: float = 0.5,
    llm_wait_s: float = 30.0,
) -> AsyncIterator[SimulatedStack]:
    """An agent on each desktop (already started) and a controller following them, ready.

    The agents sample every `sample_interval_s` and count as stale after three samples missed
    (at least the agent's default); the controller trusts snapshots as long as the agents do."""
    stale_after_s = max(float(AgentSettings.model_fields["stale_after_s"].default),
                        3 * sample_interval_s)  # fmt: skip
    fleet = [desktops] if isinstance(desktops, SimDesktop) else list(desktops)
    names = agent_names(len(fleet))
    agent_settings = AgentSettings(
        port=0,
        simulate=True,
        sample_interval_s=sample_interval_s,
        stale_after_s=stale_after_s,
        token=token,
    )
    async with contextlib.AsyncExitStack() as stack:
        agents = [
            await stack.enter_async_context(running_agent(agent_settings, desktop))
            for desktop in fleet
        ]
        settings = ControllerSettings(
            port=0,
            data_dir=data_dir,
            agents=[
                AgentEndpoint(name=name, url=agent.url, token=token)
                for name, agent in zip(names, agents, strict=True)
            ],
            token=token,
            tick_interval_s=tick_interval_s,
            llm_wait_s=llm_wait_s,
            stale_after_s=max(stale_after_s,
                              float(ControllerSettings.model_fields["stale_after_s"].default)),
        )  # fmt: skip
        controller = await stack.enter_async_context(running_controller(settings))
        for name in names:
            await controller.engine.links[name].wait_for_snapshot(FIRST_SNAPSHOT_TIMEOUT_S)
        yield SimulatedStack(agents, controller)
