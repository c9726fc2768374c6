"""The dashboard in a real headless Chromium, against the simulated stack on virtual time.

One page follows a whole scene without a reload: it loads with no console error; an SDXL job
shows as held behind a busy qwen2.5:14b with the controller's reason, then running with its
step, then succeeded; the memory chart has points; a held job is cancelled with its button and
an idle model unloaded with its. A browser without a session sees the login page and nothing
else. Screenshots go to `out/`: the desktop size in light mode, and a phone in dark mode.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from controller.dashboard.feed import MIN_INTERVAL_S
from gpu_agent.sim.desktop import SimDesktop
from tests.integration.stack import CONTROLLER_TOKEN, POLL_S, Stack, drain, running_stack, sdxl
from tests.integration.test_controller_scenarios import Stream, load_pinned
from tests.waiting import wait_until
from tools.chromium import BrowserThread, PageHandle

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

OUT = Path(__file__).resolve().parents[2] / "out"
BIG = "qwen2.5:14b"
SMALL = "llama3.2:3b"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
# Simulated seconds: the 14b's long answer, then the SDXL job behind it.
SCENE_TIMEOUT_S = 120.0


@pytest.fixture
async def stack(desktop: SimDesktop, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(desktop, tmp_path / "controller") as running:
        yield running


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def controller_sees(stack: Stack, model: str) -> bool:
    """Whether the controller's latest snapshot of the agent lists `model` as resident."""
    status = stack.engine.links["desk"].status
    return status is not None and any(m.name == model for m in status.ollama.resident)


async def feed_catches_up(stack: Stack) -> None:
    """Let one feed interval of simulated time pass before the browser looks.

    The feed sends at most every `MIN_INTERVAL_S`, and simulated time stands still while the
    browser looks; a change made just now reaches the page once that interval has passed."""
    since = stack.engine.clock()
    await wait_until(
        lambda: stack.engine.clock() >= since + MIN_INTERVAL_S,
        poll_s=MIN_INTERVAL_S / 5,
        what="one feed interval",
    )


# -- what the browser does (each runs on the browser's thread, time standing still) ---------


def log_in(handle: PageHandle) -> None:
    """From the root, as a person arrives: the login page, the token, the dashboard."""
    page = handle.page
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/dashboard/login$"))
    expect(page.locator("#agents")).to_have_count(0)  # no data before the token
    page.fill("#token", CONTROLLER_TOKEN)
    page.click("button[type=submit]")
    expect(page).to_have_url(re.compile(r"/dashboard/$"))
    expect(page.locator("#live")).to_have_text("live")
    expect(page.locator('[data-agent="desk"] .health')).to_have_text("healthy")
    # Set once; still there at the end only if the page was never reloaded.
    page.evaluate("window.loadedOnce = true")


def row(handle: PageHandle, table: str, job_id: str) -> Any:
    return handle.page.locator(f'#{table} tr[data-key="{job_id}"]')


def sees_held(handle: PageHandle, job_id: str, reason_part: str) -> str:
    held = row(handle, "held", job_id)
    expect(held).to_contain_text(reason_part)
    serving = handle.page.locator("#llm-active tbody tr")
    expect(serving.first).to_contain_text(BIG)
    text: str = held.inner_text()
    return text


def sees_running(handle: PageHandle, job_id: str) -> None:
    running = row(handle, "running", job_id)
    expect(running).to_contain_text(re.compile(r"step \d+/10"))
    expect(row(handle, "held", job_id)).to_have_count(0)


def sees_succeeded(handle: PageHandle, job_id: str) -> None:
    expect(row(handle, "recent", job_id)).to_contain_text("succeeded")
    expect(row(handle, "running", job_id)).to_have_count(0)


def chart_points(handle: PageHandle) -> int:
    chart = handle.page.locator('[data-gpu="desk/0"] .memory-chart')
    expect(chart.locator("canvas")).to_have_count(1)
    expect(chart.locator(".u-legend")).to_contain_text("Ollama")
    expect(chart.locator(".u-legend")).to_contain_text("budget")
    return int(chart.get_attribute("data-points") or 0)


def click_twice(handle: PageHandle, locator: Any) -> None:
    """An action button asks once more before it acts."""
    button = locator.get_by_role("button")
    button.click()
    expect(button).to_contain_text("click again")
    button.click()


def never_reloaded(handle: PageHandle) -> bool:
    return bool(handle.page.evaluate("window.loadedOnce === true"))


def screenshot(handle: PageHandle, name: str) -> Path:
    OUT.mkdir(exist_ok=True)
    path = OUT / name
    handle.page.screenshot(path=str(path))
    return path


def page_layout(handle: PageHandle) -> dict[str, Any]:
    """The page's width against the window's, and its background colour."""
    layout: dict[str, Any] = handle.page.evaluate(
        """() => ({
            overflow: document.documentElement.scrollWidth - window.innerWidth,
            background: getComputedStyle(document.body).backgroundColor,
        })"""
    )
    return layout


