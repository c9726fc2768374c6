"""Latency each hop adds to an LLM request: direct to Ollama, through the agent, through the
controller and the agent, and through a bare reference proxy.

What it measures: the same short streamed generation (`/api/generate`, llama3.2:3b already
loaded, `num_predict` 16) sent four ways from one client process (httpx):

- `direct`: to the emulated Ollama;
- `agent`: to the agent's `/api/*` pass-through, which forwards it to that Ollama;
- `controller`: to the controller's Ollama-compatible `/api/generate` with the model named, which
  plans the request with the policy core and streams it through the agent;
- `reference`: to a bare aiohttp pass-through proxy (`reference_app`, a few lines: read the
  body, forward it, stream the answer back chunk by chunk) in front of the same Ollama. It is
  what any Python proxy on this stack costs, measured in the same rounds as the others, so
  the agent's and the controller's figures can be judged against it on a busy machine too.

The agent and the simulated desktop run in one child process (`gpu-agent run --simulate`: the
agent must read the simulated GPU, or the controller would not schedule on it), the controller
in another (`gpu-controller run`), the reference proxy in a third (`python -m bench.overhead
--reference-proxy URL`). The simulated clock runs 1000x fast, so the emulated model's own time
(about 0.15 simulated seconds a request) shrinks to well under a millisecond and what remains is
mostly HTTP and process work. Each concurrency level runs `rounds` rounds; every round sends an
equal share of the requests down each path, in a rotated order, after a warm-up, so drift and
noise fall on all paths alike. Within a round a path's requests go back to back, as one client's
would, so work a service does after an answer (before it reads the next request) counts too.

How to read it: per path, p50/p99 of the total time and of the time to the first NDJSON line, in
ms, and requests per second. "added" is the difference of those percentiles between a path and
the one it wraps (agent - direct, controller - agent, reference - direct): the cost of one hop.
The targets (`targets` in the JSON) are judged at the lowest concurrency: each of our hops adds
at most 1 ms at p50 and at most 1.3 times what the reference proxy adds; and at the highest,
the controller path serves at least 90 % of the direct path's requests per second. At
concurrency 64 the emulated Ollama serves one request at a time (`OLLAMA_NUM_PARALLEL=1`, as on
the real desktop), so latency there is mostly queueing, and the added figures show how much
each hop lowers the rate at which that queue drains. The client and the service processes share
the machine's cores; on a machine with fewer than four free cores, the figures include that
contention, which is why the reference is measured alongside.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil  # type: ignore[import-untyped]  # no stubs in the dev dependencies
from aiohttp import web

from bench.footprint import (
    Child,
    ChildGroup,
    spawn,
    spawn_agent_with_sim,
    spawn_controller,
    wait_healthy,
)
from bench.report import percentile, record, table

MODEL = "llama3.2:3b"
PATHS = ("direct", "agent", "controller", "reference")
# Which path each hop wraps: the agent wraps Ollama, the controller wraps the agent, and the
# reference proxy wraps Ollama as the agent does.
HOPS = {"agent": "direct", "controller": "agent", "reference": "direct"}
# Our hops, judged against the targets; the reference is what they are compared with.
OUR_HOPS = ("agent", "controller")
TARGET_ADDED_P50_MS = 1.0
TARGET_REFERENCE_RATIO = 1.3
TARGET_THROUGHPUT_SHARE = 0.9
LEVELS = ((1, 400), (64, 2000))
REQUEST_TIMEOUT_S = 60.0
JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass(frozen=True, slots=True)
class Sample:
    """One request: total time and time to its first NDJSON line, in ms."""

    total_ms: float
    first_ms: float
    ok: bool


@dataclass
class PathRun:
    """Every request sent down one path at one concurrency, and the time spent sending them."""

    samples: list[Sample] = field(default_factory=list)
    busy_s: float = 0.0


def generate_body(num_predict: int) -> bytes:
    # keep_alive -1: at 1000x, Ollama's default 5 minutes is 0.3 real seconds, and a model
    # unloaded between rounds would put a load into some paths' figures and not others'.
    body = {
        "model": MODEL,
        "prompt": "Say hello to the studio.",
        "stream": True,
        "keep_alive": -1,
        "options": {"num_predict": num_predict},
    }
    return json.dumps(body).encode()


async def timed_request(client: httpx.AsyncClient, url: str, body: bytes) -> Sample:
    started = time.perf_counter()
    first: float | None = None
    try:
        async with client.stream("POST", url, content=body, headers=JSON_HEADERS) as response:
            async for line in response.aiter_lines():
                if first is None and line.strip():
                    first = time.perf_counter()
            ok = response.status_code == 200 and first is not None
    except httpx.HTTPError:
        ok = False
    ended = time.perf_counter()
    return Sample((ended - started) * 1000, ((first or ended) - started) * 1000, ok)


async def run_block(
    client: httpx.AsyncClient, url: str, body: bytes, requests: int, concurrency: int
) -> tuple[list[Sample], float]:
    """`requests` requests to `url`, `concurrency` at a time; the samples and the wall time."""
    samples: list[Sample] = []
    left = requests

    async def stream_requests() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            samples.append(await timed_request(client, url, body))

    started = time.perf_counter()
    await asyncio.gather(*(stream_requests() for _ in range(min(concurrency, requests))))
    return samples, time.perf_counter() - started


def _shares(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def measure_level(
    client: httpx.AsyncClient,
    urls: Mapping[str, str],
    body: bytes,
    *,
    requests: int,
    concurrency: int,
    rounds: int,
) -> dict[str, PathRun]:
    """`requests` per path, in `rounds` rounds; each round starts on the next path."""
    runs = {path: PathRun() for path in urls}
    order = list(urls)
    for index, share in enumerate(_shares(requests, rounds)):
        start = index % len(order)
        for path in order[start:] + order[:start]:
            samples, busy_s = await run_block(client, urls[path], body, share, concurrency)
            runs[path].samples += samples
            runs[path].busy_s += busy_s
    return runs


def path_figures(run: PathRun) -> dict[str, float]:
    ok = [s for s in run.samples if s.ok]
    totals = [s.total_ms for s in ok]
    firsts = [s.first_ms for s in ok]
    return {
        "p50_ms": percentile(totals, 50),
        "p99_ms": percentile(totals, 99),
        "first_p50_ms": percentile(firsts, 50),
        "first_p99_ms": percentile(firsts, 99),
        "req_per_s": len(run.samples) / run.busy_s if run.busy_s > 0 else 0.0,
        "requests": len(run.samples),
        "errors": len(run.samples) - len(ok),
    }


def added_figures(inner: Mapping[str, float], outer: Mapping[str, float]) -> dict[str, float]:
    """What `outer` adds on top of the path it wraps, percentile by percentile."""
    return {
        "p50": outer["p50_ms"] - inner["p50_ms"],
        "p99": outer["p99_ms"] - inner["p99_ms"],
        "first_p50": outer["first_p50_ms"] - inner["first_p50_ms"],
        "first_p99": outer["first_p99_ms"] - inner["first_p99_ms"],
    }


def level_figures(runs: Mapping[str, PathRun]) -> dict[str, Any]:
    figures: dict[str, Any] = {path: path_figures(runs[path]) for path in PATHS}
    added = {hop: added_figures(figures[inner], figures[hop]) for hop, inner in HOPS.items()}
    figures["added_ms"] = added
    # For the reference this says whether even a bare proxy meets the target on this machine.
    figures["target_met"] = {hop: added[hop]["p50"] < TARGET_ADDED_P50_MS for hop in HOPS}
    return figures


def targets(
    latency_level: str,
    latency: Mapping[str, Any],
    throughput_level: str,
    throughput: Mapping[str, Any],
) -> dict[str, Any]:
    """The verdicts: at `latency_level` each of our hops adds at most 1 ms at p50 and at most
    1.3 times what the reference proxy adds; at `throughput_level` the controller path serves at
    least 90 % of the direct path's requests per second."""
    added = {hop: latency["added_ms"][hop]["p50"] for hop in HOPS}
    reference_ms = added["reference"]
    within_ms = {hop: added[hop] <= TARGET_ADDED_P50_MS for hop in OUR_HOPS}
    within_ratio = {
        hop: added[hop] <= TARGET_REFERENCE_RATIO * max(reference_ms, 0.0) for hop in OUR_HOPS
    }
    direct_rps = throughput["direct"]["req_per_s"]
    share = throughput["controller"]["req_per_s"] / direct_rps if direct_rps > 0 else 0.0
    share_met = share >= TARGET_THROUGHPUT_SHARE
    return {
        "latency_level": latency_level,
        "added_p50_ms": added,
        "over_reference": {
            hop: added[hop] / reference_ms if reference_ms > 0 else None for hop in OUR_HOPS
        },
        "within_added_ms": within_ms,
        "within_reference_ratio": within_ratio,
        "throughput_level": throughput_level,
        "controller_share_of_direct_rps": share,
        "within_throughput_share": share_met,
        "all_met": all(within_ms.values()) and all(within_ratio.values()) and share_met,
    }


