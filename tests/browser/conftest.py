"""The browser tests share one headless Chromium (see `tests/browser/chromium.py`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.browser.chromium import browser_session
from tools.chromium import BrowserThread


@pytest.fixture(scope="session")
def chromium() -> Iterator[BrowserThread]:
    with browser_session() as browser:
        yield browser
