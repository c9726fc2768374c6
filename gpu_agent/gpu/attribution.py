"""Who holds the GPU's memory (adapter layer, pure apart from `describe_pid`).

NVML lists processes by pid and bytes; the agent needs bytes per service, so it can tell Ollama's
runners from ComfyUI from the desktop session (Xorg, the compositor, a browser). A process is
recognised from its name and command line, which the simulated GPU reports directly and which
the agent otherwise looks up with psutil.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from itertools import pairwise
from pathlib import PurePath
from typing import Literal, TypeAlias

import psutil  # type: ignore[import-untyped]  # no stubs in the dev dependencies

from gpu_common.probe import GpuReading

Owner = Literal["ollama", "comfyui", "other"]
OWNERS: tuple[Owner, ...] = ("ollama", "comfyui", "other")

ProcessLookup: TypeAlias = Callable[[int], tuple[str, tuple[str, ...]] | None]
"""Looks a pid up as `(name, cmdline)`; `None` when the process is gone or hidden."""

# Ollama's own runner binaries: the llama.cpp runner of 0.1-0.5 (`ollama_llama_server`) and the
# `llama-server` that newer releases ship in their lib/ollama directory.
_OLLAMA_RUNNER_NAMES = frozenset({"ollama_llama_server", "ollama-llama-server"})
_OLLAMA_BINARIES = frozenset({"ollama", "ollama.exe"})
_OLLAMA_SUBCOMMANDS = frozenset({"runner", "serve"})
_PYTHON = re.compile(r"^python(\d+(\.\d+)?)?w?(\.exe)?$")
_COMFYUI_SCRIPTS = frozenset({"comfyui", "comfyui.exe"})
_SERVER_FLAGS = ("--listen", "--port")


def classify(name: str | None, cmdline: Sequence[str] | None) -> Owner:
    """Which service a GPU process belongs to, from its process name and command line.

    * ollama: the `ollama` binary (`ollama serve`, `ollama runner ...`) or one of its runner
      binaries (`ollama_llama_server`, a `llama-server` under an `ollama` directory);
    * comfyui: a Python running ComfyUI's `main.py` (a path naming ComfyUI, or a bare `main.py`
      given `--listen`/`--port`), or the `comfyui` console script;
    * other: anything else, including processes with neither name nor command line.
    """
    argv = [arg for arg in (cmdline or ()) if arg]
    base_name = _basename(name) if name else ""
    if _is_ollama(base_name, argv):
        return "ollama"
    if _is_comfyui(base_name, argv):
        return "comfyui"
    return "other"


def _is_ollama(base_name: str, argv: Sequence[str]) -> bool:
    if base_name in _OLLAMA_BINARIES or base_name in _OLLAMA_RUNNER_NAMES:
        return True
    if not argv:
        return False
    program = _basename(argv[0])
    if program in _OLLAMA_RUNNER_NAMES or program in _OLLAMA_BINARIES:
        return True
    # Launched through a wrapper (`env ollama serve`, `nice ollama runner ...`).
    for arg, following in pairwise(argv):
        if _basename(arg) in _OLLAMA_BINARIES and following in _OLLAMA_SUBCOMMANDS:
            return True
    if program == "llama-server":
        return "ollama" in (part.lower() for part in PurePath(argv[0]).parts[:-1])
    return False


def _is_comfyui(base_name: str, argv: Sequence[str]) -> bool:
    if base_name in _COMFYUI_SCRIPTS:
        return True
    if not argv:
        return False
    if _basename(argv[0]) in _COMFYUI_SCRIPTS:
        return True
    if not (_PYTHON.match(_basename(argv[0])) or _PYTHON.match(base_name)):
        return False
    script = _script_of(argv[1:])
    if script is None:
        return False
    if _basename(script) in _COMFYUI_SCRIPTS:
        return True  # `python /venv/bin/comfyui`, as a console script's shebang runs it
    if _basename(script) != "main.py":
        return False
    if "comfy" in script.lower():
        return True
    return any(arg == flag or arg.startswith(flag + "=") for arg in argv for flag in _SERVER_FLAGS)


def _script_of(args: Sequence[str]) -> str | None:
    """The script a Python command line runs: the first argument that is not an option."""
    skip_value = False
    for arg in args:
        if skip_value:
            skip_value = False
            continue
        if arg in {"-m", "-c"}:
            return None  # a module or inline code, not a script file
        if arg in {"-W", "-X"}:
            skip_value = True
            continue
        if arg.startswith("-"):
            continue
        return arg
    return None


def _basename(path: str) -> str:
    return PurePath(path.replace("\\", "/")).name.lower()


def describe_pid(pid: int) -> tuple[str, tuple[str, ...]] | None:
    """`(name, cmdline)` of a live process via psutil, or `None` if it is gone or hidden.

    A process whose command line alone is hidden (another user's, on a locked-down /proc) is
    still described by name, which is enough to recognise `ollama`. NVML reports host pids, so an
    agent inside a container with its own pid namespace finds nothing and counts it as "other".
    """
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            name = proc.name()
            try:
                cmdline = tuple(proc.cmdline())
            except psutil.AccessDenied:
                cmdline = ()
    except (psutil.NoSuchProcess, psutil.AccessDenied):  # ZombieProcess is a NoSuchProcess
        return None
    return name, cmdline


def attribute(reading: GpuReading, lookup: ProcessLookup = describe_pid) -> dict[Owner, int]:
    """GPU memory in bytes per owner, for every owner (0 where none).

    Uses the name and command line the reading carries when it has them, else `lookup(pid)`;
    a process that cannot be described counts as "other". Processes whose memory NVML does not
    show (`used_bytes` None) count 0.
    """
    totals: dict[Owner, int] = dict.fromkeys(OWNERS, 0)
    for proc in reading.processes:
        if not proc.used_bytes:
            continue
        if proc.name is not None or proc.cmdline is not None:
            owner = classify(proc.name, proc.cmdline)
        else:
            described = lookup(proc.pid)
            owner = classify(*described) if described is not None else "other"
        totals[owner] += proc.used_bytes
    return totals


def name_processes(reading: GpuReading, lookup: ProcessLookup = describe_pid) -> GpuReading:
    """The reading with every anonymous process given its name and command line, if found.

    NVML reports bare pids; naming them once per sample lets every consumer classify owners
    without looking the pids up again.
    """
    named = []
    changed = False
    for proc in reading.processes:
        if proc.name is None and proc.cmdline is None:
            described = lookup(proc.pid)
            if described is not None:
                proc = dataclasses.replace(proc, name=described[0], cmdline=described[1])
                changed = True
        named.append(proc)
    return dataclasses.replace(reading, processes=tuple(named)) if changed else reading
