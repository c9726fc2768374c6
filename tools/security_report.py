"""`make security-report`: regenerate the table of SECURITY.md from the tests that try to break
the system and from the last load run (repository tooling, not part of either service).

It runs the fault and hostile-input test files that exist (`SUITES`; a file not written yet is
listed as missing) with `--junitxml`, reads every test's outcome from the XML and what it tried
from the test's docstring (its first paragraph; the test's name when it has none), reads
`out/load.json` when `make load` has written one and `out/chaos.json` when `make chaos` has, and
rewrites the part of SECURITY.md between
`<!-- report:start -->` and `<!-- report:end -->`. Everything outside the markers is left alone.

Exit status: 0 when every test that ran passed, 1 when one failed (the table is written either
way, showing which), 2 when SECURITY.md has no markers or pytest could not run.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
START = "<!-- report:start -->"
END = "<!-- report:end -->"

# (area shown in the table, test file): the tests whose subject is surviving faults and hostile
# input. Order here is the table's order.
SUITES: tuple[tuple[str, str], ...] = (
    ("agent faults", "tests/integration/test_agent_faults.py"),
    ("system faults", "tests/integration/test_system_faults.py"),
    ("controller restart", "tests/integration/test_controller_restart.py"),
    ("hostile input", "tests/integration/test_hostile_input.py"),
    ("API fuzzing", "tests/integration/test_api_fuzz.py"),
)
# pytest's exit statuses that still leave a usable report: all passed, some failed, none ran.
USABLE_EXIT = frozenset({0, 1, 5})
PYTEST_TIMEOUT_S = 1800
# A skip's or known defect's reason is quoted up to this length.
DETAIL_CHARS = 200


@dataclass(frozen=True, slots=True)
class TestRow:
    area: str
    name: str
    tried: str
    result: str
    seconds: float


# -- what each test tried -------------------------------------------------------------------------


def docstrings(path: Path) -> dict[str, str]:
    """First paragraph of each test's docstring, by `name` or `Class::name`, joined to one line."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: dict[str, str] = {}

    def visit(nodes: Sequence[ast.stmt], prefix: str) -> None:
        for node in nodes:
            if isinstance(node, ast.ClassDef):
                visit(node.body, f"{prefix}{node.name}::")
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                text = ast.get_docstring(node)
                if text:
                    paragraph = text.strip().split("\n\n", 1)[0]
                    found[prefix + node.name] = " ".join(paragraph.split())

    visit(tree.body, "")
    return found


def humanized(name: str) -> str:
    """`test_ollama_down_then_back[x]` -> "ollama down then back [x]": for tests without a
    docstring."""
    base, _, params = name.partition("[")
    words = base.removeprefix("test_").replace("_", " ")
    return f"{words} [{params}" if params else words


# -- the test run -----------------------------------------------------------------------------


def run_pytest(files: Sequence[str], junit: Path, extra: Sequence[str]) -> int:
    junit.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pytest", *files, f"--junitxml={junit}", "-q", *extra]
    print("running:", " ".join(command), flush=True)
    completed = subprocess.run(command, cwd=ROOT, check=False, timeout=PYTEST_TIMEOUT_S)
    return completed.returncode


def _outcome(case: ElementTree.Element) -> str:
    for tag, word in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
        child = case.find(tag)
        if child is not None:
            if child.get("type") == "pytest.xfail":
                # Marked as a known defect: it failed, as expected, and says why.
                word = "known defect (xfail)"
            detail = (child.get("message") or "").splitlines()
            return f"{word}: {detail[0][:DETAIL_CHARS]}" if tag == "skipped" and detail else word
    return "passed"


def read_junit(junit: Path, areas: Mapping[str, str]) -> list[TestRow]:
    """One row per test case; `areas` maps a test module (`tests.integration.x`) to its area."""
    rows: list[TestRow] = []
    texts: dict[str, dict[str, str]] = {}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        classname, name = case.get("classname", ""), case.get("name", "")
        module, cls = classname, ""
        while module and module not in areas:
            module, _, tail = module.rpartition(".")
            cls = f"{tail}::{cls}" if cls else tail
        if not module:
            continue
        if module not in texts:
            texts[module] = docstrings(ROOT / (module.replace(".", "/") + ".py"))
        key = cls + "::" + name.partition("[")[0] if cls else name.partition("[")[0]
        tried = texts[module].get(key) or humanized(name)
        params = name.partition("[")[2]
        if params and texts[module].get(key):
            tried += f" [{params}"
        rows.append(
            TestRow(areas[module], name, tried, _outcome(case), float(case.get("time") or 0.0))
        )
    return rows


