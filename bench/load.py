"""`make load`: the whole stack under a burst, with the controller and the agent in processes of
their own (benchmark layer).

What it does, on the simulated desktop at `LOAD_SPEED` (default x50):

- starts `gpu-agent run` (with its in-process simulated desktop: its RSS includes the emulated
  Ollama and ComfyUI) and `gpu-controller run`, each configured by a TOML file;
- submits `IMAGE_JOBS` image jobs through the controller (mostly the weightless blank image,
  some SD1.5 and SDXL) and, at the same moment, opens `LLM_REQUESTS` streamed generations at
  once (mixed intents and model names), every one through `controller.client.StudioClient`;
- samples both processes' RSS (psutil) before, throughout and after, and `/v1/fleet` every
  `FLEET_SAMPLE_S`: each held job's reason is split into its claims and each claim is checked
  against the same snapshot (a job named as running is the one running; "Y GB free" is the
  ledger's free memory; a model named busy is resident with requests in flight);
- waits until every request has its answer and every job a final state, then checks each job.

A claim that was true at the previous snapshot, or names a job that ended within
`LAG_GRACE_S`, counts as "lagging": reasons are rewritten once per planning pass, so they may
trail the fleet view by one pass. Anything else counts as false and is printed.

It prints a table and writes `out/load.json`. The whole run is bounded by `RUN_LIMIT_S`; what
has not finished by then is counted as unanswered, and the processes are stopped either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import re
import secrets
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil  # type: ignore[import-untyped]  # no stubs in the dev dependencies

from bench.footprint import ChildGroup, spawn, wait_healthy
from bench.report import OUT_DIR, percentile, table
from controller.client import StudioBusy, StudioClient, StudioError
from gpu_agent.sim.workflows import SD15, SDXL, blank_image, text_to_image

SPEED = float(os.environ.get("LOAD_SPEED", "50"))
LLM_REQUESTS = int(os.environ.get("LOAD_LLM_REQUESTS", "500"))
IMAGE_JOBS = int(os.environ.get("LOAD_IMAGE_JOBS", "1000"))
# Of the image jobs, every SD15_EVERY-th is SD1.5 and every SDXL_EVERY-th SDXL; the rest blank.
SD15_EVERY = 40
SDXL_EVERY = 100
# Intents and names the LLM requests cycle through.
LLM_MODELS = ("auto:fast", "auto:quality", "auto", "llama3.2:3b", "qwen2.5:7b", "qwen2.5:14b")
OUTPUT_TOKENS = (16, 32, 48, 64)
AGENT_NAME = "desk"
# Everything, start to stop, stays under ten minutes on a 2-core machine.
RUN_LIMIT_S = float(os.environ.get("LOAD_LIMIT_S", "480"))
# After the limit: the longest the final look at every job may take.
STATES_LIMIT_S = 45.0
# One streamed generation's limit from sending to its last line (queueing included).
LLM_DEADLINE_S = 420.0
# The client's wait for any one answer or piece of a stream.
CLIENT_TIMEOUT_S = 300.0
SUBMIT_CONCURRENCY = 16
CHECK_CONCURRENCY = 16
RSS_SAMPLE_S = 0.25
FLEET_SAMPLE_S = 0.5
LAG_GRACE_S = 2.0
# "Y GB free" is printed with one decimal.
GB = 1e9
GB_ROUNDING = 0.05 + 1e-9
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
RESULT_FILE = OUT_DIR / "load.json"
FALSE_EXAMPLES_KEPT = 8


# -- configuration of the two processes -----------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_toml(path: Path, values: Mapping[str, Any], tables: Mapping[str, Sequence[Any]]) -> Path:
    """A flat TOML file with `[[name]]` arrays of tables; enough for the two settings files."""
    lines = [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    for name, rows in tables.items():
        for row in rows:
            lines += ["", f"[[{name}]]"] + [f"{k} = {_toml_value(v)}" for k, v in row.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


def agent_config(folder: Path, token: str) -> Path:
    return write_toml(
        folder / "agent.toml",
        {
            "port": 0,
            "token": token,
            "simulate": True,
            "sim_speed": SPEED,
            "sample_interval_s": 0.05,
            "data_dir": str(folder / "agent"),
            "log_level": "WARNING",
        },
        {},
    )


def controller_config(folder: Path, token: str, agent_url: str, agent_token: str) -> Path:
    return write_toml(
        folder / "controller.toml",
        {
            "port": 0,
            "token": token,
            "data_dir": str(folder / "controller"),
            "tick_interval_s": 0.05,
            # Long enough that every request queues for capacity rather than being refused.
            "llm_wait_s": LLM_DEADLINE_S,
            "request_timeout_s": 60.0,
            # The controller's clock is real time; policy times are simulated seconds.
            "min_residency_s": 30.0 / SPEED,
            "max_hold_s": 60.0 / SPEED,
            "image_yield_s": 20.0 / SPEED,
            "log_level": "WARNING",
        },
        {"agents": [{"name": AGENT_NAME, "url": agent_url, "token": agent_token}]},
    )


# -- resident memory --------------------------------------------------------------------------


@dataclass
class RssTrack:
    """Resident set size (bytes) of one process: before the load, its peak, after."""

    before: int = 0
    peak: int = 0
    after: int = 0


async def track_rss(
    pids: Mapping[str, int], tracks: dict[str, RssTrack], stop: asyncio.Event
) -> None:
    processes = {name: psutil.Process(pid) for name, pid in pids.items()}
    while not stop.is_set():
        for name, process in processes.items():
            with contextlib.suppress(psutil.Error):
                tracks[name].peak = max(tracks[name].peak, int(process.memory_info().rss))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RSS_SAMPLE_S):
                await stop.wait()


def rss_now(pids: Mapping[str, int]) -> dict[str, int]:
    return {name: int(psutil.Process(pid).memory_info().rss) for name, pid in pids.items()}


# -- LLM requests ------------------------------------------------------------------------------


@dataclass
class LlmResult:
    model: str
    started_s: float
    headers_s: float | None = None
    ended_s: float | None = None
    outcome: str = "unanswered"
    served_by: str | None = None


@dataclass
class LlmLoad:
    """Every request's result; `waiting` holds those not yet answered with a first line."""

    results: list[LlmResult] = field(default_factory=list)
    waiting: set[int] = field(default_factory=set)

    def longest_wait_s(self, now_s: float) -> float:
        return max((now_s - self.results[i].started_s for i in self.waiting), default=0.0)


