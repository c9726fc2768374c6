"""`gpu-agent status`: fetch an agent's status and print it as tables (adapter layer).

The tables are drawn with rich when it is installed, else printed as plain text (`Screen`).
"""

from __future__ import annotations

import httpx
from pydantic import ValidationError

from gpu_agent.errors import GpuAgentError
from gpu_common.errors import Unauthorized
from gpu_common.schema import AgentStatus
from gpu_common.tables import Screen, TextTable

GIB = 1024**3


def fetch_status(url: str, *, token: str | None, timeout_s: float) -> AgentStatus:
    """GET `{url}/v1/status` (blocking). Raises `Unauthorized` on 401, else `GpuAgentError`."""
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


def render_status(status: AgentStatus, screen: Screen | None = None) -> None:
    """Print the status as a headline and tables (GPUs, Ollama, ComfyUI) to the screen."""
    screen = screen or Screen()
    tel = status.telemetry
    age = f"{tel.age_s:.1f} s old" if tel.age_s is not None else "no sample"
    reason = f" ({tel.reason})" if tel.reason else ""
    screen.line(
        (status.agent, "bold"),
        f" agent {status.version}; telemetry {tel.status}{reason}, {age}",
    )
    # Names go on their own lines: as a table column they would wrap in 80 columns.
    for gpu in tel.gpus:
        driver = f", driver {tel.driver_version}" if tel.driver_version else ""
        screen.line(f"GPU {gpu.index}: ", (gpu.name, "bold"), f" ({tel.backend}{driver})")
    gpus = TextTable.of(
        "GPU memory (GiB) and load",
        *("#", "used", "total", "ollama", "comfyui", "other", "util", "temp", "power"),
    )
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
    screen.table(gpus)
    ollama = status.ollama
    state = f"up {ollama.version or ''}" if ollama.reachable else f"DOWN: {ollama.error or '?'}"
    models = TextTable.of(
        f"Ollama ({state})", "model", "size GiB", "on GPU GiB", "context", "in flight", "expires"
    )
    for model in ollama.resident:
        models.add_row(
            model.name,
            _gib(model.size_bytes),
            _gib(model.vram_bytes) + (" (CPU spill)" if model.offloaded else ""),
            _opt(model.context_length),
            str(model.in_flight),
            model.expires_at.isoformat(timespec="seconds") if model.expires_at else "-",
        )
    screen.table(models)
    comfy = status.comfyui
    screen.line(
        f"ComfyUI: {'up' if comfy.reachable else 'DOWN'} via {comfy.connection}; "
        f"queue {comfy.queue_running} running, {comfy.queue_pending} pending"
    )
    if comfy.prompts:
        prompts = TextTable.of("Prompts", "id", "state", "progress", "reason")
        for prompt in comfy.prompts[-10:]:
            progress = (
                f"{prompt.step}/{prompt.steps}"
                if prompt.steps
                else f"{prompt.nodes_done}/{prompt.nodes_total}"
            )
            prompts.add_row(prompt.prompt_id[:8], prompt.state, progress, prompt.reason or "")
        screen.table(prompts)
