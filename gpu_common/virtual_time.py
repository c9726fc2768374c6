"""Virtual time for asyncio: an event loop whose clock moves only when every task is waiting.

The simulated desktop, the agent and the controller can run together in one process over real
loopback sockets on this loop. When nothing is ready to run and no socket has data, the loop
jumps its clock straight to the next timer instead of sleeping, so a simulated hour costs only
the CPU work done in it, and every duration it reports is the same however busy the machine is.

Rules that keep the jump honest, and make a run replay exactly:
- Before every poll, data our sockets wrote must have reached its peers' receive queues. The
  kernel delivers loopback data in a softirq that may run a moment later (under load, on
  ksoftirqd) and splits large writes, so the loop reads the sockets' TCP counters and waits in
  real time until every byte sent is received. A poll then sees exactly what was written before
  it, and finding nothing means nothing is in flight. (`sendfile` is off: it would write behind
  the transports' backs.)
- A job submitted with `run_in_executor` (or `asyncio.to_thread`) is waited for in real time
  right away, while time stands still: it sees the world as it was when submitted, and its
  result is back on the loop before anything else happens. The SQLite store and the NVML
  sampler run on such threads. A job still running after `EXECUTOR_SETTLE_S` is taken to be
  waiting on this loop (a synchronous client calling a server here); the loop then serves it
  with real waits, and time stays put until it ends.
- With no timer at all, the loop blocks on its sockets as any loop does.

Processes started as subprocesses, and the standalone `gpu-agent sim`, run on real time:
clients outside this process cannot share a virtual clock.

The idea is the `looptime` pattern and trio's `MockClock(autojump_threshold=0)`; written here
because neither knows about executor threads.
"""

from __future__ import annotations

import array
import asyncio
import dataclasses
import fcntl
import selectors
import socket
import struct
import termios
import threading
from asyncio import selector_events
from collections.abc import Callable, Collection, Coroutine
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

T = TypeVar("T")

# Monday 09:00 UTC: a working morning, so a simulated day's timestamps read naturally.
DEFAULT_WALL_EPOCH = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
# A non-zero start, so no code can mistake the loop's first instant for "never".
DEFAULT_START_S = 1000.0
# While an executor job runs, how long one real wait lasts before the loop looks again.
EXECUTOR_POLL_S = 0.05
# Offsets in Linux's `struct tcp_info` (linux/tcp.h): tcpi_bytes_received, tcpi_notsent_bytes,
# tcpi_bytes_sent, tcpi_bytes_retrans; the struct is at least this long on every kernel that
# has all four (4.19+).
_BYTES_RECEIVED_AT = 128
_NOTSENT_BYTES_AT = 144
_BYTES_SENT_AT = 200
_BYTES_RETRANS_AT = 208
_TCP_INFO_BYTES = 216
# The longest wait for written data to reach its peer before the loop polls anyway, counted in
# naps of IN_FLIGHT_POLL_S (a loaded machine makes each nap, and so the whole, longer).
LANDING_LIMIT_S = 2.0
# Data held back by flow control counts as settled once nothing has moved for this long.
HELD_STILL_S = 0.02
# While loopback data is still in the kernel between two of our sockets, one real wait.
IN_FLIGHT_POLL_S = 0.0002
# How long the loop waits for an executor result before it concludes the job waits on the loop.
EXECUTOR_SETTLE_S = 0.5