async def one_generation(studio: StudioClient, load: LlmLoad, index: int) -> None:
    model = LLM_MODELS[index % len(LLM_MODELS)]
    result = LlmResult(model=model, started_s=time.monotonic())
    slot = len(load.results)
    load.results.append(result)
    load.waiting.add(slot)
    options = {"num_predict": OUTPUT_TOKENS[index % len(OUTPUT_TOKENS)], "seed": index}
    try:
        async with asyncio.timeout(LLM_DEADLINE_S):
            stream = studio.generate_stream(
                f"Request {index}: name three colours of a lighthouse.",
                model=model,
                options=options,
            )
            async with contextlib.aclosing(stream) as chunks:
                async for chunk in chunks:
                    if result.headers_s is None:
                        result.headers_s = time.monotonic()
                        load.waiting.discard(slot)
                    if chunk.final is not None:
                        result.served_by = chunk.final.model
        result.outcome = "ok" if result.served_by is not None else "no final line"
    except StudioBusy:
        result.outcome = "503 busy"
    except StudioError as exc:
        result.outcome = type(exc).__name__
    except TimeoutError:
        result.outcome = "unanswered"
    finally:
        result.ended_s = time.monotonic()
        load.waiting.discard(slot)


# -- image jobs --------------------------------------------------------------------------------


