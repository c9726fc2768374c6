"""Printing benchmark tables and merging figures into out/bench.json."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from gpu_common.stats import percentile

__all__ = ["RESULTS", "percentile", "record", "table"]

OUT_DIR = Path(os.environ.get("BENCH_OUT", "out"))
RESULTS = OUT_DIR / "bench.json"


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print one table of results."""
    shown = Table(title=title, title_justify="left")
    for column in columns:
        shown.add_column(column, justify="right" if column != columns[0] else "left")
    for row in rows:
        shown.add_row(*(_cell(value) for value in row))
    Console(width=max(100, Console().width)).print(shown)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def record(section: str, figures: dict[str, Any]) -> None:
    """Store `figures` under `section` in out/bench.json, keeping the other sections."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {}
    if RESULTS.exists():
        data = json.loads(RESULTS.read_text())
    data[section] = figures
    data["machine"] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    RESULTS.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
