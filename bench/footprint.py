"""Memory and CPU footprint of the agent and the controller, each in its own process.

What it measures: resident set size (MiB) and CPU use (% of one core) of four child processes,
sampled with psutil every `interval_s`, first over an idle window and then over a window of load:

- `agent`: `gpu-agent run` against the emulators of a separate `gpu-agent sim`. Its NVML probe
  finds no GPU here (telemetry "no_gpu"; the table says what it saw), so this is the agent's own
  footprint: HTTP API, telemetry loop, Ollama and ComfyUI links.
- `agent_sim`: `gpu-agent run --simulate`; its figures include the emulated Ollama and ComfyUI
  and the simulated GPU running in the same process. The controller schedules on this one,
  because only it reports a GPU.
- `sim`: `gpu-agent sim`, the emulators alone, for reference. RSS does not add up across
  these: most of each process is the Python runtime and libraries that all of them load.
- `controller`: `gpu-controller run --agent <agent_sim>`.

The load window runs `streams` generation streams (llama3.2:3b, 64 tokens) and one SD1.5 image
job at a time through the controller, and the same again straight at the bare agent (its
`/api/*` pass-through and its ComfyUI prompt API), for `load_s` seconds. At the default speed of
1 the emulators produce tokens and images as fast as the real card would, so the load is one a
real desktop can generate; a higher speed is a stress test.

How to read it: "CPU %" is the window's average (100 = one core busy), "max" the busiest
sampling interval; RSS is the mean over the window and its maximum. The "load" table counts what
finished inside the window, to show the load was real.

Before the services start, each daemon's modules are imported alone in a fresh interpreter
(`startup`: seconds and RSS after the imports, the best of `IMPORT_RUNS`), which is what `run`
pays before it listens. `targets` compares the bare agent's idle figures with what it may use on a
desktop between requests (`TARGETS`) and says whether each is met.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Coroutine, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import psutil  # type: ignore[import-untyped]  # no stubs in the dev dependencies

from bench.report import record, table
from gpu_agent.sim.workflows import SD15, text_to_image

MIB = 1024**2
MODEL = "llama3.2:3b"
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
HEALTHY_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 60.0
POLL_S = 0.05
ERROR_PAUSE_S = 0.1
# How long the load may take to finish what it started when its window ends.
DRAIN_TIMEOUT_S = 30.0
GENERATION_TOKENS = 64
OUTPUT_LINES_KEPT = 40
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled", "interrupted", "unknown"})

# What the bare agent may use while idle, sampling its GPU once a second: (process, figure, limit).
TARGETS: dict[str, tuple[str, str, float]] = {
    "agent_idle_rss_mib": ("agent", "rss_mib_mean", 45.0),
    "agent_idle_cpu_pct": ("agent", "cpu_pct_mean", 0.5),
}
# The modules each daemon imports before it serves, entry point first (as its command does).
DAEMON_MODULES = {
    "agent": ("gpu_agent.cli", "gpu_agent.daemon"),
    "controller": ("controller.cli", "controller.daemon"),
}
IMPORT_RUNS = 3
IMPORT_TIMEOUT_S = 60.0
_IMPORT_PROBE = """
import sys, time
started = time.perf_counter()
import {modules}
elapsed = time.perf_counter() - started
with open("/proc/self/statm") as statm:
    rss_pages = int(statm.read().split()[1])
import os
print(elapsed, rss_pages * os.sysconf("SC_PAGE_SIZE"), len(sys.modules))
"""

_LISTENING = re.compile(r"listening on (http://\S+)")
_SIM_URL = re.compile(r"^(ollama|comfyui)\s+(http://\S+)")


# -- child processes ----------------------------------------------------------------------------


@dataclass
class Child:
    """A started service process and the URLs it announced on stdout."""

    name: str
    process: asyncio.subprocess.Process
    urls: dict[str, str] = field(default_factory=dict)
    output: deque[str] = field(default_factory=lambda: deque(maxlen=OUTPUT_LINES_KEPT))
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        """The service's own API (`... listening on URL`)."""
        return self.urls["api"]

    def tail(self) -> str:
        return "\n".join(self.output)