def workflow_for(index: int) -> tuple[str, dict[str, Any]]:
    if index % SDXL_EVERY == SDXL_EVERY - 1:
        return "sdxl", text_to_image(SDXL, seed=index, prefix="load")
    if index % SD15_EVERY == SD15_EVERY - 1:
        return "sd15", text_to_image(SD15, width=512, height=512, seed=index, prefix="load")
    return "blank", blank_image(prefix="load")


@dataclass
class ImageLoad:
    job_ids: list[str] = field(default_factory=list)
    families: dict[str, str] = field(default_factory=dict)
    refused: int = 0
    submitted_at_s: float = 0.0
    all_submitted: asyncio.Event = field(default_factory=asyncio.Event)


async def submit_images(studio: StudioClient, load: ImageLoad, count: int) -> None:
    load.submitted_at_s = time.monotonic()
    gate = asyncio.Semaphore(SUBMIT_CONCURRENCY)

    async def one(index: int) -> None:
        family, workflow = workflow_for(index)
        async with gate:
            try:
                job = await studio.generate_image(workflow)
            except StudioError:
                load.refused += 1
                return
        load.job_ids.append(job.id)
        load.families[job.id] = family

    try:
        await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        load.all_submitted.set()


# -- checking held reasons ----------------------------------------------------------------------

_BUSY = re.compile(r"^(?:(?P<agent>\S+) busy with image job|image job) (?P<job>\S+)(?: running)?$")
_NEEDS_FREE = re.compile(
    r"^(?:\S+: )?needs (?P<need>[\d.]+) GB, (?P<free>[\d.]+) GB free(?: on \S+)?$"
)
_OVER_BUDGET = re.compile(
    r"^needs (?P<need>[\d.]+) GB, more than \S+'s (?P<budget>[\d.]+) GB budget$"
)
_MODEL_BUSY = re.compile(r"^(?P<model>\S+) busy$")
_MODEL_QUEUED = re.compile(r"^(?P<model>\S+) has queued requests$")
_MODEL_YOUNG = re.compile(r"^(?P<model>\S+) loaded \d+ s ago$")
_LLM_FIRST = re.compile(r"^an LLM request has waited (?P<s>\d+) s for room; it goes first$")
_DRAIN = re.compile(r"^waited \d+ s, so (?P<agent>\S+) starts no new LLM loads$")
_RETRY = re.compile(r".*; will retry$")
_UNHEALTHY = re.compile(
    r"^(?P<agent>\S+) (?:unhealthy|.*stale.*|.*disconnected.*|.*unreachable.*)$"
)
INITIAL_REASON = "waiting for GPU memory"


def claims(reason: str) -> list[str]:
    """A held reason split into its claims: `; ` joins reasons, `, ` the parts of one."""
    if _LLM_FIRST.match(reason) or _RETRY.match(reason):
        return [reason]
    parts: list[str] = []
    for piece in reason.split("; "):
        # "needs X GB, Y GB free" is one claim; what follows its second comma are more.
        pieces = piece.split(", ")
        if len(pieces) >= 2 and pieces[0].startswith(("needs ", f"{AGENT_NAME}: needs ")):
            parts.append(", ".join(pieces[:2]))
            parts += pieces[2:]
        else:
            parts.append(piece)
    return parts


@dataclass
class Snapshot:
    """What `/v1/fleet` said at one moment, and what our own client knew then."""

    at_wall: datetime
    fleet: dict[str, Any]
    llm_waiting: int
    llm_longest_wait_s: float

    @property
    def agent(self) -> dict[str, Any]:
        agent: dict[str, Any] = self.fleet["agents"][0]
        return agent

    def resident(self) -> dict[str, dict[str, Any]]:
        return {m["name"]: m for m in self.agent["resident"]}


