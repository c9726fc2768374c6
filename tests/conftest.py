"""Shared fixtures: the simulated desktop on loopback, on virtual time.

Every asyncio test runs on a `VirtualTimeLoop` unless it carries the `real_time` marker (tests
that start subprocesses or talk to servers outside this process): the simulated desktop, the
agent and the controller share the loop's virtual clock, so no figure or timeout depends on how
busy the machine is.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import pytest
from hypothesis import settings

from gpu_agent.sim.desktop import SimDesktop
from gpu_common.virtual_time import VirtualTimeLoop

# In CI, property and fuzz tests draw the same examples every run: a new counterexample should
# come from a change, not from the draw. Locally they keep exploring.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Virtual time for every asyncio test but those marked `real_time`."""
    if item.get_closest_marker("real_time") is not None:
        return {"real": asyncio.new_event_loop}
    return {"virtual": VirtualTimeLoop}


@pytest.fixture
async def desktop(tmp_path: Path) -> AsyncIterator[SimDesktop]:
    async with SimDesktop(data_dir=tmp_path / "desktop") as desk:
        yield desk
