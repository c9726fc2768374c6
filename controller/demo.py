"""`make demo`: a studio's busy hour on the simulated desktop, through the controller.

It starts the simulated desktop (emulated Ollama and ComfyUI on one simulated RTX 4070 SUPER), a
GPU agent on it and the controller, then replays a compressed busy hour through the studio
client: LLM requests at the fast and quality intents, SDXL and SD1.5 jobs arriving together.
The terminal shows live progress; at the end a summary table, and a picture of the GPU over time
(memory by owner, resident models, jobs) written to a PNG whose path is printed. The controller's
dashboard is live meanwhile, at the URL printed first (`--hold S` keeps it up S real seconds
after the busy hour, standing still at its end, for a person to look around).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from controller.client import StudioClient, StudioError
from controller.simulated import SimulatedStack, simulated_stack
from gpu_agent.sim.desktop import SimDesktop
from gpu_agent.sim.workflows import SD15, SDXL, text_to_image
from gpu_agent.sim.workload import Arrival, ImageArrival, LlmArrival, busy_hour
from gpu_common import clock
from gpu_common.stats import percentile
from gpu_common.virtual_time import run_virtual

TOKEN = "demo-token"
GIB = 1024**3
SAMPLE_SIM_S = 1.0


@dataclass
class Sample:
    """One reading of the desktop, every `SAMPLE_SIM_S`: GPU memory by owner (GiB) and load.

    `t_s` is simulated seconds since the run began; "desktop" is every process that is neither
    Ollama nor ComfyUI.
    """

    t_s: float
    desktop_gib: float
    ollama_gib: float
    comfyui_gib: float
    models: tuple[str, ...]
    image_running: bool
    llm_running: int


@dataclass
class Tally:
    """The run so far, for the live view and the closing summary. Durations are simulated s."""

    llm_done: list[tuple[str, str, float]] = field(default_factory=list)  # intent, model, s
    llm_failed: list[str] = field(default_factory=list)
    llm_running: int = 0
    images_done: list[tuple[str, float]] = field(default_factory=list)  # family, turnaround
    images_failed: list[str] = field(default_factory=list)
    images_waiting: int = 0
    last_reason: str = ""
    samples: list[Sample] = field(default_factory=list)


def _workflow(arrival: ImageArrival) -> dict[str, object]:
    if arrival.family == "sdxl":
        return text_to_image(SDXL, steps=arrival.steps, seed=arrival.seed, prefix="demo")
    return text_to_image(SD15, width=512, height=512, steps=arrival.steps, seed=arrival.seed,
                         prefix="demo")  # fmt: skip


async def _sample(desktop: SimDesktop, tally: Tally, t0: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        reading = desktop.gpu.reading()
        by_owner = {"ollama": 0, "comfyui": 0, "other": 0}
        for process in reading.processes:
            name = process.name or ""
            owner = "ollama" if name == "ollama" else "comfyui" if name == "python3" else "other"
            by_owner[owner] += process.used_bytes or 0
        runners = desktop.ollama.runners()
        tally.samples.append(
            Sample(
                t_s=desktop.clock.now() - t0,
                desktop_gib=by_owner["other"] / GIB,
                ollama_gib=by_owner["ollama"] / GIB,
                comfyui_gib=by_owner["comfyui"] / GIB,
                models=tuple(sorted(r.model for r in runners if not r.stopping)),
                image_running=desktop.comfyui.running_prompt_id() is not None,
                llm_running=tally.llm_running,
            )
        )
        await desktop.clock.sleep(SAMPLE_SIM_S)


def _live_view(tally: Tally, total_llm: int, total_images: int, sim_now: float) -> Group:
    last = tally.samples[-1] if tally.samples else None
    table = Table(title=f"busy hour, t = {sim_now:5.0f} s (simulated)", title_justify="left")
    for column in ("", "done", "running/held", "failed", "of"):
        table.add_column(column, justify="right")
    table.add_row("LLM requests", str(len(tally.llm_done)), str(tally.llm_running),
                  str(len(tally.llm_failed)), str(total_llm))  # fmt: skip
    table.add_row("image jobs", str(len(tally.images_done)), str(tally.images_waiting),
                  str(len(tally.images_failed)), str(total_images))  # fmt: skip
    gpu = Table.grid(padding=(0, 2))
    if last is not None:
        gpu.add_row(
            f"GPU: Ollama {last.ollama_gib:4.1f} GiB",
            f"ComfyUI {last.comfyui_gib:4.1f} GiB",
            f"desktop {last.desktop_gib:3.1f} GiB",
            "models: " + (", ".join(last.models) or "none"),
        )
    return Group(table, gpu, f"[dim]{tally.last_reason[:110]}[/]")


async def _replay(
    client: StudioClient, desktop: SimDesktop, arrivals: list[Arrival], tally: Tally, t0: float
) -> None:
    async def one(arrival: Arrival) -> None:
        await desktop.clock.sleep_until(t0 + arrival.at_s)
        started = desktop.clock.now()
        if isinstance(arrival, LlmArrival):
            tally.llm_running += 1
            try:
                result = await client.generate(
                    arrival.prompt, model=arrival.intent,
                    options={"num_predict": arrival.output_tokens},
                )  # fmt: skip
                tally.llm_done.append((arrival.intent, result.model, desktop.clock.now() - started))
                tally.last_reason = f"{arrival.intent}: {result.reason or ''}"
            except StudioError as exc:
                tally.llm_failed.append(str(exc))
            finally:
                tally.llm_running -= 1
            return
        tally.images_waiting += 1
        try:
            images = await client.generate_image(_workflow(arrival), wait=True, timeout_s=600)
            if images and images[0].startswith(b"\x89PNG"):
                tally.images_done.append((arrival.family, desktop.clock.now() - started))
            else:
                tally.images_failed.append("the job's output is not a PNG")
        except StudioError as exc:
            tally.images_failed.append(str(exc))
        finally:
            tally.images_waiting -= 1

    await asyncio.gather(*(one(arrival) for arrival in arrivals))


def _summary(console: Console, tally: Tally, desktop: SimDesktop) -> None:
    table = Table(title="Summary (simulated seconds)", title_justify="left")
    for column in ("work", "done", "failed", "p50 s", "p95 s", "served by"):
        table.add_column(column, justify="right" if column not in ("work", "served by") else "left")
    for intent in ("auto:fast", "auto:quality"):
        rows = [(m, s) for i, m, s in tally.llm_done if i == intent]
        models: dict[str, int] = {}
        for model, _ in rows:
            models[model] = models.get(model, 0) + 1
        latencies = [s for _, s in rows]
        table.add_row(intent, str(len(rows)), "", f"{percentile(latencies, 50):.1f}",
                      f"{percentile(latencies, 95):.1f}",
                      ", ".join(f"{m} x{n}" for m, n in sorted(models.items())))  # fmt: skip
    for family in ("sdxl", "sd15"):
        times = [s for f, s in tally.images_done if f == family]
        table.add_row(f"{family} images", str(len(times)), "", f"{percentile(times, 50):.1f}",
                      f"{percentile(times, 95):.1f}", "ComfyUI")  # fmt: skip
    console.print(table)
    comfy, ollama = desktop.comfyui.stats, desktop.ollama.stats
    console.print(
        f"out-of-memory failures: {comfy.failed_oom}   CPU-spilled generations: "
        f"{ollama.spilled_generations}   low-VRAM image runs: {comfy.lowvram_runs}   "
        f"model loads: {ollama.loads + comfy.checkpoint_loads}   failed requests: "
        f"{len(tally.llm_failed) + len(tally.images_failed)}"
    )


def _picture(tally: Tally, budget_gib: float, total_gib: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t_s for s in tally.samples]
    fig, (memory, lanes) = plt.subplots(
        2, 1, figsize=(11, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]}
    )
    memory.stackplot(
        t,
        [s.desktop_gib for s in tally.samples],
        [s.ollama_gib for s in tally.samples],
        [s.comfyui_gib for s in tally.samples],
        labels=["desktop session", "Ollama (LLMs)", "ComfyUI (images)"],
        colors=["#9e9e9e", "#3f7fbf", "#e0823d"],
        alpha=0.9,
    )
    memory.axhline(total_gib, color="black", linewidth=1, label=f"card: {total_gib:.1f} GiB")
    memory.axhline(budget_gib, color="black", linestyle="--", linewidth=1,
                   label=f"controller budget: {budget_gib:.1f} GiB")  # fmt: skip
    memory.set_ylabel("GPU memory (GiB)")
    memory.set_ylim(0, total_gib * 1.08)
    memory.legend(loc="upper right", fontsize=8, ncols=2)
    memory.set_title("A busy hour on one RTX 4070 SUPER, scheduled by the controller")
    names = sorted({m for s in tally.samples for m in s.models})
    rows = [*names, "image job running", "LLM requests"]
    for row, name in enumerate(names):
        spans = [s.t_s for s in tally.samples if name in s.models]
        lanes.scatter(spans, [row] * len(spans), marker="s", s=6, color="#3f7fbf")
    image_t = [s.t_s for s in tally.samples if s.image_running]
    lanes.scatter(image_t, [len(names)] * len(image_t), marker="s", s=6, color="#e0823d")
    llm_t = [s.t_s for s in tally.samples if s.llm_running]
    lanes.scatter(llm_t, [len(names) + 1] * len(llm_t), marker="s", s=6, color="#4caf50")
    lanes.set_yticks(range(len(rows)), rows, fontsize=8)
    lanes.set_ylim(-0.7, len(rows) - 0.3)
    lanes.set_xlabel("simulated seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


Look = Callable[[SimulatedStack, str], Awaitable[None]]
"""Something done with the running stack and the dashboard's URL at a chosen simulated moment
(a screenshot)."""


async def _look_at(
    desktop: SimDesktop, t0: float, at_s: float, look: Look, stack: SimulatedStack, url: str
) -> None:
    await desktop.clock.sleep_until(t0 + at_s)
    await look(stack, url)


async def _hold(console: Console, url: str, hold_s: float) -> None:
    """Keep serving, in real time, for `hold_s` seconds: a wait off the loop is an executor
    job, during which virtual time stands still and the loop serves the dashboard."""
    console.print(f"the dashboard stays up for {hold_s:.0f} s at {url} (Ctrl-C ends it)")
    released = threading.Event()
    try:
        await asyncio.to_thread(released.wait, hold_s)
    finally:
        released.set()


async def run(
    console: Console,
    out_dir: Path,
    *,
    hold_s: float = 0.0,
    look: Look | None = None,
    look_at_s: float = 150.0,
) -> Path:
    """The busy hour; returns the picture's path. `look(stack, dashboard_url)` runs from
    `look_at_s` simulated seconds into it; simulated time stands still while a browser looks."""
    arrivals = busy_hour(span_s=300, llm_requests=30, sdxl_bursts=3, sdxl_per_burst=3, sd15_jobs=5)
    total_llm = sum(isinstance(a, LlmArrival) for a in arrivals)
    desktop = SimDesktop(data_dir=out_dir / "desktop")
    await desktop.start()
    tally = Tally()
    try:
        async with (
            simulated_stack(
                desktop,
                out_dir / "controller",
                token=TOKEN,
                # Production intervals; a quality request may wait out a burst of images.
                llm_wait_s=300.0,
            ) as stack,
            StudioClient(stack.controller.url, token=TOKEN, timeout_s=600) as client,
        ):
            console.print(
                f"controller {stack.controller.url} -> agent {stack.agent.url} -> simulated "
                f"desktop on virtual time: {total_llm} LLM requests and "
                f"{len(arrivals) - total_llm} image jobs over {arrivals[-1].at_s:.0f} s"
            )
            dashboard = f"{stack.controller.url}/dashboard/"
            console.print(f"live dashboard: [bold]{dashboard}[/] (token: {TOKEN})")
            t0 = desktop.clock.now()
            stop = asyncio.Event()
            sampler = asyncio.create_task(_sample(desktop, tally, t0, stop))
            replay = asyncio.create_task(_replay(client, desktop, arrivals, tally, t0))
            looking = (
                asyncio.create_task(_look_at(desktop, t0, look_at_s, look, stack, dashboard))
                if look is not None
                else None
            )
            with Live(console=console, refresh_per_second=4, transient=False) as live:
                while not replay.done():
                    live.update(_live_view(tally, total_llm, len(arrivals) - total_llm,
                                           desktop.clock.now() - t0))  # fmt: skip
                    await asyncio.wait({replay}, timeout=1.0)  # a simulated second
                live.update(_live_view(tally, total_llm, len(arrivals) - total_llm,
                                       desktop.clock.now() - t0))  # fmt: skip
            console.print()
            await replay
            if looking is not None:
                await looking
            if hold_s > 0:
                await _hold(console, dashboard, hold_s)
            stop.set()
            await sampler
            budget = desktop.gpu.total_bytes - stack.controller.engine.settings.reserve_bytes
    finally:
        await desktop.stop()
    _summary(console, tally, desktop)
    picture = out_dir / "gpu-timeline.png"
    _picture(tally, budget / GIB, desktop.gpu.total_bytes / GIB, picture)
    return picture


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controller.demo", description=__doc__)
    parser.add_argument(
        "--hold",
        type=float,
        default=0.0,
        metavar="S",
        help="keep the dashboard up S real seconds after the busy hour",
    )
    args = parser.parse_args(argv)
    console = Console()
    started = clock.perf_s()
    out_dir = Path(tempfile.mkdtemp(prefix="gpu-agent-demo-"))
    picture = run_virtual(run(console, out_dir, hold_s=args.hold))
    console.print(f"picture of the GPU over time: [bold]{picture}[/]")
    console.print(f"[dim]demo took {clock.perf_s() - started:.1f} s[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
