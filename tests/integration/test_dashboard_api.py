"""The dashboard's HTTP contract, without a browser: where a browser lands, how it logs in, what
guards the actions, and what the live feed carries.

`tests/browser` drives the page in a real Chromium; these tests pin the rules underneath: the
token is exchanged once for an HttpOnly, SameSite=Strict cookie, never sent in a URL; nothing but
the login page answers without a session; an action needs the page's own Origin and its CSRF
token; Ollama's clients still get `Ollama is running` at `/`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gpu_agent.sim.desktop import SimDesktop
from tests.integration.dashboard_client import dashboard_session, feed_states
from tests.integration.stack import AUTH, HTTP_TIMEOUT_S, Stack, running_stack
from tests.waiting import wait_until

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
SMALL = "llama3.2:3b"


@pytest.fixture
async def stack(desktop: SimDesktop, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(desktop, tmp_path / "controller") as running:
        yield running


@pytest.fixture
async def anonymous(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """A client with neither token nor session, as a stranger's browser."""
    async with httpx.AsyncClient(
        base_url=stack.url, timeout=HTTP_TIMEOUT_S, trust_env=False
    ) as http:
        yield http


async def test_a_browser_at_the_root_lands_on_the_login_page_and_ollama_still_runs(
    stack: Stack, anonymous: httpx.AsyncClient
) -> None:
    landed = await anonymous.get("/", headers={"Accept": BROWSER_ACCEPT}, follow_redirects=True)
    assert landed.status_code == 200
    assert str(landed.url).endswith("/dashboard/login")
    assert 'type="password"' in landed.text
    assert "qwen" not in landed.text  # the login page holds no data

    # Ollama's clients send no HTML Accept: the liveness text, behind the token as before.
    ollama = await stack.http.get("/")
    assert ollama.text == "Ollama is running"
    assert (await anonymous.get("/")).status_code == 401


async def test_without_a_session_only_the_login_page_answers(
    anonymous: httpx.AsyncClient, stack: Stack
) -> None:
    page = await anonymous.get("/dashboard/")
    assert page.status_code == 303
    assert page.headers["Location"] == "/dashboard/login"
    for path in ("/dashboard/events", "/dashboard/api/state"):
        response = await anonymous.get(path)
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "unauthorized"
    # The bearer token is for programs; it opens no dashboard session.
    assert (await anonymous.get("/dashboard/api/state", headers=AUTH)).status_code == 401
    # The page's files hold no data and load without a session.
    script = await anonymous.get("/dashboard/static/dashboard.js")
    assert script.status_code == 200
    assert script.headers["Content-Type"].startswith("text/javascript")
    assert (await anonymous.get("/dashboard/static/../api/state")).status_code in (401, 404)


async def test_a_wrong_token_is_refused_and_the_right_one_becomes_a_strict_cookie(
    anonymous: httpx.AsyncClient, stack: Stack
) -> None:
    wrong = await anonymous.post(
        "/dashboard/login", data={"token": "guess"}, headers={"Origin": stack.url}
    )
    assert wrong.status_code == 401
    assert "not the controller" in wrong.text
    assert "set-cookie" not in wrong.headers

    right = await anonymous.post(
        "/dashboard/login", data={"token": "controller-t0ken"}, headers={"Origin": stack.url}
    )
    assert right.status_code == 303
    cookie = right.headers["Set-Cookie"]
    assert cookie.startswith("gpu_dashboard=")
    for attribute in ("HttpOnly", "SameSite=Strict", "Path=/dashboard"):
        assert attribute in cookie, cookie
    assert "controller-t0ken" not in cookie
    page = await anonymous.get("/dashboard/")
    assert page.status_code == 200
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]


async def test_actions_need_the_pages_origin_and_csrf_token(stack: Stack) -> None:
    job = await stack.submit_unplaceable()
    path = f"/dashboard/api/jobs/{job['id']}/cancel"
    async with dashboard_session(stack) as session:
        other_site = await session.post(path, Origin="http://localhost:3000")
        assert other_site.status_code == 403
        assert other_site.json()["error"]["code"] == "forbidden_origin"
        no_origin = await session.http.post(path, headers={"X-CSRF-Token": session.csrf})
        assert no_origin.status_code == 403
        no_csrf = await session.http.post(path, headers={"Origin": session.origin})
        assert no_csrf.status_code == 403
        assert (await stack.job(job["id"]))["state"] == "held"

        cancelled = await session.post(path)
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["state"] == "cancelled"
        assert (await stack.job(job["id"]))["state"] == "cancelled"


