"""Time has one source: the running loop's clock, read through `gpu_common.clock`.

Walks every module of `gpu_agent` and `controller` (the simulator included) and fails on a
direct read of the process clocks, naming the file and line. Only the seam itself may read them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import controller
import gpu_agent

SEAM = Path(gpu_agent.__file__).parent / "clock.py"
# (module, attribute) pairs that read a process clock behind the loop's back.
FORBIDDEN = {
    ("time", "monotonic"),
    ("time", "monotonic_ns"),
    ("time", "time"),
    ("time", "time_ns"),
    ("time", "perf_counter"),
    ("time", "perf_counter_ns"),
    ("time", "sleep"),
    ("datetime", "now"),
    ("datetime", "utcnow"),
    ("datetime", "today"),
    ("date", "today"),
}


def _sources() -> list[Path]:
    roots = [Path(gpu_agent.__file__).parent, Path(controller.__file__).parent]
    return sorted(p for root in roots for p in root.rglob("*.py") if p != SEAM)


def _clock_reads(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in FORBIDDEN:
                found.append(f"{path}:{node.lineno}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module in {"time", "datetime"}:
            for alias in node.names:
                if (node.module, alias.name) in FORBIDDEN:
                    found.append(f"{path}:{node.lineno}: from {node.module} import {alias.name}")
    return found


def test_the_walk_covers_the_simulator_and_both_services() -> None:
    names = {p.name for p in _sources()}
    assert {"service.py", "engine.py", "ollama_scheduler.py", "telemetry.py"} <= names


def test_no_module_reads_a_process_clock_outside_the_seam() -> None:
    reads = [read for path in _sources() for read in _clock_reads(path)]
    assert not reads, "read time through gpu_common.clock instead:\n" + "\n".join(reads)


def test_the_walk_would_catch_a_direct_read(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import time\nfrom datetime import datetime\nfrom time import perf_counter\n"
        "a = time.monotonic()\nb = datetime.now()\n"
    )
    assert [r.split(": ", 1)[1] for r in _clock_reads(sample)] == [
        "from time import perf_counter",
        "time.monotonic",
        "datetime.now",
    ]