def judge(claim: str, now: Snapshot, job_states: Mapping[str, tuple[str, datetime]]) -> str | None:
    """True-now verdict of one claim against the snapshot it was seen in: "true", "false", or
    None when it needs the named job's state (`job_states` lacks it)."""
    agent = now.agent
    if claim == INITIAL_REASON:
        return "true"  # the reason of a job not yet planned; checked by its age elsewhere
    if match := _BUSY.match(claim):
        job_id = match["job"]
        if agent["image_running"] == job_id:
            return "true"
        if job_id not in job_states:
            return None
        state, updated = job_states[job_id]
        if state in ("dispatched", "running"):
            return "true"
        ended_ago_s = (now.at_wall - updated).total_seconds()
        return "lagging" if state in FINAL_STATES and ended_ago_s <= LAG_GRACE_S else "false"
    if match := _NEEDS_FREE.match(claim):
        need, free = float(match["need"]), float(match["free"])
        ledger_free = max(0, agent["free_bytes"]) / GB
        return "true" if abs(ledger_free - free) <= GB_ROUNDING and need > free else "false"
    if match := _OVER_BUDGET.match(claim):
        budget = agent["budget_bytes"] / GB
        ok = abs(budget - float(match["budget"])) <= GB_ROUNDING and float(match["need"]) > budget
        return "true" if ok else "false"
    if match := _MODEL_BUSY.match(claim):
        model = now.resident().get(match["model"])
        return "true" if model is not None and model["in_flight"] > 0 else "false"
    if (match := _MODEL_QUEUED.match(claim)) or (match := _MODEL_YOUNG.match(claim)):
        return "true" if match["model"] in now.resident() else "false"
    if match := _LLM_FIRST.match(claim):
        # Our own requests not answered yet: one must have waited at least that long.
        ok = now.llm_waiting > 0 and now.llm_longest_wait_s + 1.0 >= float(match["s"])
        return "true" if ok else "false"
    if match := _DRAIN.match(claim):
        return "true" if agent["draining"] else "false"
    if _RETRY.match(claim):
        return "true"  # the account of an earlier attempt, kept until the next plan
    if _UNHEALTHY.match(claim):
        return "false" if agent["healthy"] else "true"
    return "false"


@dataclass
class HoldCheck:
    samples: int = 0
    held_seen: int = 0
    verdicts: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    by_kind: Counter[str] = field(default_factory=Counter)
    false_examples: list[str] = field(default_factory=list)
    initial_too_old: int = 0
    previous: Snapshot | None = None


def _kind(claim: str) -> str:
    for name, pattern in (
        ("image job running", _BUSY),
        ("needs X GB, Y GB free", _NEEDS_FREE),
        ("over budget", _OVER_BUDGET),
        ("model busy", _MODEL_BUSY),
        ("model has queued requests", _MODEL_QUEUED),
        ("model loaded recently", _MODEL_YOUNG),
        ("LLM request goes first", _LLM_FIRST),
        ("agent draining", _DRAIN),
        ("retry after a failed attempt", _RETRY),
    ):
        if pattern.match(claim):
            return name
    return "not yet planned" if claim == INITIAL_REASON else "other"


async def check_holds(
    http: httpx.AsyncClient, llm: LlmLoad, check: HoldCheck, stop: asyncio.Event
) -> None:
    """Every `FLEET_SAMPLE_S`: one fleet snapshot, each held reason's claims judged against it."""
    while not stop.is_set():
        with contextlib.suppress(httpx.HTTPError):
            response = await http.get("/v1/fleet")
            if response.status_code == 200:
                now_s = time.monotonic()
                snapshot = Snapshot(
                    at_wall=datetime.now(UTC),
                    fleet=response.json(),
                    llm_waiting=len(llm.waiting),
                    llm_longest_wait_s=llm.longest_wait_s(now_s),
                )
                await _judge_snapshot(http, snapshot, check)
                check.previous = snapshot
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FLEET_SAMPLE_S):
                await stop.wait()


