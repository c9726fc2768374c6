"""`make test-stress`: the whole pytest suite, several times in a row, while every core is busy.

Starts one CPU hog per core (a plain busy loop in its own process), runs pytest `--runs` times,
and stops at the first failing run. The hogs are stopped however it ends. Exit status 0 only
when every run passed.

    python -m tools.stress --runs 5 [-- extra pytest arguments]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HOG = "while True: pass"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="pytest runs in a row (default 5)")
    parser.add_argument(
        "--hogs", type=int, default=os.cpu_count() or 2, help="busy processes (default: cores)"
    )
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest after --")
    args = parser.parse_args(argv)
    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(args.hogs)]
    passed = 0
    try:
        for run in range(1, args.runs + 1):
            started = time.perf_counter()
            code = subprocess.call([sys.executable, "-m", "pytest", "-q", *args.pytest_args])
            took = time.perf_counter() - started
            print(f"stress run {run}/{args.runs}: {'passed' if code == 0 else 'FAILED'} "
                  f"in {took:.0f} s with {args.hogs} CPU hog(s)", flush=True)  # fmt: skip
            if code != 0:
                break
            passed += 1
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()
    print(f"{passed}/{args.runs} runs passed under load")
    return 0 if passed == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