def child_env() -> dict[str, str]:
    """This environment without the services' own settings, so a developer's exported token or
    port cannot change what is measured."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("GPU_AGENT_", "GPU_CONTROLLER_"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def _read_output(child: Child, needs: frozenset[str]) -> None:
    """Keep the child's stdout drained (a full pipe would block it) and pick up its URLs."""
    stream = child.process.stdout
    assert stream is not None
    try:
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip()
            child.output.append(text)
            if match := _LISTENING.search(text):
                child.urls["api"] = match.group(1)
            elif match := _SIM_URL.match(text):
                child.urls[match.group(1)] = match.group(2)
            if needs <= child.urls.keys():
                child.ready.set()
    finally:
        child.ready.set()  # at EOF too, so `spawn` stops waiting for a process that died


async def spawn(
    name: str,
    module: str,
    args: Sequence[str],
    *,
    needs: frozenset[str] = frozenset({"api"}),
    timeout_s: float = STARTUP_TIMEOUT_S,
) -> Child:
    """Start `python -m module args...` and return once it has announced every URL in `needs`.
    Raises `RuntimeError` with its last output when it exits or stays silent too long."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=child_env(),
    )
    child = Child(name, process)
    child.reader = asyncio.create_task(_read_output(child, needs))
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await child.ready.wait()
    if not needs <= child.urls.keys():
        await stop(child)
        raise RuntimeError(f"{name} did not start within {timeout_s:g} s:\n{child.tail()}")
    return child


async def stop(child: Child, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
    """SIGTERM (a graceful stop), then SIGKILL if it is still running after `timeout_s`."""
    process = child.process
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout_s):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    if child.reader is not None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await child.reader
    return process.returncode


class ChildGroup:
    """Service processes started in waves and stopped on exit, the last wave first: a client
    (the controller) goes before the services it is connected to, which would otherwise each
    wait for the other's connections while shutting down."""

    def __init__(self) -> None:
        self.waves: list[list[Child]] = []

    async def start(self, *spawns: Awaitable[Child]) -> list[Child]:
        """Start one wave of children concurrently. Those that started are kept for stopping
        even when another failed; the first failure is then raised."""
        results = await asyncio.gather(*spawns, return_exceptions=True)
        started = [result for result in results if isinstance(result, Child)]
        self.waves.append(started)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return started

    async def stop_all(self) -> None:
        for wave in reversed(self.waves):
            await asyncio.gather(*(stop(child) for child in wave))
        self.waves.clear()

    async def __aenter__(self) -> ChildGroup:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop_all()


def spawn_agent_with_sim(speed: float) -> Coroutine[Any, Any, Child]:
    """`gpu-agent run --simulate`: the agent with the simulated desktop in its own process."""
    args = ["run", "--simulate", "--speed", f"{speed:g}", "--port", "0"]
    return spawn("agent_sim", "gpu_agent.cli", args)


def spawn_sim(speed: float) -> Coroutine[Any, Any, Child]:
    """`gpu-agent sim`: the emulated Ollama and ComfyUI alone."""
    args = ["sim", "--speed", f"{speed:g}", "--ollama-port", "0", "--comfyui-port", "0"]
    return spawn("sim", "gpu_agent.cli", args, needs=frozenset({"ollama", "comfyui"}))


def spawn_agent(ollama_url: str, comfyui_url: str) -> Coroutine[Any, Any, Child]:
    """`gpu-agent run` against given Ollama and ComfyUI URLs, with its real NVML probe."""
    args = ["run", "--port", "0", "--ollama-url", ollama_url, "--comfyui-url", comfyui_url]
    return spawn("agent", "gpu_agent.cli", args)


def spawn_controller(agent_url: str, data_dir: Path) -> Coroutine[Any, Any, Child]:
    """`gpu-controller run` with one agent."""
    args = ["run", "--port", "0", "--agent", agent_url, "--data-dir", str(data_dir)]
    return spawn("controller", "controller.cli", args)