# -- the markdown -----------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def tests_table(rows: Sequence[TestRow], missing: Sequence[tuple[str, str]]) -> list[str]:
    lines = ["| area | what was tried | result |", "|---|---|---|"]
    for row in rows:
        result = f"{row.result} ({row.seconds:.1f} s)" if row.result == "passed" else row.result
        lines.append(f"| {row.area} | {_cell(row.tried)} | {_cell(result)} |")
    for area, path in missing:
        lines.append(f"| {area} | `{path}` | not present in this checkout |")
    return lines


def load_table(figures: Mapping[str, Any]) -> list[str]:
    config, llm, images = figures["config"], figures["llm"], figures["images"]
    held, rss = figures["held_reasons"], figures["rss_mib"]
    claims = held["claims"]
    latency = llm["latency_s"]
    drain_s = images["drain_s"]
    drained = f"queue drained in {drain_s} s" if drain_s is not None else "queue not drained"
    lines = [
        f"Load held (`make load`, {figures['machine']['cpus']} CPUs, simulated desktop at "
        f"x{config['speed']:g}, written {figures['machine']['written_at']}; real seconds):",
        "",
        "| load | result |",
        "|---|---|",
        f"| {config['llm_requests']} streamed LLM requests at once "
        f"({', '.join(config['llm_models'])}) | {llm['completed']} completed, {llm['failed']} "
        f"failed, {llm['unanswered']} unanswered; p50 {latency['p50']} s, p95 {latency['p95']} s |",
        f"| {config['image_jobs']} image jobs queued at once "
        f"({', '.join(f'{n} {k}' for k, n in sorted(config['image_mix'].items()))}) | "
        f"{images['final']} final ({_states(images['states'])}), {images['not_final']} not "
        f"final, {images['refused']} refused; {drained} |",
    ]
    for name, figure in rss.items():
        lines.append(
            f"| {name} RSS | {figure['before']} MiB before, {figure['peak']} MiB peak, "
            f"{figure['after']} MiB after |"
        )
    lines.append(
        f"| held-job reasons checked against the fleet ({held['samples']} samples, "
        f"{held['held_jobs_seen']} held jobs seen) | {claims.get('true', 0)} true, "
        f"{claims.get('lagging', 0)} one pass behind, {claims.get('too new', 0)} written "
        f"between samples, {claims.get('false', 0)} false |"
    )
    if not figures.get("finished", False):
        lines.append("| run | stopped at its time limit before everything finished |")
    return lines


def chaos_table(figures: Mapping[str, Any]) -> list[str]:
    """The chaos day's outcome and its recovery times per fault kind."""
    config, total = figures["config"], figures["total"]
    seeds = len(figures["seeds"])
    faults = sum(total["faults"].values())
    foreign = figures.get("foreign_caused", {})
    lines = [
        f"Chaos day (`make chaos`: {seeds} seeds, {config['span_s'] / 3600:g} simulated hours "
        f"each at {config['faults_per_simulated_day']:g} faults a simulated day, every kind; "
        f"{config['wall_s']} s wall on {config['cpus']} CPUs):",
        "",
        "| promise | result |",
        "|---|---|",
        f"| faults injected | {faults} |",
        f"| accepted image jobs lost | {total['lost']} of {total['image_jobs']} |",
        f"| jobs with two successful prompts, or a prompt run twice | {total['doubled']} |",
        f"| LLM requests hung past their timeout | {total['hung']} of {total['llm_requests']} |",
        f"| out-of-memory failures and CPU spills by the controller's own decision | "
        f"{total['self_inflicted_oom']} and {total['self_inflicted_spill']} "
        f"({foreign.get('oom', 0)} and {foreign.get('spill', 0)} caused by foreign "
        f"allocations) |",
        f"| invariant violations | {len(total['violations'])} |",
        "",
        "| fault | count | recovery p50 (s) | p95 (s) | worst (s) |",
        "|---|---|---|---|---|",
    ]
    for kind, quantiles in sorted(total["recovery_s"].items()):
        lines.append(
            f"| {kind} | {total['faults'].get(kind, 0)} | {quantiles['p50']} | "
            f"{quantiles['p95']} | {quantiles['worst']} |"
        )
    return lines