class _JumpingSelector(selectors.DefaultSelector):
    """A selector that never sleeps on a timer: it asks its loop to jump the clock instead."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualTimeLoop | None = None
        # fd -> (local, remote) addresses of a TCP socket, or None for any other file; and back.
        self._ends: dict[int, tuple[Any, Any] | None] = {}
        self._fd_by_ends: dict[tuple[Any, Any], int] = {}
        self._nap = threading.Event()  # never set: a real pause that reads no clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        settled = self.loop is None or self.loop._settle_executor_jobs()
        if self.loop is not None and self.loop.written_fds:
            self._await_landing(self.loop.written_fds)
        ready: list[tuple[selectors.SelectorKey, int]] = super().select(0)
        if ready or (timeout is not None and timeout <= 0) or self.loop is None:
            return ready
        if not settled:
            # A thread is working for us: its result must land before time may move.
            wait_s = EXECUTOR_POLL_S if timeout is None else min(timeout, EXECUTOR_POLL_S)
            real: list[tuple[selectors.SelectorKey, int]] = super().select(wait_s)
            return real
        if timeout is None:
            blocked: list[tuple[selectors.SelectorKey, int]] = super().select(None)
            return blocked
        self.loop.advance(timeout)
        return []

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        key = super().unregister(fileobj)
        ends = self._ends.pop(key.fd, None)
        if ends is not None:
            self._fd_by_ends.pop(ends, None)
        return key

    def _await_landing(self, written_fds: set[int]) -> None:
        """Wait (in real time) until what the sockets in `written_fds` sent has reached their
        peers' receive queues, then forget them.

        A poll then sees exactly the data written before it, however the kernel split and timed
        the transfer, so each run of the loop reads the same bytes at the same point. Data held
        back by flow control (the reader has not read what it has) waits for the reader; the
        loop goes on once the kernel has moved all it will."""
        deadline_s = LANDING_LIMIT_S
        previous: tuple[int, ...] | None = None
        still_s = 0.0
        while deadline_s > 0:
            state = self._transfer_state(written_fds)
            if state is None:
                break  # landed
            still = state != _MOVING and state == previous
            still_s = still_s + IN_FLIGHT_POLL_S if still else 0.0
            if still_s >= HELD_STILL_S:
                break  # held back by flow control, and the kernel has moved all it will
            previous = state
            self._nap.wait(IN_FLIGHT_POLL_S)
            deadline_s -= IN_FLIGHT_POLL_S
        written_fds.clear()

    def _transfer_state(self, fds: Collection[int]) -> tuple[int, ...] | None:
        """None when nothing sent from `fds` is on its way to a peer of this loop; else the
        senders' counters, to tell a transfer that moves from one held back by flow control.

        On its way: sent but not yet received (the kernel delivers loopback data in a softirq
        that, under load, runs later), or held unsent while the reader has nothing yet (TCP
        small queues defer part of a large write). Such a transfer gives `_MOVING`."""
        registered = self.get_map()
        held: list[int] = []
        for fd in fds:
            counters = self._counters(fd)
            if counters is None:
                continue
            peer_fd = self._fd_by_ends.get((counters.remote, counters.local))
            if peer_fd is None or peer_fd not in registered:
                continue
            peer = self._counters(peer_fd)
            if peer is not None and counters.sent > peer.received:
                return _MOVING
            if counters.unsent:
                unread = _unread_bytes(peer_fd)
                if unread == 0:
                    return _MOVING
                held += (fd, counters.sent, counters.unsent, unread)
        return tuple(held) if held else None

    def _counters(self, fd: int) -> _TcpCounters | None:
        if fd not in self._ends:
            ends = _socket_ends(fd)
            self._ends[fd] = ends
            if ends is not None:
                self._fd_by_ends[ends] = fd
        ends = self._ends[fd]
        if ends is None:
            return None
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            return None  # closed since it wrote
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
        except OSError:
            return None
        finally:
            sock.detach()  # the fd belongs to the loop's transport
        if len(info) < _TCP_INFO_BYTES:
            return None
        (received,) = struct.unpack_from("=Q", info, _BYTES_RECEIVED_AT)
        (unsent,) = struct.unpack_from("=I", info, _NOTSENT_BYTES_AT)
        (sent,) = struct.unpack_from("=Q", info, _BYTES_SENT_AT)
        # Retransmitted bytes count in tcpi_bytes_sent again (a tail-loss probe on loopback).
        (retransmitted,) = struct.unpack_from("=Q", info, _BYTES_RETRANS_AT)
        sent -= retransmitted
        return _TcpCounters(ends[0], ends[1], sent=sent, received=received, unsent=unsent)


# `_transfer_state` of data on its way: never counted as standing still.
_MOVING: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class _TcpCounters:
    local: Any
    remote: Any
    sent: int
    received: int
    unsent: int


def _unread_bytes(fd: int) -> int:
    """Bytes in a socket's receive queue (FIONREAD)."""
    buffer = array.array("i", [0])
    try:
        fcntl.ioctl(fd, termios.FIONREAD, buffer, True)
    except OSError:
        return 0
    return buffer[0]


