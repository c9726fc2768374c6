"""One headless Chromium driven from a thread of its own, for the dashboard's tests and pictures.

Debian's `chromium` (`make chromium` installs it) is driven by Playwright's synchronous API
(the dev extra); Playwright never downloads a browser of its own here. The browser lives on one
worker thread, since Playwright's objects belong to the thread that made them, and a caller on
the event loop hands it work with `await browser.run(fn)`. On the virtual-time loop that is an
executor job: simulated time stands still while the browser looks, and the loop keeps serving
the page's requests meanwhile, so the page is checked (or photographed) against a world that
does not move under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

# Where the browser is looked for, in order, when CHROMIUM_PATH names none.
CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
# Real seconds: starting the browser on a busy two-core machine.
LAUNCH_TIMEOUT_S = 60.0
# Playwright's own waits, in real seconds (an `expect` retries until then).
ACTION_TIMEOUT_MS = 15_000


def find_chromium() -> str | None:
    """The Chromium executable to drive: CHROMIUM_PATH, else the first on PATH."""
    named = os.environ.get("CHROMIUM_PATH")
    if named:
        return named if os.access(named, os.X_OK) else None
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


@dataclass
class ConsoleLog:
    """What a page wrote to its console as errors, and scripts that threw."""

    errors: list[str] = field(default_factory=list)


class BrowserThread:
    """A launched Chromium and the one thread that may touch it."""

    def __init__(self, executable: str) -> None:
        self.executable = executable
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chromium")
        self._playwright: Any = None
        self.browser: Any = None

    def start(self) -> None:
        """Launch the browser (on its thread); raises if it cannot start."""
        self._executor.submit(self._launch).result(timeout=LAUNCH_TIMEOUT_S)

    def _launch(self) -> None:
        from playwright.sync_api import sync_playwright

        self._playwright = sync_playwright().start()
        self.browser = self._playwright.chromium.launch(
            executable_path=self.executable,
            # As root Chromium needs --no-sandbox; containers have a small /dev/shm.
            args=["--no-sandbox", "--disable-dev-shm-usage"],
        )

    def stop(self) -> None:
        """Close the browser and its thread."""

        def close() -> None:
            if self.browser is not None:
                self.browser.close()
            if self._playwright is not None:
                self._playwright.stop()

        with contextlib.suppress(Exception):
            self._executor.submit(close).result(timeout=LAUNCH_TIMEOUT_S)
        self._executor.shutdown(wait=False)

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        """`work(*args)` on the browser's thread; the loop serves the page meanwhile."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, work, *args)

    @contextlib.asynccontextmanager
    async def page(self, base_url: str, **context_options: Any) -> AsyncIterator[PageHandle]:
        """A fresh browser context (no cookies) with one page on `base_url`; closed on exit,
        before the servers stop, so no feed is left open."""

        def open_page() -> PageHandle:
            context = self.browser.new_context(base_url=base_url, **context_options)
            context.set_default_timeout(ACTION_TIMEOUT_MS)
            page = context.new_page()
            console = ConsoleLog()
            page.on(
                "console",
                lambda message: (
                    console.errors.append(message.text) if message.type == "error" else None
                ),
            )
            page.on("pageerror", lambda error: console.errors.append(str(error)))
            return PageHandle(page, context, console)

        handle = await self.run(open_page)
        try:
            yield handle
        finally:
            await self.run(handle.context.close)


@dataclass
class PageHandle:
    """A page, its context and its console errors; touch them only inside `BrowserThread.run`."""

    page: Any
    context: Any
    console: ConsoleLog
