"""`gpu-agent status`: fetch an agent's status and print it as tables (adapter layer)."""

from __future__ import annotations

import httpx
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gpu_agent.errors import GpuAgentError
from gpu_common.errors import Unauthorized
from gpu_common.schema import AgentStatus

GIB = 1024**3


def fetch_status(url: str, *, token: str | None, timeout_s: float) -> AgentStatus:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(f"{url.rstrip('/')}/v1/status", headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise GpuAgentError(f"cannot reach the agent at {url}: {exc}") from exc
    if response.status_code == 401:
        raise Unauthorized("the agent refused the token (set GPU_AGENT_TOKEN or --token-file)")
    if response.status_code != 200:
        raise GpuAgentError(f"the agent answered {response.status_code}: {response.text[:200]}")
    try:
        return AgentStatus.model_validate_json(response.content)
    except ValidationError as exc:
        raise GpuAgentError(
            f"the agent at {url} sent a status this version cannot read: {exc}"
        ) from exc


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def _opt(value: object, unit: str = "") -> str:
    return "-" if value is None else f"{value}{unit}"


def render_status(status: AgentStatus, console: Console | None = None) -> None:
    console = console or Console()
    tel = status.telemetry
    age = f"{tel.age_s:.1f} s old" if tel.age_s is not None else "no sample"
    reason = f" ({tel.reason})" if tel.reason else ""
    console.print(
        f"[bold]{escape(status.agent)}[/] agent {status.version}; "
        f"telemetry {tel.status}{escape(reason)}, {age}"
    )
    # Names go on their own lines: as a table column they would wrap in 80 columns.
    for gpu in tel.gpus:
        driver = f", driver {tel.driver_version}" if tel.driver_version else ""
        console.print(f"GPU {gpu.index}: [bold]{escape(gpu.name)}[/] ({tel.backend}{driver})")
    gpus = Table(title="GPU memory (GiB) and load", title_justify="left")
    for column in ("#", "used", "total", "ollama", "comfyui", "other", "util", "temp", "power"):
        gpus.add_column(column)
    for gpu in tel.gpus:
        owners = gpu.memory_by_owner_bytes
        gpus.add_row(
            str(gpu.index),
            _gib(gpu.memory_used_bytes),
            _gib(gpu.memory_total_bytes),
            _gib(owners.get("ollama", 0)),
            _gib(owners.get("comfyui", 0)),
            _gib(owners.get("other", 0)),
            _opt(gpu.utilization_gpu_percent, " %"),
            _opt(gpu.temperature_c, " °C"),
            "-" if gpu.power_w is None else f"{gpu.power_w:.0f}/{gpu.power_limit_w or 0:.0f} W",
        )
    console.print(gpus)
    ollama = status.ollama
    state = f"up {ollama.version or ''}" if ollama.reachable else f"DOWN: {ollama.error or '?'}"
    models = Table(title=f"Ollama ({escape(state)})", title_justify="left")
    for column in ("model", "size GiB", "on GPU GiB", "context", "in flight", "expires"):
        models.add_column(column)
    for model in ollama.resident:
        models.add_row(
            model.name,
            _gib(model.size_bytes),
            _gib(model.vram_bytes) + (" (CPU spill)" if model.offloaded else ""),
            _opt(model.context_length),
            str(model.in_flight),
            model.expires_at.isoformat(timespec="seconds") if model.expires_at else "-",
        )
    console.print(models)
    comfy = status.comfyui
    console.print(
        f"ComfyUI: {'up' if comfy.reachable else 'DOWN'} via {comfy.connection}; "
        f"queue {comfy.queue_running} running, {comfy.queue_pending} pending"
    )
    if comfy.prompts:
        prompts = Table(title="Prompts", title_justify="left")
        for column in ("id", "state", "progress", "reason"):
            prompts.add_column(column)
        for prompt in comfy.prompts[-10:]:
            progress = (
                f"{prompt.step}/{prompt.steps}"
                if prompt.steps
                else f"{prompt.nodes_done}/{prompt.nodes_total}"
            )
            prompts.add_row(prompt.prompt_id[:8], prompt.state, progress, prompt.reason or "")
        console.print(prompts)
