"""The dashboard's live feed (adapter layer): Server-Sent Events pushed on the engine's changes.

Nothing polls. A stream waits on the engine's pulse (snapshots, requests placed and ended, plans)
and on the image scheduler's changes (held reasons, progress, ends); on either it builds the
page's state and sends it if anything the page shows changed, at most every `MIN_INTERVAL_S`,
so a burst of changes costs one message and any change reaches the page well within a second.
Each message carries the history points taken since the previous one; the first carries the
whole hour. A comment line every `HEARTBEAT_S` keeps idle proxies from closing the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from aiohttp import web

from controller.dashboard.history import MemoryHistory
from controller.dashboard.views import dashboard_state
from controller.engine import Engine

log = logging.getLogger(__name__)

MIN_INTERVAL_S = 0.25
HEARTBEAT_S = 15.0


async def _first(events: list[asyncio.Event], timeout_s: float) -> None:
    """Return when any of `events` is set, or after `timeout_s`."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def message(event: str, data: str) -> bytes:
    """One Server-Sent Event (`data` is one line of JSON, so one `data:` field)."""
    return f"event: {event}\ndata: {data}\n\n".encode()


async def stream_state(
    request: web.Request, engine: Engine, history: MemoryHistory, closing: asyncio.Event
) -> web.StreamResponse:
    """Serve one page's feed until it goes away or the controller stops (`closing`)."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            # A reverse proxy must pass each event on at once, not buffer the stream.
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    last_body = ""
    last_seq = 0
    try:
        while not closing.is_set():
            marks = [engine.pulse.mark(), engine.images.changes.mark(), closing]
            state = dashboard_state(engine)
            body = state.model_dump_json(exclude={"now"})
            points = history.series(last_seq)
            if body != last_body or points:
                history_json = json.dumps([p.model_dump(mode="json") for p in points])
                reset = "true" if last_seq == 0 else "false"
                data = (
                    state.model_dump_json()[:-1]
                    + f',"history":{history_json},"history_reset":{reset}}}'
                )
                await response.write(message("state", data))
                last_body = body
                last_seq = history.last_seq
                await asyncio.sleep(MIN_INTERVAL_S)
            else:
                await _first(marks, HEARTBEAT_S)
                if not any(mark.is_set() for mark in marks):
                    await response.write(b": still here\n\n")
    except ConnectionResetError:
        # The page went away (closed, reloaded): the stream simply ends.
        log.debug("a dashboard feed closed")
        return response
    with contextlib.suppress(ConnectionResetError, RuntimeError):
        await response.write_eof()
    return response
