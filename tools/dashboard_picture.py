"""The dashboard's picture for the README, taken during the busy-hour demo.

Runs `controller.demo` on virtual time and, from `--at` simulated seconds into the busy hour, at
the first moment an image job is past its fifth step, logs in to the live dashboard in a
headless Chromium (`tools.chromium`) and photographs the whole page at 1280 pixels wide;
simulated time stands still while it does.

    python -m tools.dashboard_picture [--at 150] [--out docs/dashboard.png] [--dark]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from controller.demo import TOKEN, run
from controller.engine import Engine
from controller.simulated import SimulatedStack
from gpu_common.virtual_time import run_virtual
from tools.chromium import BrowserThread, PageHandle, find_chromium

WIDTH, HEIGHT = 1280, 800
# Longest simulated wait between two looks for a job far enough along.
CHECK_EVERY_S = 0.5
STEPS_IN = 5


def _a_job_is_well_along(engine: Engine) -> bool:
    for record in engine.images.active():
        progress = engine.images.info(record).progress
        if progress is not None and (progress.step or 0) >= STEPS_IN:
            return True
    return False


def photograph(handle: PageHandle, url: str, out: Path) -> None:
    """Log in as a person does, wait for the live page and its chart, save the whole page."""
    page = handle.page
    page.goto(url)
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_selector("#live.ok")
    page.wait_for_function(
        "Number(document.querySelector('.memory-chart')?.dataset.points || 0) > 10"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out), full_page=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--at", type=float, default=150.0, help="simulated seconds in")
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    parser.add_argument("--dark", action="store_true", help="the dark colour scheme")
    args = parser.parse_args(argv)
    executable = find_chromium()
    if executable is None:
        print("no Chromium found: `make chromium` installs it", file=sys.stderr)
        return 1
    browser = BrowserThread(executable)
    browser.start()
    scheme = "dark" if args.dark else "light"
    errors: list[str] = []

    async def look(stack: SimulatedStack, url: str) -> None:
        engine = stack.controller.engine
        while True:
            mark = engine.images.changes.mark()
            if _a_job_is_well_along(engine):
                break
            await engine.images.changes.wait(CHECK_EVERY_S, mark)
        size = {"width": WIDTH, "height": HEIGHT}
        async with browser.page(url, viewport=size, color_scheme=scheme) as handle:
            await browser.run(photograph, handle, url, args.out)
            errors.extend(handle.console.errors)

    try:
        out_dir = Path(tempfile.mkdtemp(prefix="gpu-agent-dashboard-"))
        run_virtual(run(Console(), out_dir, look=look, look_at_s=args.at))
    finally:
        browser.stop()
    if errors:
        print(f"console errors on the page: {errors}", file=sys.stderr)
        return 1
    print(f"the dashboard during the busy hour: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
