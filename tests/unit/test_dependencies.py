"""The daemons run without the `report` extra (rich, matplotlib), and `status` still prints.

rich and matplotlib draw the demos' and the benchmarks' tables and charts. A daemon loading them
would pay their memory and start-up time for nothing, and would fail where only the daemon's own
dependencies are installed.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from controller.status_view import render_fleet
from gpu_agent.status_view import render_status
from gpu_common.schema import AgentStatus
from gpu_common.tables import Column, Screen, TextTable, plain_table
from tests.integration.test_agent_link import make_status
from tests.unit.test_controller_cli import HELD_REASON, canned_fleet

REPO = Path(__file__).resolve().parents[2]
REPORT_PACKAGES = ("rich", "matplotlib")
WORKFLOW_PACKAGES = ("celery", "redis")
# What neither daemon may import: each comes with an extra.
OPTIONAL_PACKAGES = (*REPORT_PACKAGES, *WORKFLOW_PACKAGES)
IMPORT_TIMEOUT_S = 50.0
# What each daemon's process imports: its entry point first (as `gpu-agent run` does), then the
# modules it loads on the way to serving, the `status` view included.
DAEMON_MODULES = {
    "agent": (
        "gpu_agent.cli",
        "gpu_agent.daemon",
        "gpu_agent.gpu.nvml",
        "gpu_agent.sim.desktop",
        "gpu_agent.status_view",
    ),
    "controller": ("controller.cli", "controller.daemon", "controller.status_view"),
}


@pytest.mark.parametrize("daemon", DAEMON_MODULES)
def test_daemon_imports_no_optional_package(daemon: str) -> None:
    code = (
        "import sys\n"
        f"import {', '.join(DAEMON_MODULES[daemon])}\n"
        f"print(*sorted({{name.split('.')[0] for name in sys.modules}} & {set(OPTIONAL_PACKAGES)}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=IMPORT_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [], f"the {daemon} imports {result.stdout.strip()}"


def _names(requirements: list[str]) -> set[str]:
    return {
        re.split(r"[\s\[<>=~!;]", requirement, maxsplit=1)[0].lower()
        for requirement in requirements
    }


def test_report_and_workflow_packages_are_extras() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    assert not _names(project["dependencies"]) & set(OPTIONAL_PACKAGES)
    assert set(REPORT_PACKAGES) <= _names(extras["report"])
    assert set(WORKFLOW_PACKAGES) <= _names(extras["workflows"])
    # `make test` type-checks and tests the demos, the benchmarks and the workflows.
    assert "gpu-agent[report,workflows]" in extras["dev"]


def _agent_status() -> AgentStatus:
    """An agent with one GPU and two resident models, one of them spilling onto the CPU."""
    desktop = canned_fleet().agents[0]
    status = make_status()
    telemetry = status.telemetry.model_copy(update={"gpus": desktop.gpus})
    ollama = status.ollama.model_copy(update={"resident": desktop.resident})
    return status.model_copy(update={"telemetry": telemetry, "ollama": ollama})


def _without_rich(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry makes `import` fail as if the package were not installed.
    for name in ("rich", "rich.console"):
        monkeypatch.setitem(sys.modules, name, None)


def test_agent_status_prints_plain_text_without_rich(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _without_rich(monkeypatch)
    screen = Screen()
    assert screen.plain
    render_status(_agent_status(), screen)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("fake agent 0; telemetry ok")
    assert "GPU 0: NVIDIA GeForce RTX 4070 SUPER (fake)" in lines
    assert "Ollama (up 0)" in lines
    header = next(line for line in lines if line.startswith("model "))
    spilled = next(line for line in lines if line.startswith("qwen2.5:14b"))
    # Columns line up: each cell starts under its header.
    assert spilled.index("5.00 (CPU spill)") == header.index("on GPU GiB")
    assert lines[-1] == "ComfyUI: up via websocket; queue 0 running, 0 pending"


def test_fleet_status_prints_plain_text_without_rich(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _without_rich(monkeypatch)
    render_fleet(canned_fleet())
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "2 agents, 1 healthy; jobs: held 1, running 1, succeeded 7"
    desktop1 = next(line for line in lines if line.startswith("desktop1") and "healthy" in line)
    assert desktop1.split()[-1] == "draining"
    assert "telemetry 42 s old" in out
    # The second resident model goes on its own line, under the first.
    first = next(line for line in lines if "qwen2.5:7b" in line and "desktop1" in line)
    second = next(line for line in lines if "qwen2.5:14b (CPU spill)" in line)
    assert second.index("qwen2.5:14b") == first.index("qwen2.5:7b")
    assert HELD_REASON in out
    assert "[" not in out  # no rich markup left in the text


def test_plain_table_aligns_columns() -> None:
    table = TextTable.of("Title", Column("name", no_wrap=True), "value")
    table.add_row("a", ("1", "bold"))
    table.add_row("longer\nsecond", "22")
    assert plain_table(table) == [
        "Title",
        "name    value",
        "------  -----",
        "a       1",
        "longer  22",
        "second",
    ]
    with pytest.raises(ValueError, match="1 cells for 2 columns"):
        table.add_row("only one")


def test_rich_draws_the_same_rows(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("rich")
    screen = Screen()
    assert not screen.plain
    table = TextTable.of("Agents [GiB]", "agent", "health")
    table.add_row("[bold]desk[/]", ("healthy", "green"))
    screen.table(table)
    out = capsys.readouterr().out
    # Text is never read as markup: brackets in names come out as they went in.
    assert "Agents [GiB]" in out
    assert "[bold]desk[/]" in out
    assert "healthy" in out
