"""A short scripted exchange with the simulated desktop, through the agent (`make demo`).

It first reproduces the studio's trouble (Ollama and ComfyUI colliding on one 12 GB card), then
does the same work through the agent, which unloads and frees memory and confirms it on the GPU
before the next job starts.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from gpu_agent.daemon import running_agent
from gpu_agent.settings import AgentSettings
from gpu_agent.sim.desktop import SimDesktop
from gpu_agent.sim.workflows import SDXL, text_to_image
from gpu_agent.status_view import render_status
from gpu_common import clock
from gpu_common.tables import Screen
from gpu_common.virtual_time import run_virtual

GIB = 1024**3
POLL_S = 0.05
JOB_TIMEOUT_S = 30.0


def sdxl_workflow(prefix: str) -> dict[str, Any]:
    return text_to_image(SDXL, text="studio logo", seed=7, prefix=prefix)


async def wait_prompt(agent: httpx.AsyncClient, prompt_id: str) -> dict[str, Any]:
    deadline = clock.monotonic_s() + JOB_TIMEOUT_S
    while clock.monotonic_s() < deadline:
        info: dict[str, Any] = (await agent.get(f"/v1/comfyui/prompts/{prompt_id}")).json()
        if info["state"] not in ("pending", "running"):
            return info
        await asyncio.sleep(POLL_S)
    raise TimeoutError(f"prompt {prompt_id} did not finish in {JOB_TIMEOUT_S} s")


async def status(agent: httpx.AsyncClient, console: Console) -> None:
    from gpu_common.schema import AgentStatus

    current = AgentStatus.model_validate_json((await agent.get("/v1/status")).content)
    render_status(current, Screen(console=console))


async def run(console: Console, out_dir: Path) -> None:
    desktop = SimDesktop(data_dir=out_dir)
    await desktop.start()
    settings = AgentSettings(port=0, simulate=True, sample_interval_s=0.1, token="demo-token")
    try:
        async with running_agent(settings, desktop) as running:
            headers = {"Authorization": "Bearer demo-token"}
            async with (
                httpx.AsyncClient(base_url=running.url, headers=headers, timeout=60) as agent,
                httpx.AsyncClient(base_url=desktop.ollama_url, timeout=60) as ollama,
            ):
                console.rule("The desktop: one RTX 4070 SUPER, Ollama and ComfyUI side by side")
                await status(agent, console)

                console.rule("1. Without coordination")
                console.print("Ollama loads qwen2.5:14b (10 GiB) for a chat ...")
                await ollama.post("/api/generate", json={"model": "qwen2.5:14b", "prompt": ""})
                console.print("... and an SDXL job arrives at ComfyUI:")
                answer = await agent.post(
                    "/v1/comfyui/prompts", json={"workflow": sdxl_workflow("collision")}
                )
                info = await wait_prompt(agent, answer.json()["prompt_id"])
                console.print(f"  ComfyUI: [bold red]{info['state']}[/] ({info['reason']})")
                console.print(f"  [dim]{(info['error'] or '')[:150]}[/]")

                console.rule("2. Through the agent")
                unload = (
                    await agent.post("/v1/ollama/unload", json={"model": "qwen2.5:14b"})
                ).json()
                console.print(
                    f"agent unloads qwen2.5:14b: {unload['freed_bytes'] / GIB:.1f} GiB back, "
                    f"confirmed by {unload['confirmed_by']} after {unload['wait_s']:.1f} s"
                )
                answer = await agent.post(
                    "/v1/comfyui/prompts", json={"workflow": sdxl_workflow("studio")}
                )
                info = await wait_prompt(agent, answer.json()["prompt_id"])
                image = desktop.comfyui.output_dir / info["outputs"][0]["filename"]
                console.print(f"  SDXL job: [bold green]{info['state']}[/], image {image}")
                freed = (await agent.post("/v1/comfyui/free", json={})).json()
                console.print(
                    f"agent frees ComfyUI's cache: {freed['freed_bytes'] / GIB:.1f} GiB back "
                    f"after {freed['wait_s']:.1f} s (ComfyUI applies /free between prompts)"
                )
                load = (await agent.post("/v1/ollama/load", json={"model": "qwen2.5:14b"})).json()
                spill = (
                    "fully on the GPU" if load["vram_bytes"] >= load["size_bytes"] else "SPILLED"
                )
                console.print(
                    f"agent loads qwen2.5:14b in {load['load_time_s']:.1f} s: "
                    f"{load['vram_bytes'] / GIB:.1f} GiB, {spill}"
                )
                await status(agent, console)
    finally:
        await desktop.stop()


def main() -> int:
    console = Console()
    out_dir = Path(tempfile.mkdtemp(prefix="gpu-agent-demo-"))
    started = clock.perf_s()
    try:
        run_virtual(run(console, out_dir / "desktop"))
    finally:
        console.print(f"[dim]demo took {clock.perf_s() - started:.1f} s[/]")
        if "--clean" in sys.argv:
            shutil.rmtree(out_dir, ignore_errors=True)
        else:
            console.print(f"[dim]images are in {out_dir}[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