async def wait_healthy(
    client: httpx.AsyncClient, controller_url: str, timeout_s: float = HEALTHY_TIMEOUT_S
) -> None:
    """Return once the controller reports every agent healthy (it has a fresh snapshot)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            response = await client.get(f"{controller_url}/v1/fleet")
            agents = response.json()["agents"] if response.status_code == 200 else []
            if agents and all(agent["healthy"] for agent in agents):
                return
            last = "; ".join(f"{a['name']}: {a['reason']}" for a in agents) or response.text
        await asyncio.sleep(POLL_S)
    raise RuntimeError(f"the controller's agents were not healthy within {timeout_s:g} s: {last}")


# -- sampling -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Usage:
    """One process over one window."""

    rss_mib_mean: float
    rss_mib_max: float
    cpu_pct_mean: float
    cpu_pct_max: float
    samples: int


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def sample_usage(
    pids: Mapping[str, int], window_s: float, interval_s: float
) -> dict[str, Usage]:
    """RSS and CPU of each process every `interval_s` over `window_s` (at least one sample)."""
    processes = {name: psutil.Process(pid) for name, pid in pids.items()}
    started = time.monotonic()
    cpu_start = {name: _cpu_s(p) for name, p in processes.items()}
    cpu_last = dict(cpu_start)
    tick_at = started
    rss: dict[str, list[float]] = {name: [] for name in processes}
    cpu_pct: dict[str, list[float]] = {name: [] for name in processes}
    ticks = max(1, round(window_s / interval_s))
    for tick in range(1, ticks + 1):
        # Sleeping to a fixed cadence is the point here: each sample covers one interval.
        await asyncio.sleep(max(0.0, started + tick * interval_s - time.monotonic()))
        now = time.monotonic()
        for name, process in processes.items():
            cpu = _cpu_s(process)
            cpu_pct[name].append(100 * (cpu - cpu_last[name]) / max(now - tick_at, 1e-9))
            rss[name].append(process.memory_info().rss / MIB)
            cpu_last[name] = cpu
        tick_at = now
    elapsed = max(tick_at - started, 1e-9)
    return {
        name: Usage(
            rss_mib_mean=sum(rss[name]) / len(rss[name]),
            rss_mib_max=max(rss[name]),
            cpu_pct_mean=100 * (cpu_last[name] - cpu_start[name]) / elapsed,
            cpu_pct_max=max(cpu_pct[name]),
            samples=len(rss[name]),
        )
        for name in processes
    }


async def _import_once(modules: Sequence[str]) -> tuple[float, float, int]:
    """(seconds, RSS MiB, modules loaded) of importing `modules` in a fresh interpreter."""
    code = _IMPORT_PROBE.format(modules=", ".join(modules))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(),
    )
    async with asyncio.timeout(IMPORT_TIMEOUT_S):
        out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"importing {', '.join(modules)} failed:\n{err.decode()}")
    seconds, rss_bytes, loaded = out.split()
    return float(seconds), int(rss_bytes) / MIB, int(loaded)


async def measure_imports(runs: int = IMPORT_RUNS) -> dict[str, dict[str, float]]:
    """Each daemon's start-up imports, one at a time, the best of `runs` (the least disturbed)."""
    startup: dict[str, dict[str, float]] = {}
    for daemon, modules in DAEMON_MODULES.items():
        results = [await _import_once(modules) for _ in range(runs)]
        seconds, rss_mib, loaded = min(results)
        startup[daemon] = {"import_s": seconds, "import_rss_mib": rss_mib, "modules": loaded}
    return startup