async def _second_look(
    http: httpx.AsyncClient,
    claim: str,
    snapshot: Snapshot,
    previous: Snapshot | None,
    job_id: str,
) -> str:
    """A claim false against its snapshot: "lagging" when it held at the previous snapshot;
    "too new" when its job's reason was written after the previous snapshot (the fleet as it
    was at that moment was never seen; a claim that stays false is caught one sample later);
    else "false"."""
    if previous is not None and judge(claim, previous, {}) == "true":
        return "lagging"
    with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
        response = await http.get(f"/v1/images/{job_id}")
        written = datetime.fromisoformat(response.json()["updated_at"])
        since = previous.at_wall if previous is not None else snapshot.at_wall
        if written >= since:
            return "too new"
    return "false"


async def _judge_snapshot(http: httpx.AsyncClient, snapshot: Snapshot, check: HoldCheck) -> None:
    check.samples += 1
    held = snapshot.fleet["held_jobs"]
    check.held_seen += len(held)
    distinct: Counter[str] = Counter()
    writers: dict[str, str] = {}
    for job in held:
        for claim in claims(job["reason"]):
            distinct[claim] += 1
            writers.setdefault(claim, job["id"])
        if job["reason"] == INITIAL_REASON and job["waiting_s"] > LAG_GRACE_S:
            check.initial_too_old += 1
    job_states: dict[str, tuple[str, datetime]] = {}
    for claim, count in distinct.items():
        verdict = judge(claim, snapshot, job_states)
        if verdict is None:
            match = _BUSY.match(claim)
            assert match is not None
            job_id = match["job"]
            response = await http.get(f"/v1/images/{job_id}")
            if response.status_code == 200:
                body = response.json()
                job_states[job_id] = (body["state"], datetime.fromisoformat(body["updated_at"]))
            else:
                job_states[job_id] = ("missing", snapshot.at_wall)
            verdict = judge(claim, snapshot, job_states)
        if verdict == "false":
            verdict = await _second_look(http, claim, snapshot, check.previous, writers[claim])
        check.verdicts[verdict or "false"] += count
        check.kinds[_kind(claim)] += count
        check.by_kind[f"{_kind(claim)}: {verdict}"] += count
        if verdict == "false" and len(check.false_examples) < FALSE_EXAMPLES_KEPT:
            agent = snapshot.agent
            check.false_examples.append(
                f"{claim!r} (ledger free {agent['free_bytes'] / GB:.2f} GB, image running "
                f"{agent['image_running']}, resident "
                f"{[(m['name'], m['in_flight']) for m in agent['resident']]})"
            )


# -- the run -------------------------------------------------------------------------------------


async def wait_drained(http: httpx.AsyncClient, images: ImageLoad) -> float:
    """Seconds from the first submission until no job is held, dispatched or running."""
    await images.all_submitted.wait()
    while True:
        with contextlib.suppress(httpx.HTTPError):
            response = await http.get("/v1/fleet")
            if response.status_code == 200:
                by_state = response.json()["jobs_by_state"]
                if not any(by_state.get(s) for s in ("held", "dispatched", "running")):
                    return time.monotonic() - images.submitted_at_s
        await asyncio.sleep(FLEET_SAMPLE_S)  # a poll with the run's deadline around it


async def final_states(http: httpx.AsyncClient, job_ids: Sequence[str]) -> Counter[str]:
    gate = asyncio.Semaphore(CHECK_CONCURRENCY)
    states: Counter[str] = Counter()

    async def one(job_id: str) -> None:
        async with gate:
            try:
                response = await http.get(f"/v1/images/{job_id}")
                states[response.json()["state"] if response.status_code == 200 else "missing"] += 1
            except httpx.HTTPError:
                states["unreadable"] += 1

    await asyncio.gather(*(one(job_id) for job_id in job_ids))
    return states


