"""Tests under tests/gpu read the real NVML and need an NVIDIA GPU.

Where there is none (`nvidia-smi` not on PATH, or NVML will not initialise) they skip with the
reason. On a GPU runner set `GPU_TESTS=require`: a missing GPU then fails the tests instead of
skipping them, so a broken driver cannot pass CI silently.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pynvml
import pytest

from gpu_agent.gpu.nvml import NvmlProbe


def _no_gpu_reason() -> str | None:
    """Why the real-GPU tests cannot run here, or `None` when they can."""
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU: nvidia-smi is not on PATH"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return f"no NVIDIA GPU: NVML init failed ({type(exc).__name__}: {exc})"
    try:
        if pynvml.nvmlDeviceGetCount() == 0:
            return "no NVIDIA GPU: NVML reports no devices"
    finally:
        pynvml.nvmlShutdown()
    return None


@pytest.fixture(scope="session")
def gpu_unavailable_reason() -> str | None:
    return _no_gpu_reason()


@pytest.fixture(autouse=True)
def _require_gpu(gpu_unavailable_reason: str | None) -> None:
    if gpu_unavailable_reason is None:
        return
    if os.environ.get("GPU_TESTS") == "require":
        pytest.fail(f"GPU_TESTS=require but {gpu_unavailable_reason}")
    pytest.skip(gpu_unavailable_reason)


@pytest.fixture
def nvml_probe() -> Iterator[NvmlProbe]:
    probe = NvmlProbe()
    try:
        yield probe
    finally:
        probe.close()