def check_targets(processes: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each of `TARGETS` with its limit, the measured idle figure and whether it is met."""
    return {
        name: {
            "limit": limit,
            "measured": processes[process]["idle"][figure],
            "met": processes[process]["idle"][figure] <= limit,
        }
        for name, (process, figure, limit) in TARGETS.items()
    }


# -- load ---------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What finished during the load window on one route."""

    generations: int = 0
    images: int = 0
    errors: int = 0


def _generate_body(num_predict: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "prompt": "Write a short product description for a walnut desk lamp.",
        "stream": True,
        "options": {"num_predict": num_predict},
    }


async def _settle(tally: Tally, ended: asyncio.Event, *, ok: bool, image: bool) -> None:
    """Count one finished item, if it finished inside the window; pause after a failure, so a
    dead server is not hammered."""
    if ended.is_set():
        return
    if not ok:
        tally.errors += 1
        await asyncio.sleep(ERROR_PAUSE_S)
    elif image:
        tally.images += 1
    else:
        tally.generations += 1


async def generations(
    client: httpx.AsyncClient, base_url: str, tally: Tally, ended: asyncio.Event
) -> None:
    """Streamed generations one after another until `ended` is set."""
    body = _generate_body(GENERATION_TOKENS)
    while not ended.is_set():
        try:
            async with client.stream("POST", f"{base_url}/api/generate", json=body) as response:
                async for _ in response.aiter_raw():
                    pass
            ok = response.status_code == 200
        except httpx.HTTPError:
            ok = False
        await _settle(tally, ended, ok=ok, image=False)


def _workflow(seed: int) -> dict[str, Any]:
    return text_to_image(SD15, width=512, height=512, steps=20, seed=seed)


async def controller_images(
    client: httpx.AsyncClient, controller_url: str, tally: Tally, ended: asyncio.Event
) -> None:
    """SD1.5 jobs through the controller, one at a time, each followed to its end."""
    seed = 0
    while not ended.is_set():
        seed += 1
        state = None
        try:
            response = await client.post(
                f"{controller_url}/v1/images", json={"workflow": _workflow(seed)}
            )
            response.raise_for_status()
            url = f"{controller_url}/v1/images/{response.json()['id']}/events"
            async with client.stream("GET", url) as events:
                async for line in events.aiter_lines():
                    if line.strip():
                        state = json.loads(line)["state"]
        except httpx.HTTPError:
            state = None
        await _settle(tally, ended, ok=state == "succeeded", image=True)


async def agent_images(
    client: httpx.AsyncClient, agent_url: str, tally: Tally, ended: asyncio.Event
) -> None:
    """SD1.5 prompts straight at an agent's ComfyUI API, one at a time, polled to their end."""
    seed = 0
    while not ended.is_set():
        seed += 1
        state = None
        try:
            response = await client.post(
                f"{agent_url}/v1/comfyui/prompts", json={"workflow": _workflow(seed)}
            )
            response.raise_for_status()
            prompt_url = f"{agent_url}/v1/comfyui/prompts/{response.json()['prompt_id']}"
            while state not in TERMINAL_STATES:
                await asyncio.sleep(POLL_S)
                polled = await client.get(prompt_url)
                polled.raise_for_status()
                state = polled.json()["state"]
        except httpx.HTTPError:
            state = None
        await _settle(tally, ended, ok=state == "succeeded", image=True)


async def warm_up(client: httpx.AsyncClient, base_urls: Sequence[str]) -> None:
    """One generation through each route, so the model is loaded before anything is sampled."""
    for base_url in base_urls:
        response = await client.post(
            f"{base_url}/api/generate", json={**_generate_body(8), "stream": False}
        )
        response.raise_for_status()


async def under_load(
    loads: Sequence[Coroutine[Any, Any, None]],
    ended: asyncio.Event,
    pids: Mapping[str, int],
    window_s: float,
    interval_s: float,
) -> dict[str, Usage]:
    """Run `loads` while sampling. When the window ends, set `ended` and let each load finish
    what it has started (up to `DRAIN_TIMEOUT_S`), so the services stop with nothing cut
    mid-stream; what is still running then is cancelled."""
    tasks = [asyncio.create_task(load) for load in loads]
    try:
        return await sample_usage(pids, window_s, interval_s)
    finally:
        ended.set()
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


# -- the benchmark ------------------------------------------------------------------------------

DESCRIPTIONS = {
    "agent": "gpu-agent run (its own footprint)",
    "agent_sim": "gpu-agent run --simulate (with the emulators)",
    "sim": "gpu-agent sim (the emulators alone)",
    "controller": "gpu-controller run, one agent",
}

COLUMNS = (
    "process",
    "idle RSS",
    "idle CPU %",
    "load RSS",
    "load RSS max",
    "load CPU %",
    "load CPU % max",
)


def _print(figures: Mapping[str, Any]) -> None:
    processes: Mapping[str, Mapping[str, Any]] = figures["processes"]
    legend = []
    rows = []
    for name, fig in processes.items():
        idle, load = fig["idle"], fig["load"]
        seen = f"; telemetry {fig['telemetry']}" if "telemetry" in fig else ""
        legend.append([name, DESCRIPTIONS[name] + seen])
        rows.append([name, idle["rss_mib_mean"], idle["cpu_pct_mean"]])
        rows[-1] += [load["rss_mib_mean"], load["rss_mib_max"]]
        rows[-1] += [load["cpu_pct_mean"], load["cpu_pct_max"]]
    config = figures["config"]
    table("Processes measured", ["process", "what it runs"], legend)
    table(
        f"Footprint: RSS MiB, CPU % of one core; idle {config['idle_s']:g} s, then load "
        f"{config['load_s']:g} s; every {config['interval_s']:g} s; sim x{config['speed']:g}",
        COLUMNS,
        rows,
    )
    table(
        "Work finished during the load window",
        ["route", "generations", "images", "errors"],
        [
            [route, t["generations"], t["images"], t["errors"]]
            for route, t in figures["load"].items()
        ],
    )
    table(
        f"Start-up imports, in a fresh interpreter (best of {IMPORT_RUNS})",
        ["daemon", "imports", "modules loaded", "seconds", "RSS MiB after"],
        [
            [
                name,
                ", ".join(DAEMON_MODULES[name]),
                f["modules"],
                f["import_s"],
                f["import_rss_mib"],
            ]
            for name, f in figures["startup"].items()
        ],
    )
    table(
        f"Targets: the bare agent idle, sampled every {config['interval_s']:g} s",
        ["target", "limit", "measured", "met"],
        [
            [name, t["limit"], t["measured"], "yes" if t["met"] else "NO"]
            for name, t in figures["targets"].items()
        ],
    )


async def run(
    *,
    speed: float = 1.0,
    idle_s: float = 10.0,
    load_s: float = 10.0,
    interval_s: float = 1.0,
    streams: int = 4,
    save: bool = True,
) -> dict[str, Any]:
    """Start the four processes, sample them idle and under load, print and record
    `footprint`."""
    # Before any service runs, so the imports have the machine to themselves.
    startup = await measure_imports()
    async with contextlib.AsyncExitStack() as stack:
        data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-fp-")))
        group = await stack.enter_async_context(ChildGroup())
        agent_sim, sim = await group.start(spawn_agent_with_sim(speed), spawn_sim(speed))
        agent, controller = await group.start(
            spawn_agent(sim.urls["ollama"], sim.urls["comfyui"]),
            spawn_controller(agent_sim.url, data_dir / "controller"),
        )
        timeout = httpx.Timeout(REQUEST_TIMEOUT_S)
        limits = httpx.Limits(max_connections=4 * streams + 8)
        client = await stack.enter_async_context(httpx.AsyncClient(timeout=timeout, limits=limits))
        await wait_healthy(client, controller.url)
        status = (await client.get(f"{agent.url}/v1/status")).json()
        # Idle means what a desktop is between requests: the model stays resident.
        await warm_up(client, (controller.url, agent.url))
        pids = {c.name: c.pid for c in (agent, agent_sim, sim, controller)}
        idle = await sample_usage(pids, idle_s, interval_s)
        tallies = {"controller": Tally(), "agent": Tally()}
        ended = asyncio.Event()
        to_controller, to_agent = tallies["controller"], tallies["agent"]
        loads = [
            *(generations(client, controller.url, to_controller, ended) for _ in range(streams)),
            controller_images(client, controller.url, to_controller, ended),
            *(generations(client, agent.url, to_agent, ended) for _ in range(streams)),
            agent_images(client, agent.url, to_agent, ended),
        ]
        load = await under_load(loads, ended, pids, load_s, interval_s)
    figures: dict[str, Any] = {
        "config": {
            "speed": speed,
            "idle_s": idle_s,
            "load_s": load_s,
            "interval_s": interval_s,
            "streams": streams,
        },
        "processes": {
            name: {"idle": asdict(idle[name]), "load": asdict(load[name])} for name in pids
        },
        "load": {route: asdict(tally) for route, tally in tallies.items()},
        "startup": startup,
    }
    figures["processes"]["agent"]["telemetry"] = status["telemetry"]["status"]
    figures["targets"] = check_targets(figures["processes"])
    _print(figures)
    if save:
        record("footprint", figures)
    return figures


if __name__ == "__main__":
    asyncio.run(run())