def _seconds(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p95": 0.0, "max": 0.0}
    return {
        "p50": round(percentile(list(values), 50), 3),
        "p95": round(percentile(list(values), 95), 3),
        "max": round(max(values), 3),
    }


async def run() -> dict[str, Any]:
    """Start the processes, run the load, print and write `out/load.json`."""
    controller_token, agent_token = secrets.token_hex(16), secrets.token_hex(16)
    llm, images, holds = LlmLoad(), ImageLoad(), HoldCheck()
    rss: dict[str, RssTrack] = {"controller": RssTrack(), "agent": RssTrack()}
    drain_s: float | None = None
    job_states: Counter[str] = Counter()
    finished = False
    started = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-load-")))
        group = await stack.enter_async_context(ChildGroup())
        (agent,) = await group.start(
            spawn(
                "agent",
                "gpu_agent.cli",
                ["run", "--config", str(agent_config(folder, agent_token))],
            )
        )
        config = controller_config(folder, controller_token, agent.url, agent_token)
        (controller,) = await group.start(
            spawn("controller", "controller.cli", ["run", "--config", str(config)])
        )
        pids = {"controller": controller.pid, "agent": agent.pid}
        headers = {"Authorization": f"Bearer {controller_token}"}
        http = await stack.enter_async_context(
            httpx.AsyncClient(
                base_url=controller.url, headers=headers, timeout=30.0, trust_env=False
            )
        )
        await wait_healthy(http, controller.url)
        # Every stream gets its own connection, so all of them reach the controller at once.
        transport = httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=LLM_REQUESTS + SUBMIT_CONCURRENCY + 8)
        )
        studio = await stack.enter_async_context(
            StudioClient(
                controller.url,
                token=controller_token,
                timeout_s=CLIENT_TIMEOUT_S,
                retries=0,
                transport=transport,
            )
        )
        for name, value in rss_now(pids).items():
            rss[name].before = rss[name].peak = value
        stop = asyncio.Event()
        watchers = [
            asyncio.create_task(track_rss(pids, rss, stop)),
            asyncio.create_task(check_holds(http, llm, holds, stop)),
        ]
        load_started = time.monotonic()
        try:
            async with asyncio.timeout(max(1.0, RUN_LIMIT_S - (load_started - started))):
                submitting = asyncio.create_task(submit_images(studio, images, IMAGE_JOBS))
                await asyncio.gather(
                    submitting,
                    *(one_generation(studio, llm, i) for i in range(LLM_REQUESTS)),
                )
                drain_s = await wait_drained(http, images)
                job_states = await final_states(http, images.job_ids)
                finished = True
        except TimeoutError:
            print(f"the load did not finish within {RUN_LIMIT_S:g} s; stopping", flush=True)
            # Still say where every job stands, within a limit of its own.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STATES_LIMIT_S):
                    job_states = await final_states(http, images.job_ids)
        finally:
            stop.set()
            await asyncio.gather(*watchers, return_exceptions=True)
        for name, value in rss_now(pids).items():
            rss[name].after = value
        load_s = time.monotonic() - load_started
    figures = summarize(llm, images, holds, rss, drain_s, job_states, finished, load_s)
    show(figures)
    RESULT_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULT_FILE.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    print(f"figures written to {RESULT_FILE}")
    return figures