# -- the tests ------------------------------------------------------------------------------


async def test_a_job_held_then_running_then_done_and_the_buttons_act(
    stack: Stack, chromium: BrowserThread
) -> None:
    async with chromium.page(stack.url, viewport=DESKTOP, color_scheme="light") as handle:
        await chromium.run(log_in, handle)

        # A long answer keeps the 14b busy, so the SDXL job is held behind it.
        await load_pinned(stack, BIG)
        stream = Stream(
            stack,
            {
                "model": BIG,
                "prompt": "tell a long story",
                "options": {"num_predict": 2000, "seed": 2},
            },
        )
        try:
            await wait_until(stream.started.is_set, timeout_s=SCENE_TIMEOUT_S, poll_s=POLL_S)
            job = await stack.submit(sdxl(steps=10))

            async def held_for_14b() -> dict[str, Any] | None:
                current = await stack.job(job["id"])
                return current if f"{BIG} busy" in current["reason"] else None

            await wait_until(held_for_14b, poll_s=POLL_S, what="the job held for the busy 14b")
            await feed_catches_up(stack)
            shown = await chromium.run(sees_held, handle, job["id"], f"{BIG} busy")
            assert "needs" in shown

            async def stepping() -> bool:
                current = await stack.job(job["id"])
                progress = current["progress"] or {}
                return current["state"] == "running" and (progress.get("step") or 0) >= 1

            await wait_until(stepping, timeout_s=SCENE_TIMEOUT_S, poll_s=POLL_S, what="a step")
            await feed_catches_up(stack)
            await chromium.run(sees_running, handle, job["id"])
            await stream.finished()
        finally:
            await drain(stream.task)
        done = await stack.wait_job(job["id"], timeout_s=SCENE_TIMEOUT_S)
        assert done["state"] == "succeeded", done
        await feed_catches_up(stack)
        await chromium.run(sees_succeeded, handle, job["id"])

        # Cancel a held job with its button.
        stuck = await stack.submit_unplaceable()
        await stack.wait_job(stuck["id"], "held")
        await feed_catches_up(stack)
        await chromium.run(lambda h: click_twice(h, row(h, "held", stuck["id"])), handle)
        cancelled = await stack.wait_job(stuck["id"], "cancelled")
        assert cancelled["state"] == "cancelled"
        await feed_catches_up(stack)
        await chromium.run(
            lambda h: expect(row(h, "recent", stuck["id"])).to_contain_text("cancelled"), handle
        )

        # Unload an idle model with its button.
        answer = await stack.generate(SMALL, keep_alive=-1, options={"num_predict": 8})
        assert answer.status_code == 200
        await feed_catches_up(stack)
        resident = f'[data-agent="desk"] .resident tr[data-key="{SMALL}"]'
        await chromium.run(
            lambda h: click_twice(h, h.page.locator(resident)),
            handle,
        )
        await wait_until(lambda: not controller_sees(stack, SMALL), poll_s=POLL_S, what="unload")
        assert SMALL not in stack.resident()
        await feed_catches_up(stack)
        await chromium.run(lambda h: expect(h.page.locator(resident)).to_have_count(0), handle)

        points = await chromium.run(chart_points, handle)
        assert points >= 10, points
        assert await chromium.run(never_reloaded, handle)
        light = await chromium.run(page_layout, handle)
        assert light["overflow"] <= 0, light
        assert (await chromium.run(screenshot, handle, "dashboard.png")).stat().st_size > 10_000
        assert handle.console.errors == []


async def test_a_phone_in_dark_mode_gets_one_column_and_a_stranger_the_login_page(
    stack: Stack, chromium: BrowserThread
) -> None:
    async with chromium.page(stack.url, viewport=DESKTOP, color_scheme="light") as stranger:

        def lands_on_login(handle: PageHandle) -> str:
            page = handle.page
            page.goto("/dashboard/")
            expect(page).to_have_url(re.compile(r"/dashboard/login$"))
            expect(page.locator("#token")).to_be_visible()
            response = page.request.get("/dashboard/api/state")
            assert response.status == 401
            page.fill("#token", "not-the-token")
            page.click("button[type=submit]")
            expect(page.locator(".error")).to_contain_text("not the controller's token")
            text: str = page.locator("body").inner_text()
            return text

        body = await chromium.run(lands_on_login, stranger)
        assert "qwen" not in body
        assert "desk" not in body
        light = await chromium.run(page_layout, stranger)
    # The failed login left a 401 in the console; it is the only error.
    assert all("401" in error for error in stranger.console.errors), stranger.console.errors

    phone = {"viewport": PHONE, "color_scheme": "dark", "is_mobile": True, "has_touch": True}
    async with chromium.page(stack.url, **phone) as handle:
        await chromium.run(log_in, handle)
        dark = await chromium.run(page_layout, handle)
        assert dark["overflow"] <= 0, dark
        assert dark["background"] != light["background"]
        await chromium.run(screenshot, handle, "dashboard-phone-dark.png")
        assert handle.console.errors == []
