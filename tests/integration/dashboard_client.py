"""A browser's side of the dashboard over plain HTTP, for tests: log in, read the feed, act.

The browser tests (`tests/browser`) drive a real Chromium; these helpers check the same
contract without one: the cookie, the CSRF token, the Origin rules and the feed's messages.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from tests.integration.stack import CONTROLLER_TOKEN, HTTP_TIMEOUT_S, Stack

_CSRF = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


@dataclass
class DashboardSession:
    """A logged-in client (its cookie jar holds the session) and the page's CSRF token."""

    http: httpx.AsyncClient
    csrf: str
    origin: str

    async def post(self, path: str, body: Any = None, **headers: str) -> httpx.Response:
        """An action as the page sends it: same Origin, the CSRF token, a JSON body."""
        sent = {"Origin": self.origin, "X-CSRF-Token": self.csrf, **headers}
        return await self.http.post(path, json=body, headers=sent)


@contextlib.asynccontextmanager
async def dashboard_session(
    stack: Stack, token: str = CONTROLLER_TOKEN
) -> AsyncIterator[DashboardSession]:
    """Log in through the form, as a person does, and read the page's CSRF token."""
    async with httpx.AsyncClient(
        base_url=stack.url, timeout=HTTP_TIMEOUT_S, trust_env=False
    ) as http:
        response = await http.post(
            "/dashboard/login", data={"token": token}, headers={"Origin": stack.url}
        )
        assert response.status_code == 303, response.text
        assert response.headers["Location"] == "/dashboard/"
        page = await http.get("/dashboard/")
        assert page.status_code == 200, page.text
        match = _CSRF.search(page.text)
        assert match is not None, "the page carries no CSRF token"
        yield DashboardSession(http, match.group(1), stack.url)


async def feed_states(http: httpx.AsyncClient, count: int) -> list[dict[str, Any]]:
    """The first `count` state messages of the live feed."""
    states: list[dict[str, Any]] = []
    async with http.stream("GET", "/dashboard/events") as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["Content-Type"].startswith("text/event-stream")
        event = None
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event == "state":
                states.append(json.loads(line.removeprefix("data: ")))
                if len(states) == count:
                    break
    return states