def summarize(
    llm: LlmLoad,
    images: ImageLoad,
    holds: HoldCheck,
    rss: Mapping[str, RssTrack],
    drain_s: float | None,
    job_states: Counter[str],
    finished: bool,
    load_s: float,
) -> dict[str, Any]:
    outcomes = Counter(r.outcome for r in llm.results)
    done = [r for r in llm.results if r.outcome == "ok" and r.ended_s is not None]
    latency = [r.ended_s - r.started_s for r in done if r.ended_s is not None]
    first_line = [r.headers_s - r.started_s for r in done if r.headers_s is not None]
    unanswered = LLM_REQUESTS - len(llm.results) + outcomes.get("unanswered", 0)
    jobs_final = sum(job_states[s] for s in FINAL_STATES)
    return {
        "config": {
            "speed": SPEED,
            "llm_requests": LLM_REQUESTS,
            "image_jobs": IMAGE_JOBS,
            "image_mix": dict(Counter(images.families.values())),
            "llm_models": list(LLM_MODELS),
            "run_limit_s": RUN_LIMIT_S,
        },
        "finished": finished,
        "load_s": round(load_s, 1),
        "llm": {
            "completed": outcomes.get("ok", 0),
            "failed": sum(n for o, n in outcomes.items() if o not in ("ok", "unanswered")),
            "unanswered": unanswered,
            "outcomes": dict(outcomes),
            "served_by": dict(Counter(r.served_by for r in done if r.served_by)),
            "latency_s": _seconds(latency),
            "first_line_s": _seconds(first_line),
        },
        "images": {
            "submitted": len(images.job_ids),
            "refused": images.refused,
            "final": jobs_final,
            "not_final": len(images.job_ids) - jobs_final,
            "states": dict(job_states),
            "drain_s": round(drain_s, 1) if drain_s is not None else None,
        },
        "rss_mib": {
            name: {
                "before": round(t.before / 2**20, 1),
                "peak": round(t.peak / 2**20, 1),
                "after": round(t.after / 2**20, 1),
            }
            for name, t in rss.items()
        },
        "held_reasons": {
            "samples": holds.samples,
            "held_jobs_seen": holds.held_seen,
            "claims": dict(holds.verdicts),
            "kinds": dict(holds.kinds),
            "verdicts_by_kind": dict(sorted(holds.by_kind.items())),
            "not_planned_after_grace": holds.initial_too_old,
            "false_examples": holds.false_examples,
        },
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    }


def show(figures: Mapping[str, Any]) -> None:
    llm, img, held = figures["llm"], figures["images"], figures["held_reasons"]
    config = figures["config"]
    table(
        f"Load: {config['llm_requests']} streamed LLM requests and "
        f"{config['image_jobs']} image jobs at once, sim x{config['speed']:g} "
        f"(real seconds; {'finished' if figures['finished'] else 'STOPPED AT THE LIMIT'} "
        f"in {figures['load_s']:g} s)",
        ["what", "figure"],
        [
            ["LLM completed / failed / unanswered",
             f"{llm['completed']} / {llm['failed']} / {llm['unanswered']}"],
            ["LLM outcomes", json.dumps(llm["outcomes"], sort_keys=True)],
            ["LLM latency p50 / p95 / max",
             f"{llm['latency_s']['p50']} / {llm['latency_s']['p95']} / {llm['latency_s']['max']}"],
            ["LLM first line p50 / p95",
             f"{llm['first_line_s']['p50']} / {llm['first_line_s']['p95']}"],
            ["models that served", json.dumps(llm["served_by"], sort_keys=True)],
            ["image jobs submitted / refused", f"{img['submitted']} / {img['refused']}"],
            ["image jobs final / not final", f"{img['final']} / {img['not_final']}"],
            ["image job states", json.dumps(img["states"], sort_keys=True)],
            ["image queue drained in", f"{img['drain_s']} s"],
            *[
                [f"{name} RSS MiB before / peak / after",
                 f"{r['before']} / {r['peak']} / {r['after']}"]
                for name, r in figures["rss_mib"].items()
            ],
            ["held reasons: samples / held jobs seen",
             f"{held['samples']} / {held['held_jobs_seen']}"],
            ["held-reason claims by verdict", json.dumps(held["claims"], sort_keys=True)],
            *[[f"  {kind}", n] for kind, n in held["verdicts_by_kind"].items()],
        ],
    )  # fmt: skip
    for example in held["false_examples"]:
        print("false claim:", example)


if __name__ == "__main__":
    sys.exit(0 if asyncio.run(run())["finished"] else 1)
