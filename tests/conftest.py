"""Shared fixtures: the simulated desktop on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gpu_agent.sim.desktop import SimDesktop

# Fast enough that an SDXL job (about 5.5 simulated seconds) takes about 50 ms.
TEST_SPEED = 100.0


@pytest.fixture
async def desktop(tmp_path: Path) -> AsyncIterator[SimDesktop]:
    async with SimDesktop(speed=TEST_SPEED, data_dir=tmp_path / "desktop") as desk:
        yield desk
