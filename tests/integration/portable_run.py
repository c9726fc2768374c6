"""Runs the controller in a Python with the Linux-only parts of the platform taken away.

Used by `test_controller_portability` as `python tests/integration/portable_run.py <args>`:
before anything else is imported, the names only Linux has (epoll, `TCP_INFO`, `SO_PEERCRED`,
the scheduler-affinity, pidfd, memfd, eventfd and xattr calls, real-time signals, Linux-only
clocks) are removed, reading `/proc` or `/sys` raises, and importing a module that only makes
sense on the GPU desktop (the agent, NVML, the virtual-time loop, systemd) fails. Then it runs
`gpu-controller` with the given arguments, and also imports the Celery worker's app.
"""

from __future__ import annotations

import select
import sys

# Before anything imports `selectors` (socket does), which picks epoll when it exists.
if "selectors" in sys.modules or "asyncio" in sys.modules:
    raise SystemExit("portable_run must run before selectors or asyncio are imported")
for _name in ("epoll", "EPOLLIN", "EPOLLOUT", "EPOLLET", "EPOLLEXCLUSIVE"):
    if hasattr(select, _name):
        delattr(select, _name)

import builtins  # noqa: E402
import importlib.abc  # noqa: E402
import io  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

LINUX_ONLY: dict[Any, tuple[str, ...]] = {
    socket: ("TCP_INFO", "SO_PEERCRED", "AF_NETLINK", "SO_BINDTODEVICE", "TCP_USER_TIMEOUT"),
    os: (
        "sched_getaffinity",
        "sched_setaffinity",
        "pidfd_open",
        "memfd_create",
        "eventfd",
        "splice",
        "posix_fadvise",
        "getxattr",
        "setxattr",
        "listxattr",
        "removexattr",
    ),
    signal: ("SIGRTMIN", "SIGRTMAX"),
    time: ("CLOCK_BOOTTIME", "CLOCK_TAI"),
}
BLOCKED_MODULES = ("gpu_agent", "pynvml", "gpu_common.virtual_time", "systemd", "sdnotify")
BLOCKED_PATHS = ("/proc", "/sys")

for module, names in LINUX_ONLY.items():
    for name in names:
        if hasattr(module, name):
            delattr(module, name)


class LinuxOnlyModules(importlib.abc.MetaPathFinder):
    """Refuses to import what exists for the GPU desktop (Linux) only."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        for blocked in BLOCKED_MODULES:
            if fullname == blocked or fullname.startswith(blocked + "."):
                raise ImportError(f"{fullname} is Linux-only and must not load in the controller")


sys.meta_path.insert(0, LinuxOnlyModules())
_open = io.open


def guarded_open(file: Any, *args: Any, **kwargs: Any) -> Any:
    if isinstance(file, str | os.PathLike) and str(file).startswith(BLOCKED_PATHS):
        raise OSError(f"{file} exists on Linux only")
    return _open(file, *args, **kwargs)


builtins.open = guarded_open
io.open = guarded_open

import controller.workflows.celery_app  # noqa: E402, F401 - the worker's app imports too
from controller.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
