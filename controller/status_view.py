"""`gpu-controller status`: fetch the fleet view and print it as tables (adapter layer).

`fetch_fleet` is the one place where HTTP failures become the controller's error tree;
`render_fleet` only formats a validated `FleetInfo`, with rich when it is installed, else as plain
text (`Screen`).
"""

from __future__ import annotations

import httpx
from pydantic import ValidationError

from controller.errors import ControllerError
from controller.schema import AgentInfo, FleetInfo, JobStateName
from gpu_common.errors import Unauthorized
from gpu_common.tables import Column, Part, Screen, TextTable

GIB = 1024**3
# Error bodies are quoted into messages; a misbehaving server must not flood the terminal.
ERROR_TEXT_MAX = 200
# The order job counts are listed in; a state the controller adds later goes last.
JOB_STATE_ORDER: tuple[JobStateName, ...] = (
    "held",
    "dispatched",
    "running",
    "succeeded",
    "failed",
    "cancelled",
)


def fetch_fleet(url: str, *, token: str | None, timeout_s: float) -> FleetInfo:
    """GET `<url>/v1/fleet` and validate it.

    Raises `Unauthorized` when the controller refuses the token, `ControllerError` when it cannot
    be reached within `timeout_s`, answers anything but 200, or answers something not a fleet.
    """
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    endpoint = f"{url.rstrip('/')}/v1/fleet"
    try:
        response = httpx.get(endpoint, headers=headers, timeout=timeout_s)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise ControllerError(f"cannot reach the controller at {url}: {exc}") from exc
    if response.status_code == 401:
        hint = "refused the token" if token else "requires a token"
        raise Unauthorized(
            f"the controller at {url} {hint} (set GPU_CONTROLLER_TOKEN or use --token-file)"
        )
    if response.status_code != 200:
        raise ControllerError(
            f"the controller at {url} answered {response.status_code}: "
            f"{response.text[:ERROR_TEXT_MAX]}"
        )
    try:
        return FleetInfo.model_validate_json(response.content)
    except ValidationError as exc:
        raise ControllerError(
            f"the controller at {url} answered something that is not a fleet description "
            f"({exc.error_count()} problems, first: {exc.errors()[0]['msg']})"
        ) from exc


def _gib(value_bytes: int) -> str:
    return f"{value_bytes / GIB:.2f}"


def _health(agent: AgentInfo) -> Part:
    if agent.healthy:
        return ("healthy", "green")
    reason = agent.reason or ("not connected" if not agent.connected else "unhealthy")
    return (reason, "red")


def _gpu_memory(agent: AgentInfo) -> str:
    if not agent.gpus:
        return "-"
    used = sum(gpu.memory_used_bytes for gpu in agent.gpus)
    total = sum(gpu.memory_total_bytes for gpu in agent.gpus)
    return f"{_gib(used)}/{_gib(total)}"


def _ledger_free(agent: AgentInfo) -> str:
    text = _gib(agent.free_bytes)
    # Memory promised to loads and jobs that have not shown up on the GPU yet.
    if agent.pending_bytes:
        text += f" ({_gib(agent.pending_bytes)} pending)"
    return text


def _resident(agent: AgentInfo) -> str:
    if not agent.resident:
        return "-"
    return "\n".join(
        model.name + (" (CPU spill)" if model.offloaded else "") for model in agent.resident
    )


def _job_counts(counts: dict[str, int]) -> str:
    ordered: list[str] = [state for state in JOB_STATE_ORDER if state in counts]
    ordered += sorted(state for state in counts if state not in JOB_STATE_ORDER)
    return ", ".join(f"{state} {counts[state]}" for state in ordered) or "none"


def render_fleet(fleet: FleetInfo, screen: Screen | None = None) -> None:
    """Print the agents, the held image jobs with their reasons, and the job counts."""
    screen = screen or Screen()
    healthy = sum(1 for agent in fleet.agents if agent.healthy)
    screen.line(
        (f"{len(fleet.agents)} agents", "bold"),
        f", {healthy} healthy; jobs: {_job_counts(fleet.jobs_by_state)}",
    )

    # Two tables of at most six columns rather than one of nine, so both fit 80 columns.
    agents = TextTable.of(
        "Agents (memory in GiB)",
        Column("agent", no_wrap=True),
        "health",
        Column("age", no_wrap=True),
        Column("GPU used/total", no_wrap=True),
        "free in ledger",
        Column("draining", no_wrap=True),
    )
    for agent in fleet.agents:
        agents.add_row(
            agent.name,
            _health(agent),
            "-" if agent.age_s is None else f"{agent.age_s:.1f} s",
            _gpu_memory(agent),
            _ledger_free(agent),
            ("draining", "yellow") if agent.draining else "no",
        )
    screen.table(agents)

    work = TextTable.of(
        "Models and images",
        Column("agent", no_wrap=True),
        "resident models",
        Column("ComfyUI", no_wrap=True),
        "image running",
    )
    for agent in fleet.agents:
        work.add_row(
            agent.name,
            _resident(agent),
            agent.comfyui_connection or "-",
            agent.image_running or "-",
        )
    screen.table(work)

    if not fleet.held_jobs:
        screen.line("No held image jobs.")
        return
    held = TextTable.of(
        "Held image jobs",
        *(Column(header, no_wrap=True) for header in ("job", "waiting", "GiB", "family")),
        "reason",
    )
    for job in fleet.held_jobs:
        held.add_row(
            job.id,
            f"{job.waiting_s:.0f} s",
            "-" if job.vram_bytes is None else _gib(job.vram_bytes),
            job.family or "-",
            job.reason,
        )
    screen.table(held)
