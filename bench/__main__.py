"""`make bench`: every benchmark in turn; together they write out/bench.json.

Run one alone with `python -m bench scheduling` (or overhead, footprint, decisions, workflows).
`python -m bench chaos [options]` runs the chaos day (`make chaos`), which `make bench` leaves
out: it takes minutes of its own and writes out/chaos.json.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import Callable
from typing import Any

from bench import chaos, decisions, footprint, overhead, scheduling, workflows
from bench.report import RESULTS

BENCHMARKS: dict[str, Callable[[], Any]] = {
    "decisions": decisions.run,
    "scheduling": scheduling.run,
    "overhead": overhead.run,
    "footprint": footprint.run,
    "workflows": workflows.run,
}


def main(argv: list[str]) -> int:
    if argv[:1] == ["chaos"]:
        return chaos.run(argv[1:])
    chosen = argv or list(BENCHMARKS)
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        known = ", ".join([*BENCHMARKS, "chaos"])
        print(f"unknown benchmark(s): {', '.join(unknown)}; choose from {known}")
        return 2
    for name in chosen:
        print(f"\n== {name} ==", flush=True)
        result = BENCHMARKS[name]()
        if inspect.iscoroutine(result):
            asyncio.run(result)
    print(f"\nfigures written to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