async def test_unload_takes_an_idle_model_only(stack: Stack) -> None:
    answer = await stack.generate(SMALL, keep_alive=-1, options={"num_predict": 8})
    assert answer.status_code == 200, answer.text
    async with dashboard_session(stack) as session:
        missing = await session.post("/dashboard/api/agents/desk/unload", {"model": "nope:1b"})
        assert missing.status_code == 409
        assert "not resident" in missing.json()["error"]["message"]
        unknown_agent = await session.post(
            "/dashboard/api/agents/elsewhere/unload", {"model": SMALL}
        )
        assert unknown_agent.status_code == 404
        malformed = await session.post("/dashboard/api/agents/desk/unload", ["x"])
        assert malformed.status_code == 400

        unloaded = await session.post("/dashboard/api/agents/desk/unload", {"model": SMALL})
        assert unloaded.status_code == 200, unloaded.text
        assert unloaded.json()["freed_bytes"] > 0
    assert SMALL not in stack.resident()


async def test_the_feed_carries_the_state_and_the_memory_history(stack: Stack) -> None:
    answer = await stack.generate(SMALL, options={"num_predict": 8})
    assert answer.status_code == 200
    job = await stack.submit_unplaceable()

    async def history_grew() -> bool:
        async with dashboard_session(stack) as session:
            (state,) = await feed_states(session.http, 1)
        return sum(len(s["t"]) for s in state["history"]) >= 3

    await wait_until(history_grew, timeout_s=30, poll_s=1.0, what="three history points")
    async with dashboard_session(stack) as session:
        first, second = await feed_states(session.http, 2)
    assert first["history_reset"] is True
    (series,) = first["history"]
    assert series["agent"] == "desk"
    assert len(series["t"]) == len(series["ollama_gib"]) >= 3
    assert series["budget_gib"][-1] < series["total_gib"]
    (agent,) = first["agents"]
    assert agent["healthy"] is True
    assert agent["gpus"][0]["total_bytes"] > 0
    (held,) = first["held"]
    assert held["id"] == job["id"]
    assert held["reason"]
    (served,) = first["llm_recent"]
    assert (served["requested"], served["model"], served["outcome"]) == (SMALL, SMALL, "served")
    assert SMALL in {m["name"] for m in first["catalogue"]["models"]}
    # Later messages carry only the points taken since.
    assert second["history_reset"] is False
    assert sum(len(s["t"]) for s in second["history"]) < len(series["t"])


async def test_the_openapi_document_leaves_the_dashboard_out(stack: Stack) -> None:
    document = (await stack.http.get("/openapi.json")).json()
    assert "/api/generate" in document["paths"]
    assert not [path for path in document["paths"] if path.startswith("/dashboard")]


async def test_without_a_token_the_page_opens_a_session_by_itself(
    desktop: SimDesktop, tmp_path: Path
) -> None:
    async with (
        running_stack(desktop, tmp_path / "controller", token=None) as stack,
        httpx.AsyncClient(base_url=stack.url, timeout=HTTP_TIMEOUT_S, trust_env=False) as http,
    ):
        page = await http.get("/dashboard/")
        assert page.status_code == 200
        assert "HttpOnly" in page.headers["Set-Cookie"]
        login = await http.get("/dashboard/login")
        assert login.status_code == 303
        state = await http.get("/dashboard/api/state")
        assert state.status_code == 200
        assert state.json()["agents"][0]["name"] == "desk"


async def test_the_page_says_why_part_of_an_agent_cannot_serve(stack: Stack) -> None:
    await stack.desktop.stop_ollama()
    try:
        async with dashboard_session(stack) as session:

            async def reason() -> str | None:
                state = (await session.http.get("/dashboard/api/state")).json()
                text: str | None = state["agents"][0]["reason"]
                return text if text and "Ollama unreachable" in text else None

            why = await wait_until(reason, timeout_s=30, poll_s=0.5, what="Ollama's trouble")
            assert "Ollama unreachable" in why
    finally:
        await stack.desktop.start_ollama()
