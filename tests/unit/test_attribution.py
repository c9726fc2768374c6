"""Attribution of GPU memory to Ollama, ComfyUI and everything else."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

import psutil  # type: ignore[import-untyped]
import pytest

from gpu_agent.gpu.attribution import attribute, classify, describe_pid
from gpu_agent.sim.clock import SimClock
from gpu_agent.sim.gpu import MIB, SimGpu
from gpu_common import clock
from gpu_common.probe import GpuProcessReading, GpuReading

GIB = 1024**3


def wait_until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll `condition` until it holds or the deadline passes (for OS state we cannot await).

    A real child process exits in real time, so this is a real-time wait (no loop runs here);
    the deadline only bounds a hang, and is generous for a loaded machine.
    """
    deadline = clock.monotonic_s() + timeout_s
    while not condition():
        if clock.monotonic_s() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(0.005)


@pytest.mark.parametrize(
    ("name", "cmdline", "owner"),
    [
        # Ollama: the server, its runners across releases, and the simulated desktop's runner.
        ("ollama", ("/usr/local/bin/ollama", "serve"), "ollama"),
        ("ollama", ("/usr/local/bin/ollama", "runner", "--model", "/m/blobs/sha256-ab"), "ollama"),
        ("ollama", None, "ollama"),
        (None, ("/usr/bin/ollama", "runner", "--ollama-engine", "--port", "40123"), "ollama"),
        (
            "ollama_llama_server",
            ("/usr/lib/ollama/runners/cuda_v12/ollama_llama_server", "--model", "x"),
            "ollama",
        ),
        ("llama-server", ("/usr/local/lib/ollama/llama-server", "--port", "4011"), "ollama"),
        ("env", ("/usr/bin/env", "ollama", "serve"), "ollama"),
        # ComfyUI: main.py under a ComfyUI checkout, a bare main.py serving, the console script.
        ("python3", ("python3", "main.py", "--listen", "127.0.0.1", "--port", "8188"), "comfyui"),
        ("python", ("/opt/ComfyUI/venv/bin/python", "/opt/ComfyUI/main.py"), "comfyui"),
        ("python3.11", ("python3.11", "-u", "comfy/main.py", "--lowvram"), "comfyui"),
        ("python3", ("python3", "-X", "utf8", "main.py", "--port=8189"), "comfyui"),
        ("comfyui", ("/home/a/.venv/bin/python", "/home/a/.venv/bin/comfyui"), "comfyui"),
        ("python3", ("/home/a/.venv/bin/python3", "/home/a/.venv/bin/comfyui", "--cpu"), "comfyui"),
        # Everything else.
        ("Xorg", ("/usr/lib/xorg/Xorg", "vt2", "-displayfd", "3"), "other"),
        ("gnome-shell", ("/usr/bin/gnome-shell",), "other"),
        ("python3", ("python3", "main.py"), "other"),  # some other project's main.py
        ("python3", ("python3", "train.py", "--port", "1"), "other"),
        ("python3", ("python3", "-m", "vllm.entrypoints.api_server", "--port", "8000"), "other"),
        ("node", ("node", "main.py", "--listen"), "other"),  # main.py, but not run by Python
        ("llama-server", ("/opt/llama.cpp/llama-server", "--port", "8080"), "other"),
        ("ollama-webui", ("/usr/bin/ollama-webui",), "other"),
        (None, None, "other"),
        ("", (), "other"),
    ],
)
def test_classify(name: str | None, cmdline: tuple[str, ...] | None, owner: str) -> None:
    assert classify(name, cmdline) == owner


def _reading(processes: tuple[GpuProcessReading, ...]) -> GpuReading:
    used = sum(p.used_bytes or 0 for p in processes)
    return GpuReading(
        index=0,
        uuid="GPU-x",
        name="card",
        memory_total_bytes=12 * GIB,
        memory_used_bytes=used,
        memory_free_bytes=12 * GIB - used,
        memory_reserved_bytes=None,
        utilization_gpu_percent=None,
        utilization_memory_percent=None,
        temperature_c=None,
        power_w=None,
        power_limit_w=None,
        processes=processes,
    )


def test_attribute_a_simulated_desktop_by_the_names_it_reports() -> None:
    gpu = SimGpu(SimClock())
    gpu.attach(1201, "Xorg", ("/usr/lib/xorg/Xorg", "vt2"), compute=False)
    gpu.attach(2002, "ollama", ("/usr/local/bin/ollama", "runner", "--model", "qwen"))
    gpu.attach(4001, "python3", ("python3", "main.py", "--listen", "127.0.0.1"))
    gpu.allocate(1201, 400 * MIB)
    gpu.allocate(2002, 5 * GIB)
    gpu.allocate(4001, 3 * GIB)

    def no_lookup(pid: int) -> tuple[str, tuple[str, ...]] | None:
        raise AssertionError(f"pid {pid} carried its own name; no lookup expected")

    assert attribute(gpu.reading(), no_lookup) == {
        "ollama": 5 * GIB,
        "comfyui": 3 * GIB,
        "other": 400 * MIB,
    }


def test_attribute_looks_up_anonymous_processes_and_counts_unknown_memory_as_zero() -> None:
    table = {
        10: ("ollama", ("/usr/bin/ollama", "runner")),
        11: ("ollama", ("/usr/bin/ollama", "runner")),
        20: ("python3", ("python3", "/srv/ComfyUI/main.py")),
    }
    looked_up: list[int] = []

    def lookup(pid: int) -> tuple[str, tuple[str, ...]] | None:
        looked_up.append(pid)
        return table.get(pid)

    reading = _reading(
        (
            GpuProcessReading(10, 4 * GIB),
            GpuProcessReading(11, 1 * GIB),
            GpuProcessReading(20, 2 * GIB),
            GpuProcessReading(30, 256 * MIB),  # exited or hidden: lookup gives None
            GpuProcessReading(40, None),  # NVML would not say how much
        )
    )
    assert attribute(reading, lookup) == {
        "ollama": 5 * GIB,
        "comfyui": 2 * GIB,
        "other": 256 * MIB,
    }
    assert looked_up == [10, 11, 20, 30]


def test_attribute_of_an_idle_gpu_is_all_zero() -> None:
    assert attribute(_reading(())) == {"ollama": 0, "comfyui": 0, "other": 0}


def test_describe_pid_of_this_process() -> None:
    described = describe_pid(os.getpid())
    assert described is not None
    name, cmdline = described
    assert name == psutil.Process().name()
    assert cmdline == tuple(psutil.Process().cmdline())
    assert classify(name, cmdline) == "other"


def test_describe_pid_of_a_reaped_process_is_none() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=30)
    assert describe_pid(child.pid) is None


def test_describe_pid_of_a_zombie_is_none() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        # Not reaped yet: the exited child lingers as a zombie until wait().
        wait_until(lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE)
        assert describe_pid(child.pid) is None
    finally:
        child.wait(timeout=30)
