"""systemd notifications (sd_notify): readiness, status line, watchdog keep-alive, stopping.

Layer: imperative shell, an adapter to the service manager. Without `NOTIFY_SOCKET` (not run by
systemd) every call is a no-op, as in libsystemd. `should_ping_watchdog` is the pure decision the
service loop asks before each keep-alive.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

logger = logging.getLogger(__name__)


class SystemdNotifier:
    """Sends sd_notify datagrams to the socket named by `NOTIFY_SOCKET` in `environ`."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self._environ = environ
        self._address = _socket_address(environ.get("NOTIFY_SOCKET", ""))
        self._send_failed = False

    @property
    def enabled(self) -> bool:
        """Whether a usable notification socket was given."""
        return self._address is not None

    def notify(self, *lines: str) -> bool:
        """Send `KEY=VALUE` lines as one datagram; True if sent. Never raises."""
        if self._address is None:
            return False
        try:
            # Non-blocking: a full receive queue must not stall the event loop; it is an error.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK) as sock:
                sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            level = logging.DEBUG if self._send_failed else logging.WARNING
            logger.log(level, "sd_notify to %r failed: %s", self._address, exc)
            self._send_failed = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Startup is complete (`READY=1`), with an optional status line."""
        return self.notify("READY=1", *_status_lines(status))

    def status(self, text: str) -> bool:
        """Set the one-line status `systemctl status` shows."""
        return self.notify(*_status_lines(text))

    def watchdog(self) -> bool:
        """Watchdog keep-alive (`WATCHDOG=1`)."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun (`STOPPING=1`)."""
        return self.notify("STOPPING=1", *_status_lines(status))

    def watchdog_interval_s(self) -> float | None:
        """Seconds between keep-alives: half of `WATCHDOG_USEC` if it is meant for this process."""
        watchdog_pid = self._environ.get("WATCHDOG_PID")
        if watchdog_pid and watchdog_pid.strip() != str(os.getpid()):
            return None
        try:
            watchdog_us = int(self._environ.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        return watchdog_us / 2_000_000 if watchdog_us > 0 else None


def should_ping_watchdog(sample_age_s: float | None, stale_after_s: float) -> bool:
    """Ping only while telemetry is fresh, so a hung sampler lets systemd restart the agent."""
    return sample_age_s is not None and sample_age_s <= stale_after_s


def _status_lines(status: str | None) -> tuple[str, ...]:
    # STATUS= carries one line; an embedded newline would be read as the start of another key.
    return () if status is None else ("STATUS=" + " ".join(status.splitlines()),)


def _socket_address(value: str) -> str | None:
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]  # Linux abstract namespace
    if value:
        logger.debug("NOTIFY_SOCKET=%r is not supported (vsock?); notifications disabled", value)
    return None
