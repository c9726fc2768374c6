"""Command line of the controller (imperative shell)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from controller import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpu-controller",
        description="Schedules LLM requests and image jobs across GPU agents.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    build_parser().parse_args(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
