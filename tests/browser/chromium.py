"""The session's Chromium for the browser tests, or a skip that says why there is none.

The browser is `tools.chromium.BrowserThread`: Debian's chromium driven by Playwright from a
thread of its own, so simulated time stands still while it looks. A test hands it work with
`await chromium.run(fn, ...)`; between two looks the simulated work goes on (a job is held,
runs, ends) and the page follows over its live feed, without a reload.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from tools.chromium import BrowserThread, find_chromium


def skip_or_fail(reason: str) -> None:
    """Skip the browser tests saying why, or fail where BROWSER_TESTS=require."""
    if os.environ.get("BROWSER_TESTS") == "require":
        pytest.fail(reason)
    pytest.skip(reason)


@contextlib.contextmanager
def browser_session() -> Iterator[BrowserThread]:
    """The session's browser, or a skip (a failure with BROWSER_TESTS=require) saying why
    there is none."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        skip_or_fail("playwright is not installed (it comes with the dev extra)")
    executable = find_chromium()
    if executable is None:
        skip_or_fail(
            "no Chromium found: `make chromium` installs Debian's package, or set CHROMIUM_PATH"
        )
    assert executable is not None
    browser = BrowserThread(executable)
    try:
        browser.start()
    except Exception as exc:
        browser.stop()
        skip_or_fail(f"Chromium at {executable} did not start: {exc}")
    try:
        yield browser
    finally:
        browser.stop()