def reference_app(upstream_url: str) -> web.Application:
    """The reference: a bare aiohttp pass-through proxy to `upstream_url`, nothing more."""
    app = web.Application()
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(upstream_url, timeout=timeout) as session:
            app[session_key] = session
            yield

    async def forward(request: web.Request) -> web.StreamResponse:
        session = app[session_key]
        body = await request.read()
        headers = {"Content-Type": request.content_type}
        async with session.request(
            request.method, request.rel_url.path_qs, data=body, headers=headers
        ) as upstream:
            response = web.StreamResponse(status=upstream.status)
            response.content_type = upstream.content_type
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


async def serve_reference(upstream_url: str) -> None:
    """Run the reference proxy on a free port of 127.0.0.1 until SIGTERM or SIGINT."""
    runner = web.AppRunner(reference_app(upstream_url), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    print(f"reference proxy listening on http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def spawn_reference(upstream_url: str) -> Coroutine[Any, Any, Child]:
    """The reference proxy in its own process, like the services it is compared with."""
    return spawn("reference", "bench.overhead", ["--reference-proxy", upstream_url])


async def find_ollama_url(client: httpx.AsyncClient, agent: Child) -> str:
    """The emulated Ollama inside `agent`'s process: the listening port that answers like one."""
    listening = {
        (conn.laddr.ip, conn.laddr.port)
        for conn in psutil.Process(agent.pid).net_connections("tcp")
        if conn.status == psutil.CONN_LISTEN
    }
    for host, port in sorted(listening):
        url = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
        if url == agent.url:
            continue
        with contextlib.suppress(httpx.HTTPError):
            response = await client.get(f"{url}/")
            if response.status_code == 200 and response.text.strip() == "Ollama is running":
                return url
    raise RuntimeError(f"no emulated Ollama among the ports of {agent.name} ({sorted(listening)})")


def _print_level(name: str, concurrency: int, figures: Mapping[str, Any]) -> None:
    rows = []
    for path in PATHS:
        fig = figures[path]
        rows.append([path, int(fig["requests"]), int(fig["errors"]), fig["p50_ms"], fig["p99_ms"]])
        rows[-1] += [fig["first_p50_ms"], fig["first_p99_ms"], fig["req_per_s"]]
    table(
        f"Per-path latency at {concurrency} concurrent stream(s) ({name}), ms",
        ["path", "requests", "errors", "p50", "p99", "first p50", "first p99", "req/s"],
        rows,
    )


def _print_added(levels: Mapping[str, Mapping[str, Any]]) -> None:
    rows = []
    for name, figures in levels.items():
        for hop, inner in HOPS.items():
            added = figures["added_ms"][hop]
            met = "yes" if figures["target_met"][hop] else "NO"
            rows.append([name, f"{hop} - {inner}", added["p50"], added["p99"]])
            rows[-1] += [added["first_p50"], added["first_p99"], met]
    table(
        f"Latency added per hop, ms (target: under {TARGET_ADDED_P50_MS:g} ms at p50)",
        ["level", "hop", "p50", "p99", "first p50", "first p99", "target met"],
        rows,
    )


def _print_targets(verdicts: Mapping[str, Any]) -> None:
    def met(value: bool) -> str:
        return "yes" if value else "NO"

    level = verdicts["latency_level"]
    rows: list[list[Any]] = [
        [f"{level}: reference adds at p50, ms", verdicts["added_p50_ms"]["reference"]]
    ]
    for hop in OUR_HOPS:
        ratio = verdicts["over_reference"][hop]
        rows.append([f"{level}: {hop} adds at p50, ms", verdicts["added_p50_ms"][hop]])
        rows.append([f"{level}: {hop} / reference", "-" if ratio is None else ratio])
        rows.append(
            [f"{level}: {hop} <= {TARGET_ADDED_P50_MS:g} ms", met(verdicts["within_added_ms"][hop])]
        )
        rows.append(
            [
                f"{level}: {hop} <= {TARGET_REFERENCE_RATIO:g}x reference",
                met(verdicts["within_reference_ratio"][hop]),
            ]
        )
    share = verdicts["controller_share_of_direct_rps"]
    level = verdicts["throughput_level"]
    rows.append([f"{level}: controller req/s / direct req/s", share])
    rows.append(
        [
            f"{level}: controller >= {TARGET_THROUGHPUT_SHARE:.0%} of direct",
            met(verdicts["within_throughput_share"]),
        ]
    )
    rows.append(["all targets met", met(verdicts["all_met"])])
    table("Targets", ["target", "value"], rows)


async def run(
    *,
    levels: Sequence[tuple[int, int]] = LEVELS,
    speed: float = 1000.0,
    num_predict: int = 16,
    rounds: int = 10,
    warmup: int = 20,
    save: bool = True,
) -> dict[str, Any]:
    """Measure each (concurrency, requests) level over the four paths; print the tables and
    record `overhead`."""
    results: dict[str, Any] = {}
    top = max(concurrency for concurrency, _ in levels)
    # Room for every path's connections at the top level, so none is reopened mid-run.
    limits = httpx.Limits(max_connections=len(PATHS) * top + 8, max_keepalive_connections=None)
    async with contextlib.AsyncExitStack() as stack:
        data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-oh-")))
        group = await stack.enter_async_context(ChildGroup())
        (agent,) = await group.start(spawn_agent_with_sim(speed))
        (controller,) = await group.start(spawn_controller(agent.url, data_dir / "ctl"))
        client = await stack.enter_async_context(
            httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_TIMEOUT_S), limits=limits)
        )
        await wait_healthy(client, controller.url)
        ollama_url = await find_ollama_url(client, agent)
        (reference,) = await group.start(spawn_reference(ollama_url))
        urls = {
            "direct": f"{ollama_url}/api/generate",
            "agent": f"{agent.url}/api/generate",
            "controller": f"{controller.url}/api/generate",
            "reference": f"{reference.url}/api/generate",
        }
        body = generate_body(num_predict)
        # The first request through the controller loads the model; none of that is measured.
        loaded = await timed_request(client, urls["controller"], body)
        if not loaded.ok:
            raise RuntimeError("the warm-up request through the controller failed")
        for concurrency, requests in levels:
            # Unmeasured: opens every connection this level uses and settles the processes.
            await measure_level(
                client, urls, body, requests=warmup + concurrency, concurrency=concurrency, rounds=1
            )
            runs = await measure_level(
                client, urls, body, requests=requests, concurrency=concurrency, rounds=rounds
            )
            results[f"c{concurrency}"] = level_figures(runs)
            _print_level(f"c{concurrency}", concurrency, results[f"c{concurrency}"])
    _print_added(results)
    low, high = min(levels)[0], max(levels)[0]
    results["targets"] = targets(f"c{low}", results[f"c{low}"], f"c{high}", results[f"c{high}"])
    _print_targets(results["targets"])
    results["config"] = {
        "speed": speed,
        "num_predict": num_predict,
        "rounds": rounds,
        "warmup": warmup,
        "model": MODEL,
        "target_added_p50_ms": TARGET_ADDED_P50_MS,
        "target_reference_ratio": TARGET_REFERENCE_RATIO,
        "target_throughput_share": TARGET_THROUGHPUT_SHARE,
    }
    if save:
        record("overhead", results)
    return results


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead")
    parser.add_argument(
        "--reference-proxy", metavar="URL", help="serve only the reference proxy to URL"
    )
    args = parser.parse_args(argv)
    if args.reference_proxy:
        asyncio.run(serve_reference(args.reference_proxy))
    else:
        asyncio.run(run())


if __name__ == "__main__":
    main(sys.argv[1:])
