"""sd_notify sender against real AF_UNIX datagram sockets, and the watchdog decisions."""

from __future__ import annotations

import logging
import math
import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpu_agent.sdnotify import SystemdNotifier, should_ping_watchdog

RECEIVE_TIMEOUT_S = 2.0
# sun_path holds 108 bytes; longer tmp_path names fall back to a short directory.
MAX_SOCKET_PATH_CHARS = 100


@pytest.fixture
def socket_dir(tmp_path: Path) -> Iterator[Path]:
    if len(str(tmp_path / "notify.sock")) <= MAX_SOCKET_PATH_CHARS:
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(prefix="sdn-") as short:
        yield Path(short)


@pytest.fixture
def receiver(socket_dir: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd, and its NOTIFY_SOCKET value."""
    path = socket_dir / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(RECEIVE_TIMEOUT_S)
        yield sock, str(path)


@pytest.fixture
def abstract_receiver() -> Iterator[tuple[socket.socket, str]]:
    name = f"gpu-agent-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(RECEIVE_TIMEOUT_S)
        yield sock, "@" + name


def receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_ready_with_status_is_one_datagram(receiver: tuple[socket.socket, str]) -> None:
    sock, address = receiver
    notifier = SystemdNotifier({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    assert notifier.ready("serving on 127.0.0.1:8765")
    assert receive(sock) == "READY=1\nSTATUS=serving on 127.0.0.1:8765"


def test_each_helper_sends_its_payload(receiver: tuple[socket.socket, str]) -> None:
    sock, address = receiver
    notifier = SystemdNotifier({"NOTIFY_SOCKET": address})
    assert notifier.ready()
    assert receive(sock) == "READY=1"
    assert notifier.status("2 models loaded\n9.1 GB used")
    # A status line never carries a newline, which would start a new key.
    assert receive(sock) == "STATUS=2 models loaded 9.1 GB used"
    assert notifier.watchdog()
    assert receive(sock) == "WATCHDOG=1"
    assert notifier.stopping("draining")
    assert receive(sock) == "STOPPING=1\nSTATUS=draining"
    assert notifier.notify("X_GPU_AGENT=1", "EXTEND_TIMEOUT_USEC=5000000")
    assert receive(sock) == "X_GPU_AGENT=1\nEXTEND_TIMEOUT_USEC=5000000"


def test_abstract_socket(abstract_receiver: tuple[socket.socket, str]) -> None:
    sock, address = abstract_receiver
    notifier = SystemdNotifier({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    assert notifier.watchdog()
    assert receive(sock) == "WATCHDOG=1"


@pytest.mark.parametrize(
    "environ",
    [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "@"}, {"NOTIFY_SOCKET": "relative/path"}],
    ids=["unset", "empty", "bare-at", "relative"],
)
def test_disabled_without_usable_socket(environ: dict[str, str]) -> None:
    notifier = SystemdNotifier(environ)
    assert not notifier.enabled
    assert not notifier.ready("ok")
    assert not notifier.watchdog()


def test_vsock_is_disabled_with_a_debug_log(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="gpu_agent.sdnotify"):
        notifier = SystemdNotifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert not notifier.ready()
    assert [record.levelno for record in caplog.records] == [logging.DEBUG]
    assert "vsock:2:1234" in caplog.records[0].getMessage()


def test_default_environment_is_the_process_environment(
    receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, address = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert SystemdNotifier().ready()
    assert receive(sock) == "READY=1"


def test_send_to_vanished_socket_returns_false_and_logs_once(
    socket_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = socket_dir / "gone.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
    path.unlink()
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(path)})
    with caplog.at_level(logging.DEBUG, logger="gpu_agent.sdnotify"):
        assert notifier.watchdog() is False
        assert notifier.watchdog() is False
    levels = [record.levelno for record in caplog.records]
    assert levels == [logging.WARNING, logging.DEBUG]


def test_send_to_closed_abstract_socket_returns_false() -> None:
    name = f"gpu-agent-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
    assert SystemdNotifier({"NOTIFY_SOCKET": "@" + name}).ready() is False


@pytest.mark.parametrize(
    ("environ", "expected_s"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "not-a-pid"}, None),
        ({"WATCHDOG_USEC": "500000"}, 0.25),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
    ids=["no-pid", "our-pid", "other-pid", "bad-pid", "short", "zero", "garbage", "unset"],
)
def test_watchdog_interval(environ: dict[str, str], expected_s: float | None) -> None:
    assert SystemdNotifier(environ).watchdog_interval_s() == expected_s


@pytest.mark.parametrize(
    ("sample_age_s", "expected"),
    [
        (0.0, True),
        (4.9, True),
        (5.0, True),
        (5.1, False),
        (None, False),
        (math.nan, False),
        (math.inf, False),
    ],
)
def test_should_ping_watchdog_only_on_fresh_samples(
    sample_age_s: float | None, expected: bool
) -> None:
    assert should_ping_watchdog(sample_age_s, stale_after_s=5.0) is expected