def _socket_ends(fd: int) -> tuple[Any, Any] | None:
    """(local, remote) address of a connected TCP socket; None for anything else."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None  # closed since it wrote
    try:
        if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        return sock.getsockname(), sock.getpeername()
    except OSError:
        return None  # a listening socket, or one not connected yet
    finally:
        sock.detach()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector event loop on virtual time; see the module docstring for the rules.

    `time()` starts at `start_s`; `wall_epoch` is the wall-clock instant of `time() == 0`, so
    `gpu_common.clock.utc_now()` gives timestamps that agree with the loop's durations.
    """

    def __init__(
        self,
        *,
        start_s: float = DEFAULT_START_S,
        wall_epoch: datetime = DEFAULT_WALL_EPOCH,
    ) -> None:
        self._virtual_s = float(start_s)
        self.wall_epoch = wall_epoch
        self._executor_jobs: list[_ExecutorJob] = []
        # Sockets written to since the last poll (see `_JumpingSelector._await_landing`).
        self.written_fds: set[int] = set()
        selector = _JumpingSelector()
        super().__init__(selector)
        selector.loop = self

    def time(self) -> float:
        """Virtual seconds: they pass only when the loop jumps to its next timer."""
        return self._virtual_s

    def advance(self, seconds: float) -> None:
        """Move the clock `seconds` forward: onto the next timer, which is that far away."""
        if seconds <= 0:
            return
        target = self._virtual_s + seconds
        scheduled: list[asyncio.TimerHandle] = getattr(self, "_scheduled")  # noqa: B009
        if scheduled:
            # Land exactly on the timer, so float rounding never leaves it a hair in the future.
            head_s: float = scheduled[0].when()
            if abs(head_s - target) < 1e-6:
                target = head_s
        self._virtual_s = max(self._virtual_s, target)

    def _make_socket_transport(
        self,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[Any] | None = None,
        *,
        extra: dict[str, Any] | None = None,
        server: Any = None,
    ) -> asyncio.Transport:
        return _TrackedSocketTransport(self, sock, protocol, waiter, extra, server)

    async def _sendfile_native(self, transp: Any, file: Any, offset: int, count: int | None) -> int:
        # os.sendfile writes behind the transport's back; the fallback writes through it, so
        # every byte sent is tracked.
        raise asyncio.SendfileNotAvailableError("sendfile is off on virtual time")

    def run_in_executor(  # type: ignore[override]
        self, executor: Any, func: Callable[..., T], *args: Any
    ) -> asyncio.Future[T]:
        """As asyncio's, but the loop waits for the job: virtual time stands still while it
        runs, and results come back in submission order (see `_settle_executor_jobs`)."""
        future: asyncio.Future[T] = self.create_future()
        job = _ExecutorJob(previous=self._executor_jobs[-1] if self._executor_jobs else None)
        self._executor_jobs.append(job)

        def work() -> None:
            try:
                result = func(*args)
            except BaseException as exc:  # handed to the awaiting task, as asyncio does
                job.deliver(self, future, None, exc)
            else:
                job.deliver(self, future, result, None)

        if executor is None:
            if getattr(self, "_default_executor", None) is None:
                self.set_default_executor(ThreadPoolExecutor(thread_name_prefix="asyncio"))
            executor = getattr(self, "_default_executor")  # noqa: B009 - asyncio's own slot
        # Submitted directly, not through asyncio's run_in_executor: that would hand the result
        # back a second time, waking the loop at a moment only the thread's timing decides.
        executor.submit(work)
        # Wait for the job here, before the loop runs on: it then sees the state of the world
        # exactly as it was when it was submitted, and its result is back before anything else
        # happens, so a run replays identically.
        if job.delivered.wait(EXECUTOR_SETTLE_S):
            # The result is queued on the loop already; drain the wake-up byte it wrote too, or
            # the next poll would see it and split this iteration in two at a random point.
            getattr(self, "_read_from_self")()  # noqa: B009 - asyncio's own self-pipe reader
        return future

    def _settle_executor_jobs(self) -> bool:
        """Forget delivered executor jobs; True when none is left outstanding.

        A job still running `EXECUTOR_SETTLE_S` after it was submitted is presumably waiting on
        this loop itself (a synchronous client in a thread calling a server on the loop): the
        loop serves it with real waits until it ends, without moving the clock.
        """
        while self._executor_jobs and self._executor_jobs[0].delivered.is_set():
            self._executor_jobs.pop(0)
        return all(job.delivered.is_set() for job in self._executor_jobs)


class _TrackedSocketTransport(selector_events._SelectorSocketTransport):  # type: ignore[name-defined,misc]
    """asyncio's socket transport, noting on its loop which sockets wrote."""

    def write(self, data: Any) -> None:
        super().write(data)
        self._loop.written_fds.add(self._sock_fd)

    def _write_ready(self) -> None:
        super()._write_ready()
        self._loop.written_fds.add(self._sock_fd)


class _ExecutorJob:
    """One executor job's hand-back: results are delivered to the loop in submission order."""

    __slots__ = ("delivered", "previous")

    def __init__(self, previous: _ExecutorJob | None) -> None:
        self.delivered = threading.Event()
        self.previous = previous

    def deliver(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
        result: Any,
        exc: BaseException | None,
    ) -> None:
        if self.previous is not None:
            self.previous.delivered.wait()
            self.previous = None
        try:
            loop.call_soon_threadsafe(_settle, future, result, exc)
        except RuntimeError:
            pass  # the loop closed while the job ran: nobody is waiting for it
        finally:
            self.delivered.set()


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.cancelled():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def run_virtual(
    main: Coroutine[Any, Any, T],
    *,
    wall_epoch: datetime = DEFAULT_WALL_EPOCH,
    debug: bool | None = None,
) -> T:
    """Run `main` to completion on a fresh `VirtualTimeLoop`, like `asyncio.run`."""

    def factory() -> VirtualTimeLoop:
        return VirtualTimeLoop(wall_epoch=wall_epoch)

    with asyncio.Runner(debug=debug, loop_factory=factory) as runner:
        return runner.run(main)