def _states(states: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "none"


def report(
    rows: Sequence[TestRow],
    missing: Sequence[tuple[str, str]],
    load: Mapping[str, Any] | None,
    load_path: Path,
    chaos: Mapping[str, Any] | None = None,
    chaos_path: Path | None = None,
) -> str:
    counts: dict[str, int] = {}
    for row in rows:
        word = row.result.split(":", 1)[0]
        counts[word] = counts.get(word, 0) + 1
    summary = ", ".join(f"{n} {word}" for word, n in sorted(counts.items())) or "no tests ran"
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Generated by `make security-report` on {when}: {summary}.",
        "",
        *tests_table(rows, missing),
        "",
    ]
    if load is None:
        shown = load_path.relative_to(ROOT) if load_path.is_relative_to(ROOT) else load_path
        lines.append(f"No load figures: `{shown}` not found (run `make load` first).")
    else:
        lines += load_table(load)
    lines.append("")
    if chaos is None:
        shown = chaos_path or Path("out/chaos.json")
        if shown.is_relative_to(ROOT):
            shown = shown.relative_to(ROOT)
        lines.append(f"No chaos figures: `{shown}` not found (run `make chaos` first).")
    else:
        lines += chaos_table(chaos)
    return "\n".join(lines)


def rewrite(document: str, table: str) -> str:
    """`document` with everything between the markers replaced by `table`."""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(document):
        raise ValueError(f"no {START} ... {END} section")
    return pattern.sub(lambda _: f"{START}\n{table}\n{END}", document, count=1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="security-report", description=__doc__.split("\n")[0])
    parser.add_argument("--document", type=Path, default=ROOT / "SECURITY.md")
    parser.add_argument("--junit", type=Path, default=ROOT / "out" / "security-junit.xml")
    parser.add_argument("--load", type=Path, default=ROOT / "out" / "load.json")
    parser.add_argument("--chaos", type=Path, default=ROOT / "out" / "chaos.json")
    parser.add_argument(
        "--no-run", action="store_true", help="reuse the junit file instead of running pytest"
    )
    args, pytest_args = parser.parse_known_args(argv)
    present = [(area, path) for area, path in SUITES if (ROOT / path).is_file()]
    missing = [(area, path) for area, path in SUITES if not (ROOT / path).is_file()]
    for area, path in missing:
        print(f"{path} ({area}) is not present; listed as missing")
    status = 0
    if present and not args.no_run:
        status = run_pytest([path for _, path in present], args.junit, pytest_args)
        if status not in USABLE_EXIT:
            print(f"pytest exited with status {status}; SECURITY.md left as it was")
            return 2
    areas = {path.removesuffix(".py").replace("/", "."): area for area, path in present}
    rows = read_junit(args.junit, areas) if present and args.junit.is_file() else []
    load = json.loads(args.load.read_text(encoding="utf-8")) if args.load.is_file() else None
    chaos = json.loads(args.chaos.read_text(encoding="utf-8")) if args.chaos.is_file() else None
    try:
        updated = rewrite(
            args.document.read_text(encoding="utf-8"),
            report(rows, missing, load, args.load, chaos, args.chaos),
        )
    except (OSError, ValueError) as exc:
        print(f"cannot update {args.document}: {exc}")
        return 2
    args.document.write_text(updated, encoding="utf-8")
    print(
        f"{args.document}: {len(rows)} tests, load figures {'included' if load else 'absent'}, "
        f"chaos figures {'included' if chaos else 'absent'}"
    )
    failed = any(row.result in ("failed", "error") for row in rows)
    return 1 if failed or status == 1 else 0


if __name__ == "__main__":
    sys.exit(main())
